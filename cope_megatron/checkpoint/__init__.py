"""Atomic checkpoints through DeepSpeed.

DeepSpeed writes model and ZeRO optimizer shards into ``run.dir/checkpoints/<tag>/``; we
write the ``latest`` pointer ourselves, after every rank has finished and with an atomic
rename, so a run killed at any moment resumes from the last complete checkpoint. The
client state carries what DeepSpeed does not know: the step, the data-loader position and
the resolved config. Beside it, ``run.json`` holds the run's record (its config and data,
read before any engine is built) and the size of every file of the checkpoint, so that a
missing or truncated file is found before loading, and the resume falls back to the newest
intact checkpoint.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from cope_megatron.atomic_io import write_text_atomic
from cope_megatron.checkpoint.universal import LAYOUT, write_layout
from cope_megatron.distributed.parallel import any_rank
from cope_megatron.errors import UserError

LATEST = "latest"
RECORD = "run.json"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be restored; the message names it and the way out."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_tag(run_dir: str | Path) -> str | None:
    pointer = checkpoint_dir(run_dir) / LATEST
    return pointer.read_text().strip() if pointer.is_file() else None


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int:
    """The step of checkpoint ``tag`` (``tag_of``'s inverse)."""
    return int(tag.removeprefix("step_"))


def save(engine, run_dir: str | Path, step: int, client_state: dict, layout: dict,
         record: dict, keep: int = 0) -> str:
    """Write checkpoint ``step_<step>`` with its parallel ``layout`` and the run's
    ``record``, point ``latest`` at it once every rank is done, then keep only the ``keep``
    newest complete ones (0: all). A failed write (a full disk) raises CheckpointError on
    every rank, with ``latest`` still naming the previous checkpoint."""
    root = checkpoint_dir(run_dir)
    tag, previous = tag_of(step), latest_tag(run_dir)
    main = dist.get_rank() == 0

    def finish() -> None:
        write_layout(root / tag, layout)
        (root / tag / RECORD).write_text(json.dumps({**record, "files": _sizes(root / tag)}))

    for attempt in (lambda: engine.save_checkpoint(str(root), tag=tag,
                                                   client_state=client_state,
                                                   save_latest=False),
                    finish if main else lambda: None):
        error = _attempt(attempt)
        (failed,) = any_rank(error is not None)
        if failed:
            if main and tag != previous:
                shutil.rmtree(root / tag, ignore_errors=True)  # frees what it took
            raise CheckpointError(_save_failure(error, root / tag, step, previous))
    if main:
        write_text_atomic(root / LATEST, tag)
        prune(root, tag, keep)
    dist.barrier()
    return tag


def _attempt(write: Callable[[], object]) -> Exception | None:
    try:
        write()
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        return e
    return None


def _save_failure(error: Exception | None, target: Path, step: int,
                  previous: str | None) -> str:
    kept = (f"the previous checkpoint {previous} is intact and {target.parent / LATEST} still "
            f"names it" if previous else "no earlier checkpoint exists")
    if error is None:
        what = "another rank could not write its part"
    elif (isinstance(error, OSError) and error.errno == errno.ENOSPC) \
            or "No space left" in str(error):
        what = "no space left on device"
    else:
        free = shutil.disk_usage(target.parent).free / 2**20
        what = f"writing failed ({type(error).__name__}: {error}; {free:.0f} MiB free there)"
    return (f"{what} while saving step {step} to {target}; {kept}. Free space (or lower "
            "train.keep_checkpoints), then run the same command to resume")


def _sizes(tag_dir: Path) -> dict[str, int]:
    """Every file of a checkpoint (but its own records) and its size in bytes."""
    return {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*"))
            if p.is_file() and p.name not in (LAYOUT, RECORD)}


def read_record(tag_dir: Path) -> dict | None:
    """The run's record saved with a checkpoint (None for one saved before records)."""
    path = tag_dir / RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def damage(tag_dir: Path) -> str | None:
    """What makes a checkpoint unloadable, found without loading it: None when intact."""
    if not tag_dir.is_dir():
        return "it does not exist"
    if not (tag_dir / LAYOUT).is_file():
        return f"it is incomplete (no {LAYOUT}: its save never finished)"
    record = read_record(tag_dir) or {"files": {}}
    for name, size in record["files"].items():
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} when saved"
    return None


def resumable_tag(run_dir: str | Path) -> tuple[str | None, str | None]:
    """The checkpoint to resume from: the one ``latest`` names or, when that one is
    damaged, the newest intact one before it, with a line saying so; (None, None) without
    a checkpoint."""
    root, tag = checkpoint_dir(run_dir), latest_tag(run_dir)
    if tag is None:
        return None, None
    problem = damage(root / tag)
    if problem is None:
        return tag, None
    older = sorted((p.name for p in root.glob("step_*") if re.fullmatch(r"step_\d{8}", p.name)
                    and p.name < tag), reverse=True)
    fallback = next((t for t in older if damage(root / t) is None), None)
    if fallback is None:
        raise CheckpointError(
            f"checkpoint {root / tag} is unreadable: {problem}; there is no earlier intact "
            f"checkpoint in {root}: set run.resume=false to start over (or restore the file)")
    return fallback, (f"{root / LATEST} names {tag}, but {problem}; resuming from {fallback}, "
                      "the newest intact checkpoint")


def prune(root: Path, latest: str, keep: int) -> None:
    """Delete all but the ``keep`` newest complete checkpoints up to ``latest``, any newer
    tag (what a run killed mid-save left; ``latest`` never named it), and universal copies
    older than ``latest`` (each served the one resume it was made for)."""
    names = [p.name for p in root.iterdir() if p.is_dir()]
    tags = sorted(n for n in names if re.fullmatch(r"step_\d{8}", n))
    complete = [t for t in tags if t <= latest]
    doomed = [t for t in tags if t > latest] + (complete[:-keep] if keep else [])
    doomed += [n for n in names if n.endswith("_universal") and n[:-len("_universal")] < latest]
    for t in doomed:
        shutil.rmtree(root / t, ignore_errors=True)


def load(engine, run_dir: str | Path, tag: str | None = None) -> dict | None:
    """Restore the engine from ``tag`` (default: latest); returns the client state."""
    tag = tag or latest_tag(run_dir)
    if tag is None:
        return None
    try:
        path, client_state = engine.load_checkpoint(str(checkpoint_dir(run_dir)), tag=tag)
    except Exception as e:  # DeepSpeed/torch.load errors: name the checkpoint and the way out
        raise CheckpointError(
            f"checkpoint {checkpoint_dir(run_dir) / tag} is unreadable ({type(e).__name__}: "
            f"{e}); point {checkpoint_dir(run_dir) / LATEST} at an earlier step_* tag, or set "
            "run.resume=false to start over"
        ) from e
    if path is None:
        raise CheckpointError(
            f"checkpoint {tag!r} in {checkpoint_dir(run_dir)} could not be loaded; delete the "
            "'latest' file to start over or set run.resume=false"
        )
    return client_state
