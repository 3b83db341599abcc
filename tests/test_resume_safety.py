"""Resume safety (issue 27): a resume is checked against the record its checkpoint holds
before anything is built or written; refused keys are named one per line, allowed ones are
applied from the resume step on and logged; a damaged checkpoint falls back to the newest
intact one; a full disk and a NaN streak lose nothing. Every clear error is followed by a
resume that continues exactly as an uninterrupted run."""

from __future__ import annotations

import errno
import json
import shutil

import pytest
import yaml

import cope_megatron.trainer as trainer_module
from cope_megatron.checkpoint import CheckpointError
from cope_megatron.config import ConfigError, flat_keys, load_config
from cope_megatron.config.resume_keys import DERIVED_KEYS, classify
from cope_megatron.distributed.parallel import destroy_distributed
from cope_megatron.training.nonfinite import NonFiniteError
from cope_megatron.training.schedule import lr_at
from tests.helpers import debug_overrides, losses, nan_loss_at, read_metrics, train_here

STEPS = 4


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train(shards, run_dir, **extra):
    """A ``STEPS``-step run in this process, saving every 2 steps."""
    return train_here(shards, run_dir, **{"train.steps": STEPS, "train.save_interval": 2,
                                          **extra})


@pytest.fixture(scope="module")
def straight(prepared, tmp_path_factory) -> list[float]:
    """The losses of the uninterrupted run every interrupted one must match."""
    run = tmp_path_factory.mktemp("straight")
    return train(prepared[0], run).losses


def test_every_compared_key_has_one_class():
    for key in [*flat_keys(), *DERIVED_KEYS]:
        assert classify(key) in ("refused", "allowed"), key
    assert classify("model.pe") == classify("pe.rope.base") == "refused"
    assert classify("train.lr") == classify("pe.cope.impl") == "allowed"
    assert classify("pe.t5.num_buckets", frozenset({"t5"})) == "allowed"  # no PE reads it
    assert classify("pe.rope.base", frozenset({"t5"})) == "refused"


def test_refused_changes_are_named_one_a_line_and_nothing_is_written(prepared, tmp_path,
                                                                     straight):
    shards = prepared[0]
    run = tmp_path / "run"
    train(shards, run, **{"train.steps": 2})
    kept = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError) as err:  # an architecture and a PE change
        train(shards, run, **{"model.pe": "alibi", "model.num_layers": 3})
    message = str(err.value)
    assert "model.pe: the checkpoint was trained with rope, this run asks for alibi" in message
    assert "model.num_layers: the checkpoint was trained with 2, this run asks for 3" in message
    assert "run.allow_config_change=[model.pe,model.num_layers]" in message
    assert "state_dict" not in message and len(message.splitlines()) == 4
    # Shards from another tokenizer: the data's identity, not its path, is compared.
    other = tmp_path / "other_shards"
    shutil.copytree(shards, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["tokenizer_sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"data.tokenizer_sha256: the checkpoint was trained "
                       r"with [0-9a-f]{64}, this run's data \(data.shards\) has 0{64}"):
        train(other, run)
    with pytest.raises(ConfigError, match="train.global_batch: .* 4, this run asks for 8"):
        train(shards, run, **{"train.grad_accum": 2})
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == kept
    assert train(shards, run).losses == straight[2:]


@pytest.mark.parametrize("stage", [0, 2])
def test_allowed_changes_are_applied_from_the_resume_step_and_logged(prepared, tmp_path,
                                                                     stage):
    shards = prepared[0]
    run = tmp_path / "run"
    train(shards, run, **{"train.steps": 2, "zero.stage": stage})
    new = {"train.steps": 6, "train.lr": 1e-3, "train.min_lr": 1e-4, "train.warmup_steps": 1,
           "zero.stage": stage}
    train(shards, run, **new)
    steps = read_metrics(run)
    assert [r["lr"] for r in steps[:2]] == [3e-3, 3e-3]
    for r in steps[2:]:  # the lr after step k is the schedule's at k (its last_epoch)
        assert r["lr"] == pytest.approx(lr_at(r["step"], lr=1e-3, min_lr=1e-4, warmup=1,
                                              total=6), rel=1e-12), r
    change = next(r for r in records(run) if "config_change" in r)
    assert change["step"] == 2
    assert change["config_change"]["train.lr"] == [3e-3, 1e-3]
    assert change["config_change"]["train.steps"] == [2, 6]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["lr"] == 1e-3
    (old,) = (run / "config_history").glob("*.yaml")
    assert old.name == "001.step_00000002.yaml"
    assert yaml.safe_load(old.read_text())["train"]["lr"] == 3e-3


def test_eval_refuses_to_evaluate_the_checkpoint_as_another_model(prepared, tmp_path):
    from cope_megatron.train import run_eval

    shards, run = prepared[0], tmp_path / "run"
    quick = {"train.steps": 2, "eval.length_multipliers": "[1]", "eval.passkey_samples": 0}
    train(shards, run, **quick)

    def evaluate(**extra):
        try:
            return run_eval(load_config(debug_overrides(shards, run, **{**quick, **extra})))
        finally:
            destroy_distributed()

    with pytest.raises(ConfigError, match="cannot evaluate .*step_00000002 as another model "
                       "than it was trained as:\n  model.pe: the checkpoint was trained with "
                       "rope, this run asks for nope\n"):
        evaluate(**{"model.pe": "nope"})
    assert not (run / "eval.json").exists()
    # Settings that do not change the model are the evaluation's own.
    assert evaluate(**{"train.lr": 1e-2, "pe.t5.num_buckets": 8})["step"] == 2


def test_a_deliberate_change_of_a_refused_key_goes_through(prepared, tmp_path):
    shards = prepared[0]
    run = tmp_path / "run"
    train(shards, run, **{"train.steps": 2})
    train(shards, run, **{"model.pe": "nope", "train.seed": 99,
                          "run.allow_config_change": "[model.pe,train.seed]"})
    change = next(r for r in records(run) if "config_change" in r)
    assert change["config_change"]["model.pe"] == ["rope", "nope"]
    assert change["config_change"]["train.seed"] == [1234, 99]
    assert len(losses(run)) == STEPS


def test_a_damaged_checkpoint_falls_back_to_the_newest_intact_one(prepared, tmp_path,
                                                                  straight, capsys):
    shards = prepared[0]
    run = tmp_path / "run"
    root = run / "checkpoints"
    train(shards, run)
    (root / "step_00000004" / "mp_rank_00_model_states.pt").unlink()
    capsys.readouterr()
    train(shards, run)  # steps 3-4 again, from step 2
    out = capsys.readouterr().out
    assert (f"{root / 'latest'} names step_00000004, but mp_rank_00_model_states.pt is "
            "missing; resuming from step_00000002, the newest intact checkpoint") in out
    assert losses(run) == straight
    (root / "latest").write_text("step_00000009")  # a pointer to a tag that is not there
    train(shards, run)
    assert "names step_00000009, but it does not exist; resuming from step_00000004" in \
        capsys.readouterr().out
    assert losses(run) == straight
    for tag in ("step_00000002", "step_00000004"):
        (root / tag / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="step_00000009 is unreadable: it does not exist; "
                       "there is no earlier intact checkpoint.*run.resume=false"):
        train(shards, run)


def test_disk_full_while_saving_keeps_the_previous_checkpoint(prepared, tmp_path, straight,
                                                              monkeypatch):
    from deepspeed.runtime.engine import DeepSpeedEngine

    shards = prepared[0]
    run = tmp_path / "run"
    real = DeepSpeedEngine.save_checkpoint

    def save_checkpoint(self, save_dir, tag=None, **kwargs):
        if tag == "step_00000004":
            real(self, save_dir, tag=tag, **kwargs)  # a part written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, save_dir, tag=tag, **kwargs)

    monkeypatch.setattr(DeepSpeedEngine, "save_checkpoint", save_checkpoint)
    with pytest.raises(CheckpointError) as err:
        train(shards, run)
    root = run / "checkpoints"
    assert str(err.value).startswith(
        f"no space left on device while saving step 4 to {root / 'step_00000004'}; the "
        f"previous checkpoint step_00000002 is intact")
    assert (root / "latest").read_text() == "step_00000002"
    assert not (root / "step_00000004").exists()  # the partial write is gone
    monkeypatch.setattr(DeepSpeedEngine, "save_checkpoint", real)
    train(shards, run)
    assert losses(run) == straight


def test_nan_streak_names_the_checkpoint_before_it_and_a_lower_lr_resumes(prepared, tmp_path,
                                                                          monkeypatch):
    shards = prepared[0]
    run = tmp_path / "run"
    monkeypatch.setattr(trainer_module, "loss_sum",
                        nan_loss_at({3, 4, 5}, trainer_module.loss_sum))
    with pytest.raises(NonFiniteError) as err:
        train(shards, run, **{"train.steps": 8, "train.max_bad_steps": 3})
    message = str(err.value)
    assert message.startswith("step 5:") and "(step 3): step_00000002" in message
    root = run / "checkpoints"
    assert (root / "latest").read_text() == "step_00000002"
    assert not (root / "step_00000004").exists()  # due during the streak: not written
    monkeypatch.undo()
    train(shards, run, **{"train.steps": 4, "train.lr": 1e-3, "train.min_lr": 1e-3})
    steps = read_metrics(run)
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert [r["lr"] for r in steps] == [3e-3, 3e-3, 1e-3, 1e-3]
    assert all(r["skipped_steps"] == 0 for r in steps)


@pytest.mark.parametrize("override, key", [
    ("train.lr=0", "train.lr"), ("train.lr=-1", "train.lr"),
    ("train.min_lr=-0.1", "train.min_lr"), ("train.min_lr=0.5", "train.min_lr"),
    ("train.warmup_steps=-1", "train.warmup_steps"),
    ("run.allow_config_change=[model.nonsense]", "run.allow_config_change")])
def test_impossible_settings_name_the_key(override, key):
    from cope_megatron.config import validate

    with pytest.raises(ConfigError, match=f"^{key}: "):
        validate(load_config([override]))


def test_yaml_syntax_error_names_file_line_and_column(tmp_path, capsys):
    from cope_megatron.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: 1.0e-3\n  steps: [10\nmodel: {}\n")
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"error: config file '{bad}', line 4, column 6: YAML syntax error")


def test_a_key_the_record_predates_is_compared_with_its_default():
    """A checkpoint saved before a key existed was trained at the key's default."""
    from cope_megatron.training.resume import _changes

    assert _changes({"model.pe": "rope"}, {"model.pe": "rope",
                                           "pe.length_scale.type": "fixed"}) == {
        "pe.length_scale.type": ["none", "fixed"]}
    assert _changes({"model.pe": "rope"}, {"model.pe": "rope",
                                           "pe.length_scale.type": "none"}) == {}


@pytest.mark.parametrize("overrides, message", [
    (["pe.length_scale.type=learned"], r"set pe.length_scale.s=0.2885"),
    (["pe.rope_scaling.type=yarn", "pe.rope_scaling.factor=4"],
     "set pe.rope_scaling.original_length=32 "),
])
def test_a_new_training_length_keeps_what_followed_the_old_one(overrides, message):
    from cope_megatron.training.resume import _check_length_change

    cfg = load_config(["model.seq_length=128", *overrides])
    with pytest.raises(ConfigError, match=message):
        _check_length_change({"model.seq_length": [32, 128]}, cfg)
    pinned = load_config(["model.seq_length=128", "pe.length_scale.s=0.3",
                          "pe.rope_scaling.original_length=32", *overrides])
    _check_length_change({"model.seq_length": [32, 128]}, pinned)
