"""``cope-megatron`` command line: prep, train, eval, demo.

    cope-megatron prep  [--force] [CONFIG.yaml ...] [key.sub=value ...]
    cope-megatron prep  CONFIG... --parts N [--part I | --merge]   (prep across nodes: set-up
        on one node, then part I on each, then the merge; cope_megatron/data/prep/parts.py)
    cope-megatron train [CONFIG.yaml ...] [key.sub=value ...]   (plain or under torchrun)
    cope-megatron eval  [--json] [CONFIG.yaml ...] [key.sub=value ...]   (plain or torchrun)
    cope-megatron demo  [key.sub=value ...]
    cope-megatron report RUN_DIR... [--out DIR]   (tables and plots from finished runs)
    cope-megatron estimate [CONFIG.yaml ...] [key.sub=value ...] [--gpus N] [--gpu-memory GB]
        (parameters, FLOPs per token, memory per GPU, and whether the run fits)
    cope-megatron sweep SPEC.yaml [--run local|slurm]   (create the runs; run or submit them)
    cope-megatron sweep status SPEC.yaml | sweep report SPEC.yaml [--out DIR]
    cope-megatron export [--force] RUN_DIR OUT_DIR   (a Hugging Face transformers model
        directory)

prep and export refuse a non-empty output directory they did not write; --force writes
into it anyway.

With ``task.name`` set (configs/tasks/), prep generates that synthetic task instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import warnings
from pathlib import Path

from cope_megatron.config import Config, ConfigError, load_config
from cope_megatron.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEMO_CONFIGS = [str(CONFIG_DIR / "demo.yaml")]


def prep(cfg: Config, force: bool = False) -> dict:
    """Tokenize and pack ``data.corpus``, or generate the task ``task.name``; ``force``
    writes into a non-empty directory prep did not write."""
    if cfg.task.name:
        from cope_megatron.data.prep.tasks import prepare_task

        return prepare_task(cfg.task, cfg.data.shards, progress=cfg.logging.progress,
                            force=force)
    from cope_megatron.data.prep.prep import prepare

    return prepare(cfg.data, seq_len=cfg.model.seq_length, seed=cfg.train.seed,
                   progress=cfg.logging.progress, force=force)


def prep_parts(cfg: Config, args: argparse.Namespace) -> dict:
    """``prep --parts N``: the set-up, ``--part I`` or ``--merge`` (data/prep/parts.py)."""
    from cope_megatron.data.prep import parts

    if cfg.task.name:
        raise ConfigError("prep --parts: synthetic tasks (task.name) are prepared on one node")
    if args.part is not None and args.merge:
        raise ConfigError("prep: give --part I or --merge, not both")
    kw = {"seq_len": cfg.model.seq_length, "seed": cfg.train.seed, "parts": args.parts}
    if args.merge:
        manifest = parts.merge(cfg.data, **kw)
        return {s: v["samples"] for s, v in manifest["splits"].items()}
    if args.part is not None:
        record = parts.prepare_part(cfg.data, part=args.part, progress=cfg.logging.progress,
                                    **kw)
        return {s: len(v["shards"]) for s, v in record["splits"].items()}
    return {"tokenizer": str(parts.setup(cfg.data, force=args.force, **kw))}


def demo(cfg: Config, force: bool = False) -> dict:
    """Prep the default corpus, train the demo model, evaluate it; print where it all is."""
    from cope_megatron.distributed.parallel import destroy_distributed
    from cope_megatron.train import run_train

    started = time.time()
    manifest = prep(cfg, force)
    train = manifest["splits"]["train"]
    print(f"[demo] data: {train['samples']} train samples ({train['tokens']:,} tokens) in "
          f"{cfg.data.shards}, vocab {manifest['vocab_size']}")
    try:
        result, report = run_train(cfg)
    finally:
        destroy_distributed()
    wall = time.time() - started
    if report is None:  # stopped by a signal, checkpoint saved: the rerun finishes
        return {"wall_s": wall, "stopped_by": result.stopped_by}
    first, last = result.losses[0] if result.losses else float("nan"), result.losses[-1]
    print(f"[demo] trained {result.step} steps in {wall:.0f} s: loss {first:.3f} -> {last:.3f}")
    for length, r in report["lengths"].items():
        shown = f"ppl {r['ppl']:.2f}" if "ppl" in r else r["status"]
        print(f"[demo] held-out at length {length}: {shown}")
    print(f"[demo] outputs in {result.run_dir}/: config.yaml, metrics.jsonl, eval.json, "
          "checkpoints/")
    return {"wall_s": wall, "first_loss": first, "final_loss": last, "eval": report}


def sweep(args: argparse.Namespace) -> Path | None:
    """``sweep SPEC``, ``sweep status SPEC``, ``sweep report SPEC``."""
    from cope_megatron.launch import sweep as sw

    action, *spec_path = args.sources if args.sources[:1] in (["status"], ["report"]) \
        else ["create", *args.sources]
    if len(spec_path) != 1:
        raise ConfigError("sweep: give one spec file (sweep [status|report] SPEC.yaml)")
    spec = sw.load_spec(spec_path[0])
    if action == "status":
        print(sw.status_table(sw.runs(spec)))
        return None
    if action == "report":
        from cope_megatron.report import write_report

        done = [r.dir for r in sw.runs(spec) if sw.status(r)[0] == "done"]
        return write_report(done, args.out or Path(spec.out) / "report")
    runs = sw.create(spec)
    if args.run == "local":
        sw.run_local(spec, runs)
    elif args.run == "slurm":
        sw.submit_slurm(spec, runs)
    else:
        for run in runs:
            print((run.dir / "command.sh").read_text(), end="")
    print(sw.status_table(runs))
    return None


@contextlib.contextmanager
def logs_to_stderr(enabled: bool):
    """Point file descriptor 1 at stderr: DeepSpeed and Megatron log through handlers that
    hold the original stdout, so only a descriptor-level switch keeps stdout clean."""
    if not enabled:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cope-megatron", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command",
                        choices=["prep", "train", "eval", "demo", "report", "estimate",
                                 "sweep", "export"])
    parser.add_argument("sources", nargs="*", help="YAML config files and key.sub=value "
                        "overrides (report: run directories)")
    parser.add_argument("--json", action="store_true",
                        help="eval: stdout holds only the report's JSON; every log goes to stderr")
    parser.add_argument("--out", default=None,
                        help="report: directory to write into (default reports/<time>)")
    parser.add_argument("--run", choices=["local", "slurm"], default=None,
                        help="sweep: train the runs here one after another, or sbatch them "
                        "(default: only create them)")
    parser.add_argument("--force", action="store_true",
                        help="prep, demo, export: write into a non-empty output directory "
                        "that is not a previous prep or export")
    parser.add_argument("--parts", type=int, default=None,
                        help="prep across nodes in N parts: alone, the set-up (tokenizer); "
                        "with --part I, part I; with --merge, the final manifest")
    parser.add_argument("--part", type=int, default=None, help="prep: the part to prep")
    parser.add_argument("--merge", action="store_true",
                        help="prep: merge the finished --parts into the data set")
    parser.add_argument("--gpus", type=int, default=8,
                        help="estimate: GPUs in the run (default 8)")
    parser.add_argument("--gpu-memory", type=float, default=None,
                        help="estimate: memory per GPU in GiB (default 80)")
    args = parser.parse_intermixed_args(argv)
    # Known-harmless start-up noise (no Apex/TE on this machine, deprecated collectives
    # inside DeepSpeed); the run's own warnings still show.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(deepspeed|torch)\.")
    with logs_to_stderr(args.json):  # from the first import: DeepSpeed logs on import
        try:
            report = run(args)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:  # outside training's own Ctrl-C handling
            print("error: interrupted (Ctrl-C); checkpoints already written are intact",
                  file=sys.stderr)
            return 130
    if isinstance(report, Path):
        print(report)
    elif report is not None and int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(report, indent=1), flush=True)
    return 0


def run(args: argparse.Namespace) -> dict | Path | None:
    """Run one command; eval returns its report, report its path (printed by ``main``)."""
    if args.command == "report":
        from cope_megatron.report import write_report

        out = args.out or f"reports/{time.strftime('%Y%m%d-%H%M%S')}"
        return write_report(args.sources, out)
    if args.command == "sweep":
        return sweep(args)
    if args.command == "export":
        from cope_megatron.hf.export import export

        if len(args.sources) != 2:
            raise ConfigError("export: give RUN_DIR OUT_DIR")
        return export(*args.sources, force=args.force)
    sources = (DEMO_CONFIGS if args.command == "demo" else []) + args.sources
    cfg = load_config(sources)
    if args.command == "estimate":
        from cope_megatron.estimate import estimate, summary
        from cope_megatron.startup import check

        est = estimate(cfg, check(cfg, args.gpus, data=False), args.gpus, args.gpu_memory)
        print(summary(est, peak_tflops=cfg.train.peak_tflops))
    elif args.command == "prep" and args.parts is not None:
        return prep_parts(cfg, args)
    elif args.command == "prep":
        if args.part is not None or args.merge:
            raise ConfigError("prep: --part and --merge need --parts N")
        manifest = prep(cfg, args.force)
        skipped = manifest.get("skipped_rows")
        print(f"prepared {cfg.data.shards}: " + ", ".join(
            f"{s}: {v['samples']} samples" for s, v in manifest["splits"].items()) + (
            "; rows without text skipped: " + ", ".join(
                f"{n} {kind.removesuffix('_rows')}" for kind, n in skipped.items())
            if skipped else ""))
    elif args.command == "train":
        from cope_megatron.train import train

        train(cfg)
    elif args.command == "eval":
        from cope_megatron.distributed.parallel import destroy_distributed
        from cope_megatron.train import run_eval

        try:
            return run_eval(cfg)
        finally:
            destroy_distributed()
    else:
        demo(cfg, args.force)
    return None


if __name__ == "__main__":
    sys.exit(main())
