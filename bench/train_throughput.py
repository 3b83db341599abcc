"""Training throughput of a model config for each PE: tokens/s, TFLOP/s per device, MFU,
peak memory, and the step time relative to RoPE's, measured in the same run.

    python bench/train_throughput.py configs/model/125m.yaml [--pes rope cope alibi]
        [key=value ...] [--steps 20] [--warmup 5] [--peak-tflops X]

A PE may carry its own overrides after a colon, comma-separated, e.g.
``--pes rope cope:pe.cope.impl=triton cope:pe.cope.impl=chunked``: each such variant is
a row of its own, labelled as written.

Each PE trains in its own process (a clean allocator and peak-memory count): the DeepSpeed
engine of ``cope-megatron train``, one process, on random tokens (the data pipeline is
benchmarked apart, in ``bench/data_pipeline.py``). Steps are timed after ``--warmup``
steps (compilation, allocator growth) with the device synchronized. Prints a table and,
last, one JSON line; each row also goes to stderr as it finishes. Stopped by SIGTERM (a
time limit), it ends the running variant and prints the rows it has, the rest marked
"not run"; it exits 1 when a variant failed or did not run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from cope_megatron.pe import get_pe
from cope_megatron.training.metrics import peak_memory_gib

sys.path.insert(0, os.path.dirname(__file__))
from stopping import NOT_RUN, Stopped, stop_on_sigterm  # noqa: E402


def split_variant(spec: str) -> tuple[str, list[str]]:
    """``pe[:key=value,...]`` -> (pe, overrides)."""
    pe, _, overrides = spec.partition(":")
    return pe, [o for o in overrides.split(",") if o]


def last_error(stderr: str) -> str:
    """The exception line of a failed child's stderr (warnings at exit may follow it)."""
    lines = stderr.strip().splitlines() or ["(no output)"]
    return next((ln for ln in reversed(lines) if "Error" in ln), lines[-1])


def measure_one(sources: list[str], steps: int, warmup: int, peak_override: float | None
                ) -> dict:
    from cope_megatron.config import load_config, padded_vocab_size
    from cope_megatron.distributed.parallel import init_distributed, seed_everything
    from cope_megatron.estimate.flops import flops_per_token, peak_tflops, throughput
    from cope_megatron.model.gpt import lm_loss
    from cope_megatron.training.engine import build_engine

    cfg = load_config(sources)
    env = init_distributed(cfg.parallel.tensor, cfg.parallel.context)
    seed_everything(cfg.train.seed)
    vocab = cfg.data.vocab_size
    engine = build_engine(cfg, get_pe(cfg.model.pe), vocab)
    t = cfg.train
    tokens = torch.randint(0, vocab, (t.micro_batch_size, cfg.model.seq_length + 1),
                           generator=torch.Generator().manual_seed(0)).to(env.device)

    def step() -> float:
        loss = lm_loss(engine, tokens)
        engine.backward(loss)
        engine.step()
        return loss.item()  # synchronizes the device

    losses = [step() for _ in range(warmup)]
    start = time.perf_counter()
    losses += [step() for _ in range(steps)]
    seconds = time.perf_counter() - start
    flops = flops_per_token(cfg, get_pe(cfg.model.pe),
                            padded_vocab_size(vocab, cfg.parallel.tensor))
    peak = peak_tflops(env.device, peak_override)
    return {"pe": cfg.model.pe, "step_s": seconds / steps,
            "peak_mb": 1024 * peak_memory_gib(env.device),
            "first_loss": losses[0], "last_loss": losses[-1], "flops_per_token": flops.as_dict(),
            "peak_tflops": peak, "device": torch.cuda.get_device_name() if
            env.device.type == "cuda" else "cpu",
            **throughput(t.micro_batch_size * cfg.model.seq_length * steps, seconds, flops,
                         devices=1, peak=peak)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("configs", nargs="+", help="config files, then key=value overrides")
    parser.add_argument("--pes", nargs="+", default=["rope", "cope", "alibi"],
                        help="PEs, each optionally PE:key=value,... (module docstring)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child: measure this PE
    args = parser.parse_args()
    sources = [*args.configs, "logging.wandb=disabled", "logging.progress=false"]
    if args.one:
        pe, overrides = split_variant(args.one)
        result = measure_one([*sources, f"model.pe={pe}", *overrides], args.steps, args.warmup,
                             args.peak_tflops)
        print(json.dumps({**result, "pe": args.one}))
        return
    rows = []
    stop_on_sigterm()
    try:
        for pe in args.pes:
            cmd = [sys.executable, __file__, *args.configs, "--one", pe, "--steps",
                   str(args.steps), "--warmup", str(args.warmup)]
            if args.peak_tflops:
                cmd += ["--peak-tflops", str(args.peak_tflops)]
            child = subprocess.run(cmd, capture_output=True, text=True)  # killed on Stopped
            if child.returncode != 0:
                print(f"{pe}: failed\n{child.stderr[-3000:]}", file=sys.stderr, flush=True)
                rows.append({"pe": pe, "error": last_error(child.stderr)})
                continue
            rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    except Stopped:
        rows += [{"pe": pe, "error": NOT_RUN}
                 for pe in args.pes[len(rows):]]
    base = next((r["step_s"] for r in rows if r["pe"] == "rope" and "step_s" in r), None)
    print(f"configs={' '.join(args.configs)} steps={args.steps} warmup={args.warmup}")
    width = max(10, *(len(pe) for pe in args.pes))
    print(f"{'pe':>{width}} {'step s':>8} {'x RoPE':>7} {'tok/s':>9} {'TFLOP/s':>8} {'MFU':>6} "
          f"{'peak MB':>9} {'loss':>13}")
    for r in rows:
        if "error" in r:
            print(f"{r['pe']:>{width}} failed: {r['error']}")
            continue
        r["vs_rope"] = r["step_s"] / base if base else None
        mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] is not None else "   n/a"
        ratio = f"{r['vs_rope']:7.2f}" if base else "    n/a"
        print(f"{r['pe']:>{width}} {r['step_s']:8.3f} {ratio} {r['tokens_per_s']:9.0f} "
              f"{r['tflops_per_device']:8.1f} {mfu} {r['peak_mb']:9.0f} "
              f"{r['first_loss']:6.2f}>{r['last_loss']:5.2f}")
    print(json.dumps({"configs": args.configs, "rows": rows}))
    sys.exit(1 if any("error" in r for r in rows) else 0)


if __name__ == "__main__":
    main()
