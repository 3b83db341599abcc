"""Benchmark attention under context parallelism: per-rank peak memory, summed CPU time,
wall time and the share of it spent waiting on the ring's exchanges (GPU: per-rank peak
memory and wall time) of one forward+backward over a fixed total sequence, for CP = 1, 2,
4 ranks, for CoPE, RoPE (plain softmax attention: the rotation is outside it) or ALiBi.

    python bench/cp_attention.py [--pe cope] [--seq 8192] [--cps 1 2 4] [--reps 3]

CP = 1 is the path a model without CP takes: ``cope_attention``, or the PE's attention
module (SDPA; for ALiBi SDPA with the [h, s, s] bias materialized, what training runs on
CPU). CP > 1 is ``ops.context_parallel`` (CoPE's, or the softmax ring) over gloo processes
(NCCL, one GPU each, when as many GPUs as ranks exist). Each rank runs one thread, so
summed CPU time is the total compute, exchange included, whatever the machine's core count;
wall time means something only with a core per rank. ``wait %``: per rank, the time inside
the ring's ``req.wait()`` over its wall time, the largest of the ranks. Memory is the peak
growth during one fwd+bwd above the inputs (CPU: VmHWM with glibc returning large blocks at
free, measured in a separate launch because that setting slows allocation; GPU:
max_memory_allocated). Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cope_megatron.config import PEConfig
from cope_megatron.ops import cope_attention
from cope_megatron.ops.context_parallel.cope import cope_attention_context_parallel
from cope_megatron.ops.context_parallel.ring import ContextParallel
from cope_megatron.pe import get_pe
from cope_megatron.pe.base import AttentionShape

sys.path.insert(0, os.path.dirname(__file__))
from cope_op import measure  # noqa: E402


def _rank(rank: int, world: int, store: str, args, out: str) -> None:
    torch.set_num_threads(1)
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{store}",
                                rank=rank, world_size=world)
        cp = ContextParallel(dist.group.WORLD)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    full = [torch.randn(1, args.heads, args.seq, args.head_dim, generator=gen) for _ in range(4)]
    table = (0.1 * torch.randn(1, args.head_dim, args.npos, generator=gen)).to(device, dtype)
    if world > 1:
        c = args.seq // (2 * world)
        full = [torch.cat([t[:, :, i * c:(i + 1) * c] for i in cp.chunks(rank)], 2)
                for t in full]
    q, k, v, grad = (t.to(device, dtype) for t in full)
    for t in (q, k, v, table):
        t.requires_grad_()

    shape = AttentionShape.of_rank(total_heads=args.heads, total_kv_heads=args.heads,
                                   head_dim=args.head_dim)
    module = None if args.pe == "cope" else get_pe(args.pe).attention(
        shape, PEConfig(bias_kernel="materialized")).to(device, dtype)

    def run() -> None:
        if module is not None:
            out = module(q, k, v, cp if world > 1 else None)
        elif world > 1:
            out = cope_attention_context_parallel(q, k, v, table, cp, npos_max=args.npos,
                                                  softmax_scale=args.head_dim ** -0.5)
        else:
            out = cope_attention(q, k, v, table)
        out.backward(grad)
        for t in (q, k, v, table):
            t.grad = None

    run()  # warm-up: compilation, allocator, connections
    records = []
    for _ in range(args.reps):
        if world > 1:
            dist.barrier()
        cpu, waited = time.process_time(), cp.wait_seconds if world > 1 else 0.0
        wall, peak = measure(run, device)
        records.append({"cpu_s": time.process_time() - cpu, "wall_s": wall, "peak_mb": peak,
                        "wait_s": (cp.wait_seconds if world > 1 else 0.0) - waited})
    with open(f"{out}.{rank}", "w") as f:
        json.dump(records, f)
    if world > 1:
        dist.destroy_process_group()


def launch(world: int, args) -> list[list[dict]]:
    """Per rank, per repetition: cpu_s, wall_s, peak_mb."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result")
        mp.spawn(_rank, args=(world, os.path.join(tmp, "store"), args, out), nprocs=world)
        ranks = []
        for r in range(world):
            with open(f"{out}.{r}") as f:
                ranks.append(json.load(f))
        return ranks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pe", choices=["cope", "rope", "alibi"], default="cope")
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--cps", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--npos", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    rows = []
    for world in args.cps:
        timed = launch(world, args)
        if not gpu:  # memory in its own launch, with glibc returning freed blocks
            os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
            measured = launch(world, args)
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            measured = timed
        cpu = statistics.median(sum(r[i]["cpu_s"] for r in timed) for i in range(args.reps))
        wall = statistics.median(max(r[i]["wall_s"] for r in timed) for i in range(args.reps))
        peak = max(max(rep["peak_mb"] for rep in r) for r in measured)
        waits = [statistics.median(rep["wait_s"] / rep["wall_s"] for rep in r) for r in timed]
        rows.append({"pe": args.pe, "cp": world, "seq": args.seq,
                     "tokens_per_rank": args.seq // world, "summed_cpu_s": round(cpu, 3),
                     "wall_s": round(wall, 3), "peak_mb_per_rank": round(peak, 1),
                     "wait_frac_per_rank": [round(w, 4) for w in waits]})
    base = rows[0]
    for r in rows:
        r["cpu_vs_cp1"] = round(r["summed_cpu_s"] / base["summed_cpu_s"], 2)
        r["wall_vs_cp1"] = round(r["wall_s"] / base["wall_s"], 2)
        r["memory_vs_cp1"] = round(r["peak_mb_per_rank"] / base["peak_mb_per_rank"], 2)
    print(f"pe={args.pe} device={'cuda' if gpu else 'cpu'} dtype={args.dtype} seq={args.seq} "
          f"heads={args.heads} head_dim={args.head_dim} npos={args.npos} reps={args.reps} "
          "threads/rank=1")
    print(f"{'CP':>3} {'tokens/rank':>11} {'summed CPU s':>12} {'x CP1':>6} {'wall s':>8} "
          f"{'x CP1':>6} {'wait %':>6} {'peak MB/rank':>12} {'x CP1':>6}")
    for r in rows:
        print(f"{r['cp']:>3} {r['tokens_per_rank']:>11} {r['summed_cpu_s']:>12.3f} "
              f"{r['cpu_vs_cp1']:>6.2f} {r['wall_s']:>8.3f} {r['wall_vs_cp1']:>6.2f} "
              f"{100 * max(r['wait_frac_per_rank']):>6.1f} {r['peak_mb_per_rank']:>12.1f} "
              f"{r['memory_vs_cp1']:>6.2f}")
    print(json.dumps({"device": "cuda" if gpu else "cpu", "rows": rows}))


if __name__ == "__main__":
    main()
