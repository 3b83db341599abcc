"""Train (and evaluate) one run, or evaluate a trained one.

    python -m cope_megatron.train configs/model/debug.yaml configs/pe/rope.yaml train.steps=50
    torchrun --nproc-per-node 2 -m cope_megatron.train configs/model/debug.yaml parallel.tensor=2
"""

from __future__ import annotations

import sys

from cope_megatron.checkpoint import CheckpointError, checkpoint_dir
from cope_megatron.config import Config, load_config
from cope_megatron.distributed.parallel import (
    decided_by_main,
    destroy_distributed,
    world_size_from_env,
)
from cope_megatron.startup import check
from cope_megatron.trainer import Trainer, TrainResult, evaluator, start
from cope_megatron.training.engine import restore
from cope_megatron.training.resume import evaluated_tag


def run_train(cfg: Config, *, evaluate_after: bool = True) -> tuple[TrainResult, dict | None]:
    trainer = Trainer(cfg, check(cfg, world_size_from_env()))
    try:
        result = trainer.train()
        # A stopped run is evaluated when it finishes, after its resume.
        done = evaluate_after and result.stopped_by is None
        return result, trainer.evaluator.report(trainer.step) if done else None
    finally:
        trainer.close()


def run_eval(cfg: Config) -> dict:
    """Evaluate the latest checkpoint in ``run.dir`` (the run's own layout, or another),
    leaving the run directory as it was but for eval.json; no training data is read."""
    pe = check(cfg, world_size_from_env())
    if cfg.eval.harness_tasks:
        from cope_megatron.hf.harness import check_tasks

        check_tasks(cfg.eval.harness_tasks, cfg.eval.harness_include)
    env, manifest = start(cfg)
    tag = decided_by_main(lambda: evaluated_tag(cfg))
    engine, state = restore(cfg, pe, env, manifest, tag=tag)
    if state is None:
        raise CheckpointError(f"no checkpoint in {checkpoint_dir(cfg.run.dir)}; train first")
    runner = evaluator(cfg, engine, env, manifest)
    report = runner.report(state["step"])
    return runner.harness(report) if cfg.eval.harness_tasks else report


def train(cfg: Config) -> None:
    """``cope-megatron train``: one run, its process groups torn down after."""
    try:
        run_train(cfg)
    finally:
        destroy_distributed()


def main(argv: list[str] | None = None) -> None:
    train(load_config(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
