"""Benchmark a whole training step under context parallelism (issue 34, items 1 and 4):
forward and backward of the debug model's LM loss on one sequence of S tokens, for each PE,
length and CP size: per-rank peak memory above the inputs, summed CPU time and wall time,
each beside CP = 1 of the same PE and length in the same run.

    python bench/cp_step.py [--pes cope rope] [--seqs 8192 16384] [--cps 1 2 4]
                            [--reps 1] [--rounds 1]

The model is ``configs/model/debug.yaml`` (2 layers, hidden 64, 4 heads; CoPE npos 64)
built by ``model.gpt.build_gpt`` exactly as training builds it, on gloo ranks of one thread
each (summed CPU time is the total compute, exchange included; wall time means something
only with a core per rank). Memory is VmHWM growth during the step, with glibc returning
freed blocks (``MALLOC_MMAP_THRESHOLD_``), in the launch that also times it. Times are
medians over every round's repetitions (``--rounds``: each CP size launched in turn, so
that the machine's drift over minutes falls on all alike). Where ranks outnumber cores, as
many processes also run the CP = 1 step together, and ``same load`` is CP's summed CPU
over that step's mean CPU per process: the split's own cost without the machine's
time-slicing (``bench/cp_attention.py`` says why that is a lower bound, ``x CP1`` an upper
one; on a machine that drifts, use ``--rounds``: one round can invert them). Prints a
table and, last, one JSON line.
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
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
from cope_op import measure  # noqa: E402
from cp_attention import oversubscribed, pooled_times, same_load_ratio  # noqa: E402

VOCAB = 512


def _rank(rank: int, world: int, port: int, pe: str, seq: int, reps: int, out: str,
          control: bool) -> None:
    """One rank's step. ``control``: a process of its own (a world of one) training the
    CP = 1 model on the whole sequence beside the others."""
    cp = 1 if control else world
    if not control:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from cope_megatron.config import load_config
    from cope_megatron.distributed.parallel import init_distributed, seed_everything
    from cope_megatron.model.gpt import build_gpt, lm_loss
    from cope_megatron.pe import model_pe

    cfg = load_config(["configs/model/debug.yaml", f"model.pe={pe}", f"model.seq_length={seq}",
                       "pe.cope.npos_max=64", f"parallel.context={cp}"])
    init_distributed(1, cp)
    seed_everything(1)
    model = build_gpt(cfg, model_pe(cfg.model), VOCAB)
    tokens = torch.randint(0, VOCAB, (1, seq + 1), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        lm_loss(model, tokens).backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up: connections, allocator
    records = []
    for _ in range(reps):
        cpu = time.process_time()
        wall, peak = measure(step, torch.device("cpu"))
        records.append({"cpu_s": time.process_time() - cpu, "wall_s": wall, "peak_mb": peak})
    with open(f"{out}.{rank}", "w") as f:
        json.dump(records, f)


def launch(world: int, pe: str, seq: int, reps: int, port: int, control: bool = False
           ) -> list[list[dict]]:
    """Per rank, per repetition: cpu_s, wall_s, peak_mb."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result")
        mp.spawn(_rank, args=(world, port, pe, seq, reps, out, control), nprocs=world)
        return [json.load(open(f"{out}.{r}")) for r in range(world)]


def measure_layout(world: int, pe: str, seq: int, reps: int, port: int) -> dict:
    """One launch of a CP size, and where its ranks outnumber the cores the CP = 1 step
    under the same load: per repetition summed CPU, slowest wall, largest peak."""
    ranks = launch(world, pe, seq, reps, port)
    found = {"cpu": [sum(r[i]["cpu_s"] for r in ranks) for i in range(reps)],
             "wall": [max(r[i]["wall_s"] for r in ranks) for i in range(reps)],
             "peak": max(rep["peak_mb"] for r in ranks for rep in r), "same_load": []}
    if oversubscribed(world):
        control = launch(world, pe, seq, reps, port, control=True)
        found["same_load"] = [statistics.mean(r[i]["cpu_s"] for r in control)
                              for i in range(reps)]
    return found


def layout_row(pe: str, seq: int, world: int, rounds: list[dict]) -> dict:
    """One CP size's row: medians over every round's repetitions."""
    return {"pe": pe, "seq": seq, "cp": world, **pooled_times(rounds),
            "peak_mb_per_rank": round(max(f["peak"] for f in rounds), 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pes", nargs="+", default=["cope", "rope"])
    parser.add_argument("--seqs", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--cps", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1,
                        help="launches of every CP size in turn, pooled (the machine drifts)")
    args = parser.parse_args()
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    rows, port = [], 29650
    for pe in args.pes:
        for seq in args.seqs:
            found = {world: [] for world in args.cps}
            for _ in range(args.rounds):
                for world in args.cps:
                    port += 1
                    found[world].append(measure_layout(world, pe, seq, args.reps, port))
            first = None
            for world in args.cps:
                row = layout_row(pe, seq, world, found[world])
                first = first or row
                for key, name in (("summed_cpu_s", "cpu"), ("wall_s", "wall"),
                                  ("peak_mb_per_rank", "memory")):
                    row[f"{name}_vs_cp1"] = round(row[key] / first[key], 2)
                row["cpu_vs_cp1_same_load"] = same_load_ratio(row, first)
                rows.append(row)
    print("whole step (debug model, fwd + bwd of the LM loss, 1 sequence), CPU, 1 thread/rank, "
          f"reps={args.reps}x{args.rounds}")
    print(f"{'pe':<6}{'seq':>7}{'CP':>4}{'summed CPU s':>14}{'x CP1':>7}{'same load':>10}"
          f"{'wall s':>9}{'x CP1':>7}{'peak MB/rank':>14}{'x CP1':>7}")
    for r in rows:
        print(f"{r['pe']:<6}{r['seq']:>7}{r['cp']:>4}{r['summed_cpu_s']:>14.3f}"
              f"{r['cpu_vs_cp1']:>7.2f}{r['cpu_vs_cp1_same_load']:>10.2f}{r['wall_s']:>9.3f}"
              f"{r['wall_vs_cp1']:>7.2f}{r['peak_mb_per_rank']:>14.1f}{r['memory_vs_cp1']:>7.2f}")
    print(json.dumps({"device": "cpu", "rows": rows}))


if __name__ == "__main__":
    main()
