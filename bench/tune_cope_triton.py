"""Pick the Triton CoPE kernels' block shape: forward+backward time of each candidate
(BLOCK_M, BLOCK_N, warps, plain-loop stages) in bf16 on CUDA, for dense and sparse gates.

    python bench/tune_cope_triton.py [--seq 8192] [--heads 16] [--head-dim 128]

The winner goes into ``cope_megatron/ops/cope/triton_kernels.py``'s defaults. Prints a table and,
last, one JSON line.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import triton.testing

from bench.cope_op import add_shape_args, make_case
from cope_megatron.ops.cope import triton_kernels as kernels


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=8192)
    add_shape_args(parser, heads=16, head_dim=128)
    parser.add_argument("--blocks", nargs="+", default=["128,64", "64,32", "64,64"])
    parser.add_argument("--warps", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--stages", nargs="+", type=int, default=[1, 2, 3])
    args = parser.parse_args()
    args.dtype = "bfloat16"
    rows = []
    for gates in ("dense", "sparse"):
        run = make_case("triton", args.seq, gates, args, torch.device("cuda"))
        for blocks, warps, stages in itertools.product(args.blocks, args.warps, args.stages):
            kernels.BLOCK_M, kernels.BLOCK_N = (int(b) for b in blocks.split(","))
            kernels.NUM_WARPS, kernels.PLAIN_STAGES = warps, stages
            try:
                ms = triton.testing.do_bench(run, warmup=50, rep=300, return_mode="median")
            except Exception as err:  # out of shared memory or registers for this shape
                print(f"{gates} {blocks} w{warps} s{stages}: {type(err).__name__}")
                continue
            rows.append({"gates": gates, "blocks": blocks, "warps": warps, "stages": stages,
                         "ms": round(ms, 3)})
            print(f"{gates:>6} {blocks:>7} w{warps} s{stages} {ms:8.3f} ms", flush=True)
    print(json.dumps({"seq": args.seq, "rows": rows}))


if __name__ == "__main__":
    main()
