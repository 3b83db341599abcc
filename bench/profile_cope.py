"""Where the CoPE op's time goes: device time per kernel over forward+backward, from
torch.profiler, beside SDPA for scale.

    python -m bench.profile_cope [--seq 8192] [--heads 16] [--head-dim 128] [--impl triton]
        [--gates dense]

Prints the profiler's kernel table (sorted by total device time) and, last, a JSON line
with each kernel's milliseconds per call of the op.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.profiler import ProfilerActivity, profile

from bench.cope_op import add_shape_args, case_inputs, make_case


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=8192)
    add_shape_args(parser, heads=16, head_dim=128)
    parser.add_argument("--impl", default="triton")
    parser.add_argument("--gates", default="dense", choices=["dense", "sparse"])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    inputs = case_inputs(args.seq, args.gates, args)
    runs = [make_case(impl, args.seq, args.gates, args, device, inputs)
            for impl in (args.impl, "sdpa")]

    def both():
        for run in runs:
            run()

    both()  # compile
    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        for _ in range(args.reps):
            both()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(events.table(sort_by=sort, row_limit=25, max_name_column_width=60))
    attr = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    per_call = {e.key[:80]: getattr(e, attr) / 1e3 / args.reps for e in events
                if getattr(e, attr) > 0}
    print(json.dumps({"seq": args.seq, "impl": args.impl, "gates": args.gates,
                      "ms_per_call": dict(sorted(per_call.items(), key=lambda kv: -kv[1])[:25])}))


if __name__ == "__main__":
    main()
