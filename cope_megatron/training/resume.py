"""Resume safely: compare the run with the record of the checkpoint it resumes, before
anything is built or written; keep ``config.yaml`` (and its history) true to what was
used; apply a changed optimizer schedule from the resume step on.

Which keys may change is decided in ``config/resume_keys.py``. The record (``run.json``
in each checkpoint, ``checkpoint.save``) holds every compared key's value, flat.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from cope_megatron import checkpoint
from cope_megatron.atomic_io import write_text_atomic
from cope_megatron.config import Config, ConfigError, flat_keys, yaml_text
from cope_megatron.config.resume_keys import DERIVED_KEYS, REFUSED, classify
from cope_megatron.data.format import identity

HISTORY = "config_history"


def compared_values(cfg: Config, manifest: dict, global_batch: int, streams: int) -> dict:
    """Every key a resume compares and its value in this run: the schema's keys (with
    ``data.streams`` resolved), the data's identity and the global batch."""
    values = {}
    for key in flat_keys():
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        values[key] = node
    data = identity(manifest)
    return {**values, "data.streams": streams, "train.global_batch": global_batch,
            "data.tokenizer_sha256": data["tokenizer_sha256"],
            "data.shards_fingerprint": data["shards_fingerprint"]}


@dataclass
class Resume:
    """What a run starts from: the checkpoint ``tag`` (None: from scratch), its step, the
    allowed changes against its record (key: [then, now]), whether there was a record to
    compare with, and a line to print (a fallback to an earlier checkpoint), if any."""
    tag: str | None = None
    step: int = 0
    changes: dict[str, list] = dataclasses.field(default_factory=dict)
    compared: bool = False
    note: str | None = None


def plan(cfg: Config, values: dict) -> Resume:
    """The checkpoint this run resumes and how the run differs from it; raises ConfigError,
    one line per key, when it changes the model, the data or its order."""
    run_dir = Path(cfg.run.dir)
    tag, note = checkpoint.resumable_tag(run_dir) if cfg.run.resume else (None, None)
    if tag is None:
        return Resume(note=note)
    step = int(tag.removeprefix("step_"))
    record = checkpoint.read_record(checkpoint.checkpoint_dir(run_dir) / tag)
    if record is None:
        return Resume(tag, step, note=note or f"{tag} was saved before checkpoints held "
                      f"{checkpoint.RECORD}: this run's settings are not compared with it")
    saved = record["values"]
    # JSON turns tuples into lists: compare as JSON would store them.
    now = json.loads(json.dumps(values))
    changed = {k: [saved[k], now[k]] for k in now if k in saved and saved[k] != now[k]}
    allowed = set(cfg.run.allow_config_change)
    pe = saved["model.pe"] if saved["model.pe"] == now["model.pe"] else None
    refused = [k for k in changed if classify(k, pe) == REFUSED and k not in allowed]
    if refused:
        lines = [f"  {k}: the checkpoint was trained with {_shown(changed[k][0])}, "
                 f"{_asks(k)} {_shown(changed[k][1])}" for k in refused]
        raise ConfigError(
            f"cannot resume {checkpoint.checkpoint_dir(run_dir) / tag}: this run changes "
            "what it was trained with:\n" + "\n".join(lines) + "\n  Put these back to "
            "continue the run, set run.dir to a new directory to start another, or set "
            f"run.allow_config_change=[{','.join(refused)}] to change them deliberately")
    return Resume(tag, step, changed, compared=True, note=note)


def _asks(key: str) -> str:
    return ("this run's data (data.shards) has" if key.startswith("data.") and key in
            DERIVED_KEYS else "this run asks for")


def _shown(value) -> str:
    return "unset" if value is None else str(value)


def write_config(cfg: Config, run_dir: Path, step: int) -> None:
    """``config.yaml`` of the run as it goes on from ``step``; a different earlier one moves
    to ``config_history/NNN.step_<step>.yaml`` (it was used up to that step)."""
    path = run_dir / "config.yaml"
    text = yaml_text(cfg)
    if path.is_file() and path.read_text() != text:
        history = run_dir / HISTORY
        history.mkdir(exist_ok=True)
        n = len(list(history.glob("*.yaml"))) + 1
        path.replace(history / f"{n:03d}.{checkpoint.tag_of(step)}.yaml")
    write_text_atomic(path, text)


def apply_optimizer_settings(engine, cfg: Config) -> None:
    """After a checkpoint is loaded, make its optimizer follow this run's settings: the
    restored LR schedule and parameter groups hold the checkpoint's (``base_lrs``, lr,
    betas, weight decay), and the schedule's lambda already reads this run's config."""
    t = cfg.train
    schedule = engine.lr_scheduler
    schedule.base_lrs = [t.lr] * len(schedule.base_lrs)
    # The formula of LambdaLR.get_lr, so that an unchanged run resumes bit for bit.
    lrs = [base * fn(schedule.last_epoch)
           for base, fn in zip(schedule.base_lrs, schedule.lr_lambdas)]
    for group, lr in zip(schedule.optimizer.param_groups, lrs):
        group.update(lr=lr, initial_lr=t.lr, betas=(t.beta1, t.beta2),
                     weight_decay=t.weight_decay)
    schedule._last_lr = lrs
