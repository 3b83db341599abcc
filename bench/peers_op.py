"""Benchmark CoPE's contextual peers, FoX and stick-breaking, beside CoPE and PyTorch SDPA
causal attention: forward+backward time and peak working memory per op and sequence length,
ratios to SDPA in the same run.

    python bench/peers_op.py [--seqs 4096] [--impls cope fox stickbreaking] [--reps 3]
                             [--gates dense sparse] [--flush-denormal]

Every op is the one a training step runs on the device (``auto``: FoX's flash parts on CPU,
stick-breaking's C++ tile kernel on CPU and compiled blocks on CUDA from
``COMPILE_MIN_SEQ`` keys, CoPE's chunked op). FoX's forget gates are σ(N(3, 1)), about
0.95, a half-life of some 15 tokens.
``--gates`` draws q, k as ``bench/cope_op.py`` does: ``dense`` (logits about N(0, 1): CoPE's
gates and stick-breaking's β near ½, so a row's stick is spent within a couple of hundred
keys) or ``sparse`` (every logit shifted by about −4: β ≈ 0.02, sticks reach thousands of
keys back and stick-breaking does nearly all the causal work).
Timing and memory as ``bench/cope_op.py`` measures them (interleaved medians; CPU peak RSS
in a child process). ``--flush-denormal``: ``torch.set_flush_denormal(True)`` before any
thread starts, so every thread flushes subnormals (FoX's far keys fall through the
subnormal range, where CPUs take microcode assists), as training and evaluation processes
do (``distributed.cpu_compat``): the flushed rows are what a run sees. Prints a table and,
last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script too
from bench.cope_op import gate_inputs, measure, sdpa  # noqa: E402
from cope_megatron.ops import cope_attention  # noqa: E402
from cope_megatron.ops.fox import fox_attention  # noqa: E402
from cope_megatron.ops.stickbreaking import stickbreaking_attention  # noqa: E402

IMPLS = ["cope", "fox", "stickbreaking"]


def make_case(impl: str, seq: int, gates: str, args, device: torch.device):
    gen = torch.Generator().manual_seed(0)
    shape = (1, args.heads, seq, args.head_dim)
    q, k, v = (t.to(device).requires_grad_() for t in gate_inputs(shape, gates, gen))
    table = (0.1 * torch.randn(1, args.head_dim, 64, generator=gen)).to(device).requires_grad_()
    gate = (torch.randn(shape[:3], generator=gen) + 3).to(device).requires_grad_()
    grad = torch.randn(shape, generator=gen).to(device)

    def run():
        if impl == "sdpa":
            out = sdpa(q, k, v)
        elif impl == "cope":
            out = cope_attention(q, k, v, table)
        elif impl == "fox":
            out = fox_attention(q, k, v, F.logsigmoid(gate))
        else:
            out = stickbreaking_attention(q, k, v)
        out.backward(grad)
        for t in (q, k, v, table, gate):
            t.grad = None

    return run


def run_cases(args, device: torch.device, reps: int):
    """{(gates, seq, impl): [seconds]}, {(gates, seq, impl): [peak MB]} over interleaved
    rounds."""
    times, mems = {}, {}
    for gates in args.gates:
        for seq in args.seqs:
            cases = {impl: make_case(impl, seq, gates, args, device)
                     for impl in ["sdpa", *args.impls]}
            for fn in cases.values():  # warm-up (compilation, allocator)
                fn()
            for _ in range(reps):
                for impl, fn in cases.items():
                    t, m = measure(fn, device)
                    times.setdefault((gates, seq, impl), []).append(t)
                    mems.setdefault((gates, seq, impl), []).append(m)
    return times, mems


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqs", type=int, nargs="+", default=[4096])
    parser.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--gates", nargs="+", default=["dense"], choices=["dense", "sparse"])
    parser.add_argument("--flush-denormal", action="store_true")
    parser.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flush_denormal:
        torch.set_flush_denormal(True)  # threads started later inherit it
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.memory_only:
        mems = run_cases(args, device, reps=1)[1]
        print(json.dumps([[json.dumps(list(k)), v] for k, v in mems.items()]))
        return
    times, mems = run_cases(args, device, args.reps)
    if device.type == "cpu":  # peak RSS where glibc returns every large block at free
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        child = subprocess.run([sys.executable, *sys.argv, "--memory-only"], env=env,
                               capture_output=True, text=True, check=True)
        mems = {tuple(json.loads(k)): v for k, v in json.loads(child.stdout.splitlines()[-1])}
    rows = []
    for gates, seq, impl in times:
        t = statistics.median(times[gates, seq, impl])
        base = statistics.median(times[gates, seq, "sdpa"])
        peak, base_peak = max(mems[gates, seq, impl]), max(mems[gates, seq, "sdpa"])
        rows.append({"gates": gates, "seq": seq, "impl": impl, "fwd_bwd_s": round(t, 5),
                     "vs_sdpa": round(t / base, 2), "peak_mb": round(peak, 1),
                     "mem_vs_sdpa": round(peak / base_peak, 2)})
    print(f"device={device} threads={torch.get_num_threads()} dtype=float32 "
          f"heads={args.heads} head_dim={args.head_dim} reps={args.reps} "
          f"flush_denormal={args.flush_denormal}")
    print(f"{'gates':>6} {'seq':>6} {'impl':>14} {'fwd+bwd s':>10} {'x SDPA':>7} "
          f"{'peak MB':>9} {'x SDPA':>7}")
    for r in rows:
        print(f"{r['gates']:>6} {r['seq']:>6} {r['impl']:>14} {r['fwd_bwd_s']:>10.5f} "
              f"{r['vs_sdpa']:>7.2f} {r['peak_mb']:>9.1f} {r['mem_vs_sdpa']:>7.2f}")
    print(json.dumps({"device": str(device), "flush_denormal": args.flush_denormal,
                      "rows": rows}))


if __name__ == "__main__":
    main()
