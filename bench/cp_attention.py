"""Benchmark attention under context parallelism: per-rank peak memory, summed CPU time,
wall time and the share of it spent waiting on the ring's exchanges (GPU: per-rank peak
memory and wall time) of one forward+backward over a fixed total sequence, for CP = 1, 2,
4 ranks, for CoPE, RoPE (plain softmax attention: the rotation is outside it), ALiBi or
stick-breaking (no softmax: each row's survival carried across ranks).

    python bench/cp_attention.py [--pe cope] [--seq 8192] [--cps 1 2 4] [--reps 3]
                                 [--rounds 1] [--gates dense|sparse|trained --run DIR --layer N]

CP = 1 is the path a model without CP takes: ``cope_attention``, or the PE's attention
module (SDPA; for ALiBi SDPA with the [h, s, s] bias materialized, what training runs on
CPU; stick-breaking's chunked op). CP > 1 is ``ops.context_parallel`` (CoPE's,
stick-breaking's, or the softmax ring) over gloo processes
(NCCL, one GPU each, when as many GPUs as ranks exist). Each rank runs one thread, so
summed CPU time is the total compute, exchange included, whatever the machine's core count;
wall time means something only with a core per rank. More ranks than cores also costs
CPU time by itself: time-sliced processes lose their caches (four copies of the CP = 1 op
on two cores each took 10-15 % more CPU than one alone; two did not). So where ranks
outnumber cores, the same number of processes also run the CP = 1 op on the whole sequence
together, and ``same load`` is summed CPU over that op's CPU under the same load: the
exchange and the extra work of the split, without the machine's oversubscription (where
ranks have a core each it is ``x CP1``). The control's processes never wait, where CP's
ranks wait a few per cent of the time, so it may feel the time-slicing more: ``same load``
is a lower bound on CP's own overhead, ``x CP1`` an upper one. ``wait %``: per rank, the time inside
the ring's ``req.wait()`` over its wall time, the largest of the ranks. Memory is the peak
growth during one fwd+bwd above the inputs (CPU: VmHWM with glibc returning large blocks at
free, measured in a separate launch because that setting slows allocation; GPU:
max_memory_allocated). Times are medians over every round's repetitions (``--rounds``: each CP
size launched in turn, so that the machine's drift over minutes falls on all alike). Prints a
table and, last, one JSON line.

CoPE's saturation skip (``--gates``: the regimes of ``bench/cope_op.py``, trained ones from
a run's layer): ``band %`` is the share of the causal logits that run CoPE's gate and
position math in the attention pass, at each row group's recorded band width (the backward
recomputes the same bands; the forward's narrower first tries are not counted); the rest
are clamped keys, plain attention with one added logit. ``gates %`` is the share the
ring's gate-total pass computes (CP > 1: rows not yet clamped by nearer chunks, in key
blocks from the nearest back, until the block of rows clamps). Both are counted from what
the op computes, summed over the ranks.
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
from cope_megatron.ops.context_parallel import cope as cp_cope
from cope_megatron.ops.context_parallel.cope import cope_attention_context_parallel
from cope_megatron.ops.context_parallel.ring import ContextParallel
from cope_megatron.ops.cope import chunked
from cope_megatron.pe import get_pe
from cope_megatron.pe.base import AttentionShape

sys.path.insert(0, os.path.dirname(__file__))
from cope_op import case_inputs, measure  # noqa: E402


class LogitCounter:
    """Counts the logits CoPE's math computes, by wrapping the chunked op's pair function
    and the gates of the ring's gate totals (which stop a row block once it clamps), while
    it is ``on`` (the warm-up run)."""

    def __init__(self) -> None:
        self.band = self.gates = 0
        self.on = self._in_sums = False
        forward, sums, gates = chunked.chunk_forward, cp_cope.gate_sums, cp_cope.row_gates

        def counted_forward(q, k, *args, causal, bands=None, **kwargs):
            bands = [] if bands is None else bands
            first = len(bands)
            result = forward(q, k, *args, causal=causal, bands=bands, **kwargs)
            if self.on:
                self.band += sum(_logits(r0, r1, min(w, k.shape[2]), causal)
                                 for r0, r1, w in bands[first:])
            return result

        def counted_sums(*args, **kwargs):
            self._in_sums = True
            try:
                return sums(*args, **kwargs)
            finally:
                self._in_sums = False

        def counted_gates(q, k, rows, **kwargs):
            if self.on and self._in_sums:
                self.gates += rows.numel() * k.shape[2]  # the block's whole q·kᵀ
            return gates(q, k, rows, **kwargs)

        chunked.chunk_forward = counted_forward
        cp_cope.gate_sums, cp_cope.row_gates = counted_sums, counted_gates


def _logits(r0: int, r1: int, width: int, causal: bool) -> int:
    """Logits of rows r0…r1−1 in a band of ``width`` keys (causal: row i has i + 1 keys)."""
    if not causal:
        return (r1 - r0) * width
    whole = max(min(r1, width), r0)  # rows r0…whole−1 see all their i + 1 keys in the band
    return (whole * (whole + 1) - r0 * (r0 + 1)) // 2 + width * (r1 - whole)


def _rank(rank: int, world: int, store: str, args, out: str, inputs: str,
          control: bool = False) -> None:
    """One rank's timings. ``control``: every rank runs the CP = 1 op on the whole
    sequence, together (``same_load``)."""
    torch.set_num_threads(1)
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{store}",
                                rank=rank, world_size=world)
        cp = ContextParallel(dist.group.WORLD)
    split = world > 1 and not control
    dtype = getattr(torch, args.dtype)
    case = torch.load(inputs)
    full, table = case["qkvg"], case["table"].to(device, dtype)
    if split:
        c = args.seq // (2 * world)
        full = [torch.cat([t[:, :, i * c:(i + 1) * c] for i in cp.chunks(rank)], 2)
                for t in full]
    q, k, v, grad = (t.to(device, dtype) for t in full)
    for t in (q, k, v, table):
        t.requires_grad_()
    heads, head_dim, npos, scale = q.shape[1], q.shape[3], case["npos_max"], case["scale"]
    counter = LogitCounter()

    shape = AttentionShape.of_rank(total_heads=heads, total_kv_heads=k.shape[1],
                                   head_dim=head_dim)
    module = None if args.pe == "cope" else get_pe(args.pe).attention(
        shape, PEConfig(bias_kernel="materialized")).to(device, dtype)

    def run() -> None:
        if module is not None:
            out = module(q, k, v, cp if split else None)
        elif split:
            out = cope_attention_context_parallel(q, k, v, table, cp, npos_max=npos,
                                                  softmax_scale=scale)
        else:
            out = cope_attention(q, k, v, table, npos_max=npos, softmax_scale=scale)
        out.backward(grad)
        for t in (q, k, v, table):
            t.grad = None

    counter.on = True
    run()  # warm-up (compilation, allocator, connections), and the logits CoPE's math touches
    counter.on = False
    records = []
    for _ in range(args.reps):
        if world > 1:
            dist.barrier()
        cpu, waited = time.process_time(), cp.wait_seconds if split else 0.0
        wall, peak = measure(run, device)
        records.append({"cpu_s": time.process_time() - cpu, "wall_s": wall, "peak_mb": peak,
                        "wait_s": (cp.wait_seconds if split else 0.0) - waited})
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"reps": records, "band": counter.band, "gates": counter.gates}, f)
    if world > 1:
        dist.destroy_process_group()


def launch(world: int, args, inputs: str, control: bool = False) -> list[dict]:
    """Per rank: per repetition cpu_s, wall_s, peak_mb ("reps"), and its CoPE logit counts."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result")
        mp.spawn(_rank, args=(world, os.path.join(tmp, "store"), args, out, inputs, control),
                 nprocs=world)
        ranks = []
        for r in range(world):
            with open(f"{out}.{r}") as f:
                ranks.append(json.load(f))
        return ranks


def save_inputs(args, path: str) -> str:
    """q, k, v, the output gradient and the table of the whole sequence, for every rank;
    returns their shape, for the table's header."""
    case, options = case_inputs(args.seq, args.gates, args)
    q, k, v, table = case
    gen = torch.Generator().manual_seed(1)
    npos = options.get("npos_max", table.shape[-1])
    torch.save({"qkvg": [q, k, v, torch.randn(q.shape, generator=gen)], "table": table,
                "npos_max": npos,
                "scale": options.get("softmax_scale", q.shape[-1] ** -0.5)}, path)
    return f"heads={q.shape[1]} head_dim={q.shape[3]} npos={npos}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pe", choices=["cope", "rope", "alibi", "stickbreaking"],
                        default="cope")
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--cps", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1,
                        help="launches of every CP size in turn, pooled (the machine drifts)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--npos", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--gates", choices=["dense", "sparse", "trained"], default="dense")
    parser.add_argument("--run", help="a trained CoPE run directory, for --gates trained")
    parser.add_argument("--layer", type=int, default=0, help="its layer, for --gates trained")
    args = parser.parse_args()
    if args.gates == "trained" and not args.run:
        parser.error("--gates trained needs --run RUN_DIR (a trained CoPE run)")
    gpu = torch.cuda.is_available()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        inputs = os.path.join(tmp, "inputs.pt")
        shape = save_inputs(args, inputs)
        # Rounds of every CP size in turn: the machine's speed drifts over minutes, and
        # interleaving gives each size the same drift.
        found = {world: [] for world in args.cps}
        for _ in range(args.rounds):
            for world in args.cps:
                found[world].append(timings(world, args, inputs, gpu))
        for world in args.cps:
            # On CPU in a launch of its own, with glibc returning freed blocks: a setting
            # that slows allocation, so not while timing.
            peak = (max(f["peak"] for f in found[world]) if gpu
                    else peak_memory(world, args, inputs))
            rows.append(layout_row(world, args, found[world], peak))
    base = rows[0]
    for r in rows:
        r["cpu_vs_cp1"] = round(r["summed_cpu_s"] / base["summed_cpu_s"], 2)
        r["cpu_vs_cp1_per_round"] = [round(a / b, 2) for a, b in zip(
            r["summed_cpu_s_per_round"], base["summed_cpu_s_per_round"])]
        r["cpu_vs_cp1_same_load"] = same_load_ratio(r, base)
        r["wall_vs_cp1"] = round(r["wall_s"] / base["wall_s"], 2)
        r["memory_vs_cp1"] = round(r["peak_mb_per_rank"] / base["peak_mb_per_rank"], 2)
    print(f"pe={args.pe} gates={args.gates} device={'cuda' if gpu else 'cpu'} "
          f"dtype={args.dtype} seq={args.seq} {shape} reps={args.reps}x{args.rounds} "
          "threads/rank=1"
          + (f" (trained: {args.run} layer {args.layer})" if args.gates == "trained" else ""))
    print(f"{'CP':>3} {'tokens/rank':>11} {'summed CPU s':>12} {'x CP1':>6} {'same load':>9} "
          f"{'wall s':>8} {'x CP1':>6} {'wait %':>6} {'peak MB/rank':>12} {'x CP1':>6} "
          f"{'band %':>7} {'gates %':>7}")
    for r in rows:
        print(f"{r['cp']:>3} {r['tokens_per_rank']:>11} {r['summed_cpu_s']:>12.3f} "
              f"{r['cpu_vs_cp1']:>6.2f} {r['cpu_vs_cp1_same_load']:>9.2f} "
              f"{r['wall_s']:>8.3f} {r['wall_vs_cp1']:>6.2f} "
              f"{100 * max(r['wait_frac_per_rank']):>6.1f} {r['peak_mb_per_rank']:>12.1f} "
              f"{r['memory_vs_cp1']:>6.2f} {r['band_pct']:>7.1f} {r['gates_pct']:>7.1f}")
    print(json.dumps({"device": "cuda" if gpu else "cpu", "gates": args.gates, "rows": rows}))


def timings(world: int, args, inputs: str, gpu: bool) -> dict:
    """One launch of a CP size: per repetition the summed CPU, the slowest rank's wall time,
    each rank's share of it spent waiting and, where ranks outnumber cores, the CP = 1 op's
    CPU under the same load (a second launch); its CoPE logit counts and peak memory (what
    the GPU allocator reports; on CPU see ``peak_memory``)."""
    ranks = launch(world, args, inputs)
    reps = range(args.reps)
    found = {"cpu": [sum(r["reps"][i]["cpu_s"] for r in ranks) for i in reps],
             "wall": [max(r["reps"][i]["wall_s"] for r in ranks) for i in reps],
             "waits": [[rep["wait_s"] / rep["wall_s"] for rep in r["reps"]] for r in ranks],
             "band": sum(r["band"] for r in ranks), "gates": sum(r["gates"] for r in ranks),
             "peak": max(max(rep["peak_mb"] for rep in r["reps"]) for r in ranks),
             "same_load": []}
    if not gpu and oversubscribed(world):
        control = launch(world, args, inputs, control=True)
        found["same_load"] = [statistics.mean(r["reps"][i]["cpu_s"] for r in control)
                              for i in reps]
    return found


def peak_memory(world: int, args, inputs: str) -> float:
    """Peak RSS growth in MB over the ranks and repetitions, in a launch with glibc
    returning large blocks at free."""
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        ranks = launch(world, args, inputs)
    finally:
        del os.environ["MALLOC_MMAP_THRESHOLD_"]
    return max(max(rep["peak_mb"] for rep in r["reps"]) for r in ranks)


def oversubscribed(world: int) -> bool:
    """Whether ``world`` one-thread ranks outnumber the cores this process may use: then a
    same-load control runs beside the timed launch."""
    return world > len(os.sched_getaffinity(0))


def pooled_times(rounds: list[dict]) -> dict:
    """A CP size's times from its rounds (each with per-repetition "cpu", "wall" and
    "same_load", the last empty where no control ran): medians over every repetition, and
    each round's CPU median."""
    pooled = {key: [x for found in rounds for x in found[key]]
              for key in ("cpu", "wall", "same_load")}
    return {"summed_cpu_s": round(statistics.median(pooled["cpu"]), 3),
            "summed_cpu_s_per_round": [round(statistics.median(f["cpu"]), 3) for f in rounds],
            "cp1_cpu_s_same_load": (round(statistics.median(pooled["same_load"]), 3)
                                    if pooled["same_load"] else None),
            "wall_s": round(statistics.median(pooled["wall"]), 3)}


def same_load_ratio(row: dict, base: dict) -> float:
    """Summed CPU over the CP = 1 op's under the same load (over CP = 1 alone where no
    control ran: ranks with a core each)."""
    return round(row["summed_cpu_s"] / (row["cp1_cpu_s_same_load"] or base["summed_cpu_s"]), 2)


def layout_row(world: int, args, rounds: list[dict], peak: float) -> dict:
    """One CP size's row: medians over every round's repetitions."""
    waits = [statistics.median(w for found in rounds for w in found["waits"][rank])
             for rank in range(world)]
    causal = args.seq * (args.seq + 1) / 2
    return {"pe": args.pe, "gates": args.gates, "cp": world, "seq": args.seq,
            "tokens_per_rank": args.seq // world, **pooled_times(rounds),
            "peak_mb_per_rank": round(peak, 1),
            "wait_frac_per_rank": [round(w, 4) for w in waits],
            "band_pct": round(100 * rounds[0]["band"] / causal, 2),
            "gates_pct": round(100 * rounds[0]["gates"] / causal, 2)}


if __name__ == "__main__":
    main()
