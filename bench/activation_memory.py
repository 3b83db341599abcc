"""The activation estimate (the ``saved`` part of ``cope-megatron estimate``'s activations)
against a measured forward, per PE: the memory a forward leaves for its backward.

    python bench/activation_memory.py configs/model/125m.yaml [--pes rope alibi cope]
        [key=value ...]

On CUDA the model runs in bf16 (``train.precision=bf16`` is added) and the measure is the
allocator's growth over the forward, as in tests/test_gpu.py; on the CPU, which has no
allocator count, it is the distinct storages autograd saves (``saved_for_backward``, as in
tests/test_estimate.py), reported on CUDA too. Prints a table and, last, one JSON line;
each row also goes to stderr as it finishes, a PE that fails is a row saying why, and a
SIGTERM (a time limit) ends the run with the rows it has.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from cope_megatron.config import Layout, load_config
from cope_megatron.estimate.memory import activation_bytes, saved_for_backward
from cope_megatron.pe import get_pe

sys.path.insert(0, os.path.dirname(__file__))
from stopping import NOT_RUN, Stopped, stop_on_sigterm  # noqa: E402

MIB = 2**20
WITHIN = 0.2
"""The estimate's promise: within 20% of the measure."""


def measure(sources: list[str], device: torch.device) -> dict:
    from cope_megatron.model.gpt import build_gpt, loss_sum

    cfg = load_config(sources)
    pe = get_pe(cfg.model.pe)
    model = build_gpt(cfg, pe, cfg.data.vocab_size).to(device)
    if cfg.train.precision == "bf16":
        model = model.bfloat16()
    tokens = torch.randint(0, cfg.data.vocab_size,
                           (cfg.train.micro_batch_size, cfg.model.seq_length + 1),
                           generator=torch.Generator().manual_seed(0)).to(device)
    estimated = activation_bytes(cfg, pe, Layout.of(cfg, 1), device=device.type)["saved"]
    allocated = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        loss = loss_sum(model, tokens)
        allocated = torch.cuda.memory_allocated() - base
        del loss
    saved = saved_for_backward(model, tokens)
    measured = allocated if allocated is not None else saved
    return {"pe": cfg.model.pe, "estimated_mib": estimated / MIB, "saved_mib": saved / MIB,
            "allocated_mib": None if allocated is None else allocated / MIB,
            "estimated_vs_measured": estimated / measured,
            "within": abs(estimated / measured - 1) <= WITHIN}


def main() -> None:
    from cope_megatron.distributed.parallel import init_distributed

    parser = argparse.ArgumentParser()
    parser.add_argument("configs", nargs="+", help="config files, then key=value overrides")
    parser.add_argument("--pes", nargs="+", default=["rope", "alibi", "cope"])
    args = parser.parse_args()
    device = init_distributed(1).device
    sources = [*args.configs, *(["train.precision=bf16"] if device.type == "cuda" else [])]
    rows, stopped = [], False
    stop_on_sigterm()
    try:
        for pe in args.pes:
            try:
                rows.append(measure([*sources, f"model.pe={pe}"], device))
            except Exception as e:  # a PE that fails is a row saying why
                rows.append({"pe": pe, "error": f"{type(e).__name__}: {e}"[:200]})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    except Stopped:
        stopped = True
        rows += [{"pe": pe, "error": NOT_RUN}
                 for pe in args.pes[len(rows):]]
    measure_name = "allocator" if device.type == "cuda" else "autograd's saved tensors"
    print(f"device={device} configs={' '.join(sources)}; measured: {measure_name}")
    print(f"{'pe':>8} {'estimate MiB':>13} {'allocated MiB':>14} {'saved MiB':>10} "
          f"{'est/meas':>9} {'within 20%':>11}")
    for r in rows:
        if "error" in r:
            print(f"{r['pe']:>8} failed: {r['error']}")
            continue
        allocated = "n/a" if r["allocated_mib"] is None else f"{r['allocated_mib']:.1f}"
        print(f"{r['pe']:>8} {r['estimated_mib']:13.1f} {allocated:>14} {r['saved_mib']:10.1f} "
              f"{r['estimated_vs_measured']:9.2f} {str(r['within']):>11}")
    print(json.dumps({"device": str(device), "configs": sources, "rows": rows}))
    # An estimate outside its promise fails the run: this is the suite's check of it.
    sys.exit(1 if stopped or any("error" in r or not r["within"] for r in rows) else 0)


if __name__ == "__main__":
    main()
