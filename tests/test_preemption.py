"""Runs that survive a cluster: a stop signal (SIGTERM, SIGUSR1) ends the run after its
step with a checkpoint and exit 0, a second one during the save harms nothing, and the
resumed run continues exactly; retention keeps the newest complete checkpoints; in-run
validation reaches the metrics."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest

from cope_megatron.cli import main as cli
from cope_megatron.config import load_config
from cope_megatron.train import run_train
from tests.helpers import debug_overrides, fork, losses, wait_for_steps


def start(shards, run_dir, **extra):
    """``cope-megatron train`` for 30 steps in a process of its own (forked: a signal
    reaches it as it would reach the command); its output goes to ``run_dir``.log."""
    args = debug_overrides(shards, run_dir, **{"train.steps": 30, **extra})
    return fork(cli, ["train", *args], log=f"{run_dir}.log")


def finish(proc, run_dir) -> str:
    """Wait for ``proc`` to end; its output, asserted to end with exit 0."""
    proc.join(600)
    out = Path(f"{run_dir}.log").read_text()
    assert proc.exitcode == 0, out[-3000:]
    return out


@pytest.fixture(scope="module")
def straight(prepared, tmp_path_factory):
    """The losses of the 30-step run without a stop, which each stopped run must match."""
    run = tmp_path_factory.mktemp("straight") / "run"
    finish(start(prepared[0], run), run)
    return losses(run)


@pytest.mark.integration
@pytest.mark.parametrize("sig, twice", [(signal.SIGTERM, True), (signal.SIGUSR1, False)])
def test_stop_signal_saves_exits_zero_and_resumes_exactly(prepared, straight, tmp_path, sig,
                                                          twice):
    shards, _, _ = prepared

    run = tmp_path / "stopped"
    args = debug_overrides(shards, run, **{"train.steps": 30})
    proc = fork(train_saving_on_cue, args, tmp_path, log=f"{run}.log")
    wait_for_steps(proc, run, random.Random(sig).randint(2, 8))
    os.kill(proc.pid, sig)
    if twice:  # the second lands during the save the first one asked for
        deadline = time.time() + 60
        while not (tmp_path / "saving").exists():
            assert time.time() < deadline and proc.is_alive()
            time.sleep(0.01)
        os.kill(proc.pid, sig)
        time.sleep(0.1)  # delivered before the save goes on
    (tmp_path / "go").touch()
    out = finish(proc, run)
    step = len(losses(run))
    assert f"stopped by {sig.name} after step {step}" in out
    assert (run / "checkpoints" / "latest").read_text() == f"step_{step:08d}"
    assert step < 30 and not (run / "eval.json").exists()

    finish(start(shards, run), run)
    assert losses(run) == straight
    assert (run / "eval.json").exists()


def train_saving_on_cue(args: list[str], cues) -> int:
    """``cope-megatron train ARGS`` (on a forked process) whose save after a stop signal
    announces itself (``cues``/saving) and waits for ``cues``/go: a second signal is then
    sent inside the save, not after the process has gone."""
    from cope_megatron import trainer as trainer_module

    save = trainer_module.Trainer.save

    def save_on_cue(self) -> str:
        if self.preemption.received:
            (cues / "saving").touch()
            deadline = time.monotonic() + 60
            while not (cues / "go").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        return save(self)

    trainer_module.Trainer.save = save_on_cue  # this process's: it exits after
    return cli(["train", *args])


def test_retention_keeps_the_newest_complete_checkpoints(prepared, tmp_path, dist_cleanup):
    shards, _, _ = prepared
    root = tmp_path / "run" / "checkpoints"
    root.mkdir(parents=True)
    half = root / "step_00000099"  # left by a run killed inside a save
    half.mkdir()
    cfg = load_config(debug_overrides(shards, tmp_path / "run", **{
        "train.steps": 5, "train.save_interval": 1, "train.keep_checkpoints": 2,
        "eval.interval": 2}))
    run_train(cfg, evaluate_after=False)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000004", "step_00000005"]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
               .splitlines()]
    validated = [r["step"] for r in records if "val_loss" in r]
    assert validated == [2, 4]
    assert all(r["val_ppl"] > 1 for r in records if "val_ppl" in r)
