"""Benchmark the CoPE op against PyTorch SDPA causal attention: forward+backward time and
peak working memory per implementation and sequence length.

    python bench/cope_op.py [--seqs 1024 2048 4096] [--impls chunked reference] [--reps 3]
                            [--gates dense sparse]

Impls: the CoPE op's (``chunked``, ``reference``, ``triton``), and the bias PEs ``alibi``
and ``t5`` as their own attention modules run them in training today (SDPA with the
[heads, s, s] bias as its mask, which takes it off the flash backend), and ``alibi_flex``,
``t5_flex`` the same modules on ``pe.bias_kernel=flex`` (compiled FlexAttention on CUDA).
A case that fails (out of device memory, no backward on the device as FlexAttention on
CPU, a kernel that does not compile) is a row saying why, and the others go on. Each
length's rows also go to stderr as they finish, and a SIGTERM (``bench/gpu_suite.sh``'s
stage budget) ends the run with the table of what finished.

Gate regimes: ``dense`` draws q, k at random (gates ≈ 0.5, rows saturate npos within a few
hundred keys); ``sparse`` adds a shared direction with opposite signs to q and k, which
shifts every logit by about −4 (gates ≈ 0.03, rows saturate only after thousands of keys);
``trained`` takes q, k, v and the table of one layer of a trained CoPE run (``--run DIR``,
``--layer``) on held-out text of each length (``bench/trained_gates.py``), in that
model's own shape.
On CUDA, SDPA is pinned to its FlashAttention backend.

Times are medians over interleaved repetitions (every impl once per round), so ratios to
SDPA are measured under the same machine load. Memory is the peak growth during one
fwd+bwd (GPU: max_memory_allocated; CPU: peak RSS via /proc, reset before each run, taken
in a child process whose glibc returns every large block to the OS at free -- that
setting slows allocation, so times come from the parent). Prints a table and, last, one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from cope_megatron.config import PEConfig
from cope_megatron.ops import cope_attention
from cope_megatron.pe import get_pe
from cope_megatron.pe.base import AttentionShape
from cope_megatron.training.metrics import proc_status_kb

sys.path.insert(0, os.path.dirname(__file__))
from stopping import Stopped, stop_on_sigterm  # noqa: E402


def measure(fn, device: torch.device) -> tuple[float, float]:
    """(seconds, peak MB above the starting point) of one call of fn."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t, (torch.cuda.max_memory_allocated() - base) / 2**20
    base = proc_status_kb("VmRSS:")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    t = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - t
    return elapsed, (proc_status_kb("VmHWM:") - base) / 1024


SPARSE_LOGIT_SHIFT = 4.0


def gate_inputs(shape, gates: str, gen: torch.Generator) -> list[torch.Tensor]:
    """q, k, v in fp32 for a gate regime (module docstring)."""
    q, k, v = (torch.randn(shape, generator=gen) for _ in range(3))
    if gates == "sparse":
        d = shape[-1]
        u = torch.nn.functional.normalize(torch.randn(d, generator=gen), dim=0)
        alpha = math.sqrt(SPARSE_LOGIT_SHIFT * math.sqrt(d))  # scale·α² = shift
        q, k = q + alpha * u, k - alpha * u
    elif gates != "dense":
        raise ValueError(f"unknown gate regime {gates!r}; use dense or sparse")
    return [q, k, v]


def sdpa(q, k, v):
    if q.is_cuda:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def case_inputs(seq: int, gates: str, args) -> tuple[list[torch.Tensor], dict]:
    """(q, k, v, table) in fp32 and the op's keyword arguments for a gate regime."""
    if gates == "trained":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script too
        from bench.trained_gates import capture

        c = capture(args.run, seq, args.layer)
        return [c["q"], c["k"], c["v"], c["table"]], {"npos_max": c["npos_max"],
                                                      "softmax_scale": c["scale"]}
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = gate_inputs((1, args.heads, seq, args.head_dim), gates, gen)
    return [q, k, v, 0.1 * torch.randn(1, args.head_dim, args.npos, generator=gen)], {}


BIAS_IMPLS = {"alibi": ("alibi", "materialized"), "t5": ("t5", "materialized"),
              "alibi_flex": ("alibi", "flex"), "t5_flex": ("t5", "flex")}
"""impl -> (PE, ``pe.bias_kernel``)."""


def bias_attention(impl: str, q: torch.Tensor) -> torch.nn.Module:
    """The PE's attention module on its bias kernel for q's heads and head size, in q's
    dtype (training mode: the path a training step takes)."""
    pe, kernel = BIAS_IMPLS[impl]
    _, heads, _, head_dim = q.shape
    shape = AttentionShape.of_rank(total_heads=heads, total_kv_heads=heads, head_dim=head_dim)
    return get_pe(pe).attention(shape, PEConfig(bias_kernel=kernel)).to(q.device, q.dtype)


def make_case(impl: str, seq: int, gates: str, args, device, inputs=None):
    dtype = getattr(torch, args.dtype)
    tensors, options = inputs or case_inputs(seq, gates, args)
    q, k, v, table = (t.to(device, dtype).requires_grad_() for t in tensors)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    attention = bias_attention(impl, q) if impl in BIAS_IMPLS else None

    def run():
        if impl == "sdpa":
            out = sdpa(q, k, v)
        elif attention is not None:
            out = attention(q, k, v)
        else:
            out = cope_attention(q, k, v, table, impl=impl, **options)
        out.backward(grad)
        for t in (q, k, v, table, *(attention.parameters() if attention else ())):
            t.grad = None

    return run


def add_shape_args(parser: argparse.ArgumentParser, *, heads: int, head_dim: int) -> None:
    """--heads, --head-dim, --npos: the attention shape every CoPE benchmark takes."""
    parser.add_argument("--heads", type=int, default=heads)
    parser.add_argument("--head-dim", type=int, default=head_dim)
    parser.add_argument("--npos", type=int, default=64)


EXPECTED_ERRORS = ("out of memory", "no backward on cpu")
"""Rows that are findings, not failures: the exit status stays 0 for them."""


def case_error(e: Exception, device: torch.device) -> str:
    """A failed case's row text: out of memory, no backward on the device (FlexAttention on
    CPU), or the exception's first line (a compile or launch failure on a GPU)."""
    if isinstance(e, torch.OutOfMemoryError):
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return "out of memory"
    if isinstance(e, NotImplementedError):
        return f"no backward on {device.type}"
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:160]}"


def run_cases(args, device, reps: int, found: dict, on_group=None) -> None:
    """Fills ``found``'s "times" and "mems" ({(gates, seq, impl): [seconds or peak MB]},
    over interleaved rounds after a warm-up one) and "errors" ({(gates, seq, impl): text}):
    a case that fails is a row saying why, the others go on. ``on_group(gates, seq)``
    follows each length, so that rows reach the output as they finish."""
    times, mems, errors = found["times"], found["mems"], found["errors"]
    for gates in args.gates:
        for seq in args.seqs:
            impls = ["sdpa"] + [i for i in args.impls
                                if i != "reference" or seq <= args.max_reference_seq]
            try:
                inputs = case_inputs(seq, gates, args)
            except Exception as e:  # every impl's row says why
                errors.update({(gates, seq, impl): case_error(e, device) for impl in impls})
                continue
            cases = {}
            for impl in impls:
                try:
                    cases[impl] = make_case(impl, seq, gates, args, device, inputs)
                except Exception as e:
                    errors[gates, seq, impl] = case_error(e, device)
            for rep in range(reps + 1):  # round 0 warms up: compilation, the allocator
                for impl, fn in list(cases.items()):
                    try:
                        t, m = measure(fn, device)
                    except Exception as e:
                        errors[gates, seq, impl] = case_error(e, device)
                        del cases[impl]
                        times.pop((gates, seq, impl), None)  # its row is the error alone
                        mems.pop((gates, seq, impl), None)
                        continue
                    if rep:
                        times.setdefault((gates, seq, impl), []).append(t)
                        mems.setdefault((gates, seq, impl), []).append(m)
            if on_group is not None:
                on_group(gates, seq)


def result_rows(found: dict) -> list[dict]:
    """One row per case: its median time, ratio to SDPA's and peak memory, or its error."""
    times, mems = found["times"], found["mems"]
    rows = [{"gates": g, "seq": s, "impl": i, "error": e}
            for (g, s, i), e in found["errors"].items()]
    for gates, seq, impl in times:
        t = statistics.median(times[gates, seq, impl])
        base = times.get((gates, seq, "sdpa"))
        rows.append({"gates": gates, "seq": seq, "impl": impl, "fwd_bwd_s": round(t, 5),
                     "vs_sdpa": round(t / statistics.median(base), 2) if base else None,
                     "peak_mb": round(max(mems[gates, seq, impl]), 1)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--impls", nargs="+", default=["chunked", "reference"])
    parser.add_argument("--reps", type=int, default=3)
    add_shape_args(parser, heads=8, head_dim=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--gates", nargs="+", default=["dense"],
                        choices=["dense", "sparse", "trained"])
    parser.add_argument("--run", help="a trained CoPE run directory, for --gates trained")
    parser.add_argument("--layer", type=int, default=0, help="its layer, for --gates trained")
    parser.add_argument("--max-reference-seq", type=int, default=4096)
    parser.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if "trained" in args.gates and not args.run:
        parser.error("--gates trained needs --run RUN_DIR (a trained CoPE run)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    found = {"times": {}, "mems": {}, "errors": {}}
    if args.memory_only:
        run_cases(args, device, 1, found)
        print(json.dumps([[json.dumps(list(k)), v] for k, v in found["mems"].items()]))
        return

    def on_group(gates: str, seq: int) -> None:  # each length's rows as it finishes
        for row in result_rows(found):
            if (row["gates"], row["seq"]) == (gates, seq):
                print(json.dumps(row), file=sys.stderr, flush=True)

    stopped = False
    stop_on_sigterm()
    try:
        run_cases(args, device, args.reps, found, on_group)
    except Stopped:
        stopped = True
    if device.type == "cpu" and not stopped:
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        child = subprocess.run([sys.executable, *sys.argv, "--memory-only"], env=env,
                               capture_output=True, text=True, check=True)
        found["mems"] = {tuple(json.loads(k)): v
                         for k, v in json.loads(child.stdout.splitlines()[-1])}
    rows = result_rows(found)
    print(f"device={device} threads={torch.get_num_threads()} dtype={args.dtype} "
          f"heads={args.heads} head_dim={args.head_dim} npos={args.npos} reps={args.reps}"
          + (f" (trained: {args.run} layer {args.layer}, in its own shape)" if args.run else "")
          + (" -- stopped at the time limit: the cases not listed did not run"
             if stopped else ""))
    print(f"{'gates':>6} {'seq':>6} {'impl':>10} {'fwd+bwd s':>10} {'x SDPA':>7} "
          f"{'peak MB':>9}")
    order = ["sdpa", *args.impls]
    rows.sort(key=lambda r: (args.gates.index(r["gates"]), r["seq"], order.index(r["impl"])))
    for r in rows:
        if "error" in r:
            print(f"{r['gates']:>6} {r['seq']:>6} {r['impl']:>10} {r['error']}")
            continue
        ratio = f"{r['vs_sdpa']:>7.2f}" if r["vs_sdpa"] is not None else f"{'n/a':>7}"
        print(f"{r['gates']:>6} {r['seq']:>6} {r['impl']:>10} {r['fwd_bwd_s']:>10.5f} "
              f"{ratio} {r['peak_mb']:>9.1f}")
    print(json.dumps({"device": str(device), "rows": rows, "stopped": stopped}))
    failed = [r for r in rows if r.get("error") not in (None, *EXPECTED_ERRORS)]
    sys.exit(1 if stopped or failed else 0)


if __name__ == "__main__":
    main()
