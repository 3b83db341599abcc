"""q, k, v and the table of one CoPE layer of a trained run, on held-out text: the
"trained" gate regime of ``bench/cope_op.py``.

    python bench/trained_gates.py RUN_DIR [--seq 4096] [--layer 0]

prints each head's mean gate and the keys its rows need to clamp (their near band), so a
run's regime can be read at a glance. The run's latest checkpoint is restored as
``cope-megatron eval`` does (its config, its data), and one held-out sequence of ``--seq``
tokens goes through the model with a hook on the layer's CoPE attention.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from cope_megatron.config import load_config
from cope_megatron.ops.heads import expand_kv


def capture(run_dir: str, seq: int, layer: int) -> dict:
    """{"q", "k", "v", "table", "npos_max", "scale"} of layer ``layer`` (0-based) on
    ``seq`` held-out tokens, fp32, on the CPU."""
    from cope_megatron.eval.perplexity import evaluation_text
    from cope_megatron.model.gpt import eval_mode
    from cope_megatron.pe import get_pe
    from cope_megatron.trainer import start
    from cope_megatron.training.engine import restore

    config = Path(run_dir) / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{config}: not a run directory (no config.yaml)")
    cfg = load_config([str(config), "logging.wandb=disabled",
                       f"eval.tokens={seq}", "eval.length_multipliers=[1]",
                       f"model.seq_length={seq}"])
    pe = get_pe(cfg.model.pe)
    if not pe.uses_cope_op:
        raise ValueError(f"{run_dir} trained model.pe={cfg.model.pe}; the trained gate regime "
                         "needs a CoPE run")
    env, manifest = start(cfg)
    engine, _ = restore(cfg, pe, env, manifest)
    model = engine.module
    attention = model.decoder.layers[layer].self_attention.core_attention.attention
    got = {}

    def hook(module, args):
        q, k, v = args[:3]
        got.update(q=q.detach().float(), k=k.detach().float(), v=v.detach().float(),
                   table=module.table.detach().float(), npos_max=module.npos_max,
                   scale=module.shape.softmax_scale)

    handle = attention.register_forward_pre_hook(hook)
    tokens = evaluation_text(cfg, manifest)[: seq + 1]
    with torch.no_grad(), eval_mode(model):
        model(tokens[None, :-1].to(env.device), torch.arange(seq, device=env.device)[None],
              None)
    handle.remove()
    return got


def summary(c: dict) -> list[dict]:
    """Per head: mean gate over visible keys, and the median and largest number of keys a
    row needs before its gate sum exceeds npos_max − 1 (None: it never does)."""
    heads, s = c["q"].shape[1], c["q"].shape[2]
    q, k = c["q"][0], expand_kv(c["k"], heads)[0]
    gates = torch.sigmoid(c["scale"] * q @ k.transpose(-1, -2)).tril()
    rows = []
    for h in range(heads):
        needed = []  # over 256 sampled rows: keys back from the row until it clamps
        for i in range(0, s, max(1, s // 256)):
            over = (gates[h, i, : i + 1].flip(0).cumsum(0) > c["npos_max"] - 1).nonzero()
            needed.append(int(over[0]) + 1 if len(over) else math.inf)
        finite = sorted(n for n in needed if n != math.inf)
        rows.append({"head": h, "mean_gate": round(float(gates[h].sum() / (s * (s + 1) / 2)), 4),
                     "median_band": finite[len(finite) // 2] if finite else None,
                     "max_band": finite[-1] if finite else None,
                     "rows_never_clamped": round(sum(n == math.inf for n in needed)
                                                 / len(needed), 3)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--layer", type=int, default=0)
    args = parser.parse_args()
    c = capture(args.run_dir, args.seq, args.layer)
    print(f"{args.run_dir} layer {args.layer}: q {tuple(c['q'].shape)}, npos_max {c['npos_max']}")
    for row in summary(c):
        print(row)


if __name__ == "__main__":
    main()
