"""Run guards (issue 27): one training per run directory (a lock naming its holder, taken
over from a dead one), and Ctrl-C handled like SIGTERM, a second one exiting at once."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cope_megatron.checkpoint import resumable_tag
from cope_megatron.training.run_lock import LOCK, RunLock, RunLockError
from tests.helpers import debug_overrides, fork, losses, train_here, wait_for_steps

ROOT = Path(__file__).resolve().parents[1]
# The threads of this process: a run here and one there compute the same losses.
ENV = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": str(ROOT)}
HOLDER = ("import sys, time\nfrom cope_megatron.training.run_lock import RunLock\n"
          "RunLock(sys.argv[1]).acquire()\nprint('held', flush=True)\ntime.sleep(300)\n")


def test_one_lock_per_run_dir_within_a_process(tmp_path):
    first = RunLock(tmp_path)
    assert first.acquire() is None
    with pytest.raises(RunLockError, match=f"pid {os.getpid()}"):
        RunLock(tmp_path).acquire()
    first.release()
    assert not (tmp_path / LOCK).exists()
    again = RunLock(tmp_path)
    assert again.acquire() is None  # released cleanly: nothing to take over
    again.release()


def test_a_second_training_stops_naming_the_first_and_a_dead_ones_lock_is_taken_over(
        prepared, tmp_path, capsys):
    shards = prepared[0]
    straight = train_here(shards, tmp_path / "straight", **{"train.steps": 4}).losses
    run = tmp_path / "run"
    train_here(shards, run, **{"train.steps": 2})
    kept = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], env=ENV,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockError) as err:
            train_here(shards, run, **{"train.steps": 4})
        assert f"in use by another training (host {socket.gethostname()}, pid {holder.pid}" \
            in str(err.value)
        now = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != LOCK}
        assert now == kept  # nothing written but the holder's lock
    finally:
        holder.kill()  # dies holding it: its lock file stays behind, its flock is gone
        holder.wait()
    capsys.readouterr()
    result = train_here(shards, run, **{"train.steps": 4})
    assert f"took over the lock of a training that is gone (host {socket.gethostname()}, " \
        f"pid {holder.pid}" in capsys.readouterr().out
    assert result.step == 4 and not (run / LOCK).exists()
    assert losses(run) == straight


def start(shards, run_dir, **extra) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cope_megatron", "train",
           *debug_overrides(shards, run_dir, **{"train.steps": 30, **extra})]
    # A session of its own: Ctrl-C in a terminal signals the whole process group.
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


@pytest.mark.integration
def test_ctrl_c_saves_exits_zero_and_resumes_exactly(prepared, tmp_path):
    """SIGINT to the process group (the trainer and its data-loader workers), as a
    terminal's Ctrl-C sends it."""
    shards = prepared[0]
    # Steps enough that the run is still going when this process, polling for step 3 on a
    # loaded machine, gets to send the signal: with 16 it once finished first.
    extra = {"train.steps": 48, "data.num_workers": 2}
    straight = train_here(shards, tmp_path / "straight", **extra).losses
    run = tmp_path / "run"
    proc = start(shards, run, **extra)
    wait_for_steps(proc, run, 3)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    step = len(losses(run))
    assert f"stopped by SIGINT after step {step}; checkpoint saved" in out
    assert (run / "checkpoints" / "latest").read_text() == f"step_{step:08d}"
    assert step < 48
    train_here(shards, run, **extra)
    assert losses(run) == straight


@pytest.mark.integration
def test_a_second_ctrl_c_exits_at_once_saying_what_is_lost(prepared, tmp_path):
    shards = prepared[0]
    run, log = tmp_path / "run", tmp_path / "train.log"
    args = debug_overrides(shards, run, **{"train.steps": 30, "train.save_interval": 2})
    proc = fork(train_slow_after_ctrl_c, args, log=log)
    wait_for_steps(proc, run, 3)
    os.kill(proc.pid, signal.SIGINT)
    # The first is being handled: the run saves after its step. The second is sent once
    # that save has begun, so steps since the last checkpoint exist (sent any earlier, it
    # can land in a step that follows an interval checkpoint, when nothing is lost).
    deadline = time.time() + 60
    while SAVE_BEGUN not in log.read_text():
        assert time.time() < deadline and proc.is_alive(), log.read_text()[-3000:]
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGINT)
    proc.join(60)
    err = log.read_text()
    assert proc.exitcode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert "second Ctrl-C: exiting now without a checkpoint; steps " in err
    assert "since the last checkpoint, step_0000000" in err and "are lost" in err
    assert resumable_tag(run) == ((run / "checkpoints" / "latest").read_text(), None)


SAVE_BEGUN = "[test] the stop's checkpoint save has begun"


def train_slow_after_ctrl_c(args: list[str]) -> int:
    """``cope-megatron train ARGS`` (on a forked process) whose save, once a stop signal is
    recorded, takes up to a minute, as a large model's does: the second Ctrl-C lands in
    the save the first one asked for, with steps done since the last checkpoint."""
    from cope_megatron import trainer as trainer_module
    from cope_megatron.cli import main

    save = trainer_module.Trainer.save

    def slow_save(self) -> str:
        if self.preemption.received:
            os.write(2, f"\n{SAVE_BEGUN}\n".encode())
        deadline = time.monotonic() + 60
        while self.preemption.received and time.monotonic() < deadline:
            time.sleep(0.01)
        return save(self)

    trainer_module.Trainer.save = slow_save  # this process's: it exits after
    return main(["train", *args])
