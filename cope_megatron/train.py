"""Train (and evaluate) one run.

    python -m cope_megatron.train configs/model/debug.yaml configs/pe/rope.yaml train.steps=50
    torchrun --nproc-per-node 2 -m cope_megatron.train configs/model/debug.yaml parallel.tensor=2
"""

from __future__ import annotations

import sys

from cope_megatron.config import Config, load_config, validate, validate_data_path
from cope_megatron.distributed.parallel import destroy_distributed, world_size_from_env
from cope_megatron.pe import get_pe
from cope_megatron.trainer import Trainer, TrainResult


def check(cfg: Config) -> None:
    """Every start-up check, before any process group or model is built."""
    get_pe(cfg.model.pe)
    validate(cfg, world_size_from_env())
    validate_data_path(cfg)


def run_train(cfg: Config, *, evaluate_after: bool = True) -> tuple[TrainResult, dict | None]:
    check(cfg)
    trainer = Trainer(cfg)
    try:
        result = trainer.train()
        # A stopped run is evaluated when it finishes, after its resume.
        done = evaluate_after and result.stopped_by is None
        return result, trainer.evaluate() if done else None
    finally:
        trainer.close()


def run_eval(cfg: Config) -> dict:
    """Evaluate the latest checkpoint in ``run.dir`` (the run's own layout)."""
    check(cfg)
    trainer = Trainer(cfg, eval_only=True)
    try:
        if trainer.step == 0:
            raise FileNotFoundError(f"no checkpoint in {cfg.run.dir}/checkpoints; train first")
        report = trainer.evaluate()
        return trainer.harness(report) if cfg.eval.harness_tasks else report
    finally:
        trainer.close()


def main(argv: list[str] | None = None) -> None:
    cfg = load_config(sys.argv[1:] if argv is None else argv)
    try:
        run_train(cfg)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
