"""The Triton CoPE kernels' work counted in Triton's interpreter, on a CPU: per kernel, its
programs, matrix-product multiply-adds, atomically added elements (by tile shape) and
stored elements over one forward and backward, for dense and sparse gates. A change to the
kernels' structure shows here before a GPU can time it.

    TRITON_INTERPRET=1 python -m bench.cope_triton_ops [--seq 512] [--heads 4] [--kv-heads 1]
        [--head-dim 64] [--npos 64] [--blocks 64,32] [--gates dense sparse] [--module MODULE]

``--module``: the kernels' module (default ``cope_megatron.ops.cope.triton_kernels``; an
older copy, to compare). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import math
import os

import torch

from bench.cope_op import gate_inputs


def count(module, q, k, v, table, npos_max: int) -> dict[str, dict[str, int]]:
    """Counters per kernel name over one forward and backward of ``module``'s op."""
    from triton.runtime import interpreter

    builder, function = interpreter.InterpreterBuilder, interpreter.InterpretedFunction
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    current = ["?"]
    originals = {name: getattr(builder, name) for name in
                 ("create_dot", "create_atomic_rmw", "create_masked_store")}
    run = function.run

    def dot(self, a, b, *args):
        counts[current[0]]["dot_macs"] += math.prod(a.data.shape) * b.data.shape[-1]
        return originals["create_dot"](self, a, b, *args)

    def atomic(self, op, ptr, val, mask, *args):
        # By tile shape: dK, dV tiles are [BLOCK_N, BLOCK_D], dz's [BLOCK_M, BLOCK_N].
        shape = "x".join(map(str, mask.data.shape))
        counts[current[0]][f"atomic_elements_{shape}"] += int(mask.data.sum())
        return originals["create_atomic_rmw"](self, op, ptr, val, mask, *args)

    def store(self, ptrs, value, mask, *args):
        counts[current[0]]["stored_elements"] += int(mask.data.sum())
        return originals["create_masked_store"](self, ptrs, value, mask, *args)

    def launch(self, *args, grid, **kw):
        current[0] = self.fn.__name__
        counts[current[0]]["programs"] += math.prod(grid if isinstance(grid, tuple) else (grid,))
        return run(self, *args, grid=grid, **kw)

    patches = {"create_dot": dot, "create_atomic_rmw": atomic, "create_masked_store": store}
    try:
        for name, fn in patches.items():
            setattr(builder, name, fn)
        function.run = launch
        tensors = [t.requires_grad_() for t in (q, k, v, table)]
        out = module.cope_attention_triton(*tensors, npos_max=npos_max,
                                           softmax_scale=1 / math.sqrt(q.shape[-1]))
        out.backward(torch.randn_like(out))
    finally:
        for name, fn in originals.items():
            setattr(builder, name, fn)
        function.run = run
    return {name: dict(c) for name, c in counts.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=1)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--npos", type=int, default=64)
    parser.add_argument("--blocks", default="64,32", help="BLOCK_M,BLOCK_N")
    parser.add_argument("--module", default="cope_megatron.ops.cope.triton_kernels")
    parser.add_argument("--gates", nargs="+", default=["dense", "sparse"])
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1: the counts come from the interpreter")
    module = importlib.import_module(args.module)
    module.BLOCK_M, module.BLOCK_N = (int(b) for b in args.blocks.split(","))
    result = {"seq": args.seq, "heads": args.heads, "kv_heads": args.kv_heads,
              "head_dim": args.head_dim, "blocks": args.blocks, "module": args.module}
    for gates in args.gates:
        gen = torch.Generator().manual_seed(0)
        q, k, v = gate_inputs((1, args.heads, args.seq, args.head_dim), gates, gen)
        k, v = k[:, :args.kv_heads], v[:, :args.kv_heads]
        table = 0.1 * torch.randn(1, args.head_dim, args.npos, generator=gen)
        result[gates] = count(module, q, k, v, table, args.npos)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
