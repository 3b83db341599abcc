"""Non-finite guard: a poisoned step applies nothing under every ZeRO stage, is counted
in the metrics, and too many in a row stop the run with one clear error."""

from __future__ import annotations

import json

import pytest
import torch

import cope_megatron.trainer as trainer_module
from cope_megatron.config import load_config
from cope_megatron.train import run_train
from cope_megatron.training.nonfinite import NonFiniteError
from tests.helpers import debug_overrides, forked_ranks, nan_loss_at, read_metrics


def poison(monkeypatch, steps: set[int]) -> list[list[torch.Tensor]]:
    """Make the loss NaN on ``steps`` (1-based; one micro batch per step) and snapshot the
    weights (this rank's partition under ZeRO-3) after every step."""
    snapshots, real_step = [], trainer_module.Trainer.train_step

    def train_step(self):
        loss = real_step(self)
        snapshots.append([getattr(p, "ds_tensor", p).detach().clone()
                          for p in self.engine.module.parameters()])
        return loss

    monkeypatch.setattr(trainer_module, "loss_sum", nan_loss_at(steps, trainer_module.loss_sum))
    monkeypatch.setattr(trainer_module.Trainer, "train_step", train_step)
    return snapshots


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_poisoned_step_applies_nothing_and_is_counted(prepared, tmp_path, monkeypatch,
                                                      dist_cleanup, stage):
    shards, _, _ = prepared
    snapshots = poison(monkeypatch, {3})
    cfg = load_config(debug_overrides(shards, tmp_path / "run", **{
        "train.steps": 5, "zero.stage": stage, "train.warmup_steps": 10}))
    result, _ = run_train(cfg, evaluate_after=False)
    assert [all(torch.equal(a, b) for a, b in zip(snapshots[i - 1], snapshots[i]))
            for i in range(1, 5)] == [False, True, False, False]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
               .splitlines()]
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1]
    # The schedule holds on a skipped step: warming up, step 4's lr is step 3's.
    lrs = [r["lr"] for r in records]
    assert lrs[2] == lrs[1] and lrs[3] > lrs[2]


def test_bad_steps_in_a_row_stop_with_a_clear_error(prepared, tmp_path, monkeypatch,
                                                    dist_cleanup):
    shards, _, _ = prepared
    poison(monkeypatch, {3, 4, 5})
    cfg = load_config(debug_overrides(shards, tmp_path / "run", **{
        "train.steps": 8, "train.save_interval": 2, "train.max_bad_steps": 3}))
    with pytest.raises(NonFiniteError) as err:
        run_train(cfg, evaluate_after=False)
    message = str(err.value)
    assert message.startswith("step 5:") and "step_00000002" in message  # before the streak
    assert "train.lr" in message and "bf16" in message


@pytest.mark.integration
@pytest.mark.parametrize("layout", [{"parallel.tensor": 2}, {"parallel.context": 2}],
                         ids=["tp2", "cp2"])
def test_a_rank_with_a_nan_makes_every_rank_skip_the_step(prepared, tmp_path, layout):
    """The loss is NaN on rank 1 alone at step 3: under TP=2 and CP=2 both ranks skip it,
    count it, and continue as one process that skipped it."""
    shards, _, _ = prepared

    def run(ranks: int, run_dir, **extra) -> list[dict]:
        args = debug_overrides(shards, run_dir, **{"train.steps": 5, **extra})
        forked_ranks(ranks, train_poisoned_on_last_rank, 3, args)
        return read_metrics(run_dir)

    want = run(1, tmp_path / "one")
    got = run(2, tmp_path / "two", **layout)
    assert [r["skipped_steps"] for r in got] == [r["skipped_steps"] for r in want] == \
        [0, 0, 1, 1, 1]
    for a, b in zip(got, want):
        if b["step"] != 3:  # the poisoned step's loss is NaN on one rank only
            assert abs(a["loss"] - b["loss"]) < 1e-5, (got, want)


def train_poisoned_on_last_rank(step: int, config: list[str]) -> None:
    """``cope-megatron train CONFIG`` on a forked rank, its loss NaN at ``step`` (1-based;
    one micro batch per step) on the last rank only."""
    import os

    from cope_megatron.train import main

    last = int(os.environ["RANK"]) == int(os.environ["WORLD_SIZE"]) - 1
    # This rank's process only: it exits after.
    trainer_module.loss_sum = nan_loss_at({step} if last else set(), trainer_module.loss_sum)
    main(config)
