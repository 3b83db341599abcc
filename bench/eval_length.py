"""Benchmark evaluation at growing context: forward throughput (tokens/s) and peak memory
per position encoding at 1×, 4× and 16× the training length, on a randomly initialized
model (speed and memory do not depend on the weights).

    python bench/eval_length.py [--model configs/model/tiny.yaml] [--pes nope rope alibi ...]

Each length scores the same number of tokens (``--tokens``) in windows of that length,
batch 1, as ``cope-megatron eval`` does. Memory: peak growth during the windows (CPU: VmHWM,
GPU: max_memory_allocated). Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

from cope_megatron.config import load_config
from cope_megatron.distributed.parallel import destroy_distributed, init_distributed
from cope_megatron.model.gpt import build_gpt, token_losses
from cope_megatron.pe import REGISTRY, get_pe

sys.path.insert(0, os.path.dirname(__file__))
from cope_op import measure  # noqa: E402

VOCAB = 2048


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="configs/model/tiny.yaml")
    parser.add_argument("--pes", nargs="+", default=[p for p in sorted(REGISTRY)
                                                     if get_pe(p).extrapolates])
    parser.add_argument("--multipliers", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    rows = measure_all(args)
    if not torch.cuda.is_available() and not args.memory_only:
        # Peak memory from a child whose glibc returns every large block at free (that
        # setting slows allocation, so throughput comes from this process).
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        child = subprocess.run([sys.executable, *sys.argv, "--memory-only"], env=env,
                               capture_output=True, text=True, check=True)
        peaks = json.loads(child.stdout.splitlines()[-1])["rows"]
        for row, other in zip(rows, peaks):
            row["peak_mb"] = other["peak_mb"]
    report(args, rows)


def measure_all(args) -> list[dict]:
    rows = []
    for pe in args.pes:
        cfg = load_config([args.model, f"model.pe={pe}"])
        env = init_distributed(1)
        torch.manual_seed(0)
        model = build_gpt(cfg, get_pe(cfg.model.pe), VOCAB).to(env.device).eval()
        train_len = cfg.model.seq_length
        for mult in args.multipliers:
            length = mult * train_len
            windows = max(1, args.tokens // length)
            text = torch.randint(0, VOCAB, (windows, length + 1), device=env.device)

            def run(text=text, model=model):
                with torch.no_grad():
                    for w in text:
                        token_losses(model, w[None])

            run(text[:1])  # warm-up at this length
            seconds, peak = measure(run, env.device)
            rows.append({"pe": pe, "length": length, "multiplier": mult,
                         "tokens_per_s": round(windows * length / seconds),
                         "peak_mb": round(peak, 1)})
        destroy_distributed()
    return rows


def report(args, rows: list[dict]) -> None:
    print(f"device={'cuda' if torch.cuda.is_available() else 'cpu'} model={args.model} "
          f"threads={torch.get_num_threads()} tokens per length={args.tokens}")
    print(f"{'pe':>11} {'length':>7} {'x':>3} {'tokens/s':>9} {'peak MB':>8}")
    for r in rows:
        print(f"{r['pe']:>11} {r['length']:>7} {r['multiplier']:>3} {r['tokens_per_s']:>9} "
              f"{r['peak_mb']:>8.1f}")
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
