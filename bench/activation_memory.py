"""The activation estimate (the ``saved`` part of ``cope-megatron estimate``'s activations)
against a measured forward, per PE: the memory a forward leaves for its backward.

    python bench/activation_memory.py configs/model/125m.yaml [--pes rope alibi cope]
        [key=value ...]

On CUDA the model runs in bf16 (``train.precision=bf16`` is added) and the measure is the
allocator's growth over the forward, as in tests/test_gpu.py; on the CPU, which has no
allocator count, it is the distinct storages autograd saves (``saved_for_backward``, as in
tests/test_estimate.py), reported on CUDA too. Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json

import torch

from cope_megatron.config import Layout, load_config
from cope_megatron.estimate.memory import activation_bytes, saved_for_backward
from cope_megatron.pe import get_pe

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
    rows = []
    for pe in args.pes:
        rows.append(measure([*sources, f"model.pe={pe}"], device))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    measure_name = "allocator" if device.type == "cuda" else "autograd's saved tensors"
    print(f"device={device} configs={' '.join(sources)}; measured: {measure_name}")
    print(f"{'pe':>8} {'estimate MiB':>13} {'allocated MiB':>14} {'saved MiB':>10} "
          f"{'est/meas':>9} {'within 20%':>11}")
    for r in rows:
        allocated = "n/a" if r["allocated_mib"] is None else f"{r['allocated_mib']:.1f}"
        print(f"{r['pe']:>8} {r['estimated_mib']:13.1f} {allocated:>14} {r['saved_mib']:10.1f} "
              f"{r['estimated_vs_measured']:9.2f} {str(r['within']):>11}")
    print(json.dumps({"device": str(device), "configs": sources, "rows": rows}))


if __name__ == "__main__":
    main()
