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
from cope_megatron.config.resume_keys import DERIVED_KEYS, EVAL_TIME, REFUSED, classify
from cope_megatron.data.format import identity
from cope_megatron.data.mixture import mixture_identity
from cope_megatron.pe import REGISTRY, model_pe
from cope_megatron.pe.length_scale import initial_s
from cope_megatron.pe.rope_scaling import scaling_type

HISTORY = "config_history"


def config_values(cfg: Config) -> dict:
    """Every schema key of ``cfg`` and its value, flat."""
    values = {}
    for key in flat_keys():
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        # A list of sections (data.mixture) is recorded as plain mappings.
        values[key] = ([dataclasses.asdict(v) for v in node]
                       if isinstance(node, list) and node and dataclasses.is_dataclass(node[0])
                       else node)
    return values


def compared_values(cfg: Config, manifest: dict, global_batch: int, streams: int) -> dict:
    """Every key a resume compares and its value in this run: the schema's keys (with
    ``data.streams`` resolved), the data's identity (a mixture's: each source's) and the
    global batch."""
    data = identity(manifest)
    return {**config_values(cfg), "data.streams": streams, "train.global_batch": global_batch,
            "data.tokenizer_sha256": data["tokenizer_sha256"],
            "data.shards_fingerprint": data["shards_fingerprint"],
            "data.mixture_sources": mixture_identity(cfg.data.mixture)}


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
    step = checkpoint.step_of(tag)
    record = checkpoint.read_record(checkpoint.checkpoint_dir(run_dir) / tag)
    if record is None:
        return Resume(tag, step, note=note or f"{tag} was saved before checkpoints held "
                      f"{checkpoint.RECORD}: this run's settings are not compared with it")
    changed = _changes(record["values"], values)
    _check_length_change(changed, cfg)
    refused = _refused(changed, cfg)
    if refused:
        raise ConfigError(
            f"cannot resume {checkpoint.checkpoint_dir(run_dir) / tag}: this run changes "
            "what it was trained with:\n" + _lines(changed, refused) + "\n  Put these back "
            "to continue the run, set run.dir to a new directory to start another, or set "
            f"run.allow_config_change=[{','.join(refused)}] to change them deliberately")
    return Resume(tag, step, changed, compared=True, note=note)


def evaluated_tag(cfg: Config) -> str | None:
    """The checkpoint ``eval`` restores (a damaged one's fallback, said in a line); raises
    ConfigError, one line per key, when this config describes another model than the one
    it trained (another PE, another shape): the numbers would be another model's. RoPE
    scaling (``resume_keys.EVAL_TIME``) is an evaluation's own choice."""
    run_dir = Path(cfg.run.dir)
    tag, note = checkpoint.resumable_tag(run_dir)
    if note:
        print(f"[checkpoint] {note}", flush=True)
    record = tag and checkpoint.read_record(checkpoint.checkpoint_dir(run_dir) / tag)
    if not record:
        return tag
    changed = _changes(record["values"], config_values(cfg))
    _check_length_change(changed, cfg)
    refused = [k for k in _refused(changed, cfg)
               if k.startswith(("model.", "pe.")) and not k.startswith(EVAL_TIME)]
    if refused:
        raise ConfigError(
            f"cannot evaluate {checkpoint.checkpoint_dir(run_dir) / tag} as another model "
            "than it was trained as:\n" + _lines(changed, refused) + "\n  Evaluate with "
            f"the run's own {run_dir / 'config.yaml'}, or set run.allow_config_change="
            f"[{','.join(refused)}] to evaluate it so deliberately")
    return tag


def _changes(saved: dict, values: dict) -> dict[str, list]:
    """Keys whose value differs from the record's: key -> [then, now]. A schema key the
    record predates was trained at its default (a new key defaults to the old behaviour)."""
    now = json.loads(json.dumps(values))  # as the record stores them (tuples as lists)
    then = {**json.loads(json.dumps(config_values(Config()))), **saved}
    return {k: [then[k], now[k]] for k in now if k in then and then[k] != now[k]}


def _check_length_change(changed: dict[str, list], cfg: Config) -> None:
    """A new ``model.seq_length`` (fine-tuning at another length) must not move what
    follows the training length by default: the length scale's s and RoPE scaling's
    original length. Raise a ConfigError asking for their values at the old length."""
    if "model.seq_length" not in changed:
        return
    old = changed["model.seq_length"][0]
    pinned = {}  # key -> its value at the checkpoint's length
    if cfg.pe.length_scale.type != "none" and cfg.pe.length_scale.s is None:
        pinned["pe.length_scale.s"] = initial_s(cfg.pe.length_scale, old)
    if scaling_type(cfg) != "none" and cfg.pe.rope_scaling.original_length is None:
        pinned["pe.rope_scaling.original_length"] = old
    if pinned:
        raise ConfigError(
            f"model.seq_length: {old} -> {cfg.model.seq_length}, but {' and '.join(pinned)} "
            f"follow the training length unless set; set "
            f"{' '.join(f'{k}={v!r}' for k, v in pinned.items())} (their values at the "
            "checkpoint's length)")


def _refused(changed: dict[str, list], cfg: Config) -> list[str]:
    """The changed keys the table refuses (options of PEs neither run uses change
    nothing), but those ``run.allow_config_change`` names."""
    unused = frozenset()
    if not {"model.pe", "model.pe_schedule"} & set(changed):
        read = model_pe(cfg.model).options
        unused = frozenset(o for pe in REGISTRY.values() for o in pe.options) - set(read)
    return [k for k in changed if k not in cfg.run.allow_config_change
            and classify(k, unused) == REFUSED]


def _lines(changed: dict[str, list], keys: list[str]) -> str:
    return "\n".join(f"  {k}: the checkpoint was trained with {_shown(changed[k][0])}, "
                     f"{_asks(k)} {_shown(changed[k][1])}" for k in keys)


def _asks(key: str) -> str:
    if key == "data.mixture_sources":
        return "this run's data.mixture has"
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
