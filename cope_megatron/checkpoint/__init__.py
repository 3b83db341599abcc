"""Atomic checkpoints through DeepSpeed.

DeepSpeed writes model and ZeRO optimizer shards into ``run.dir/checkpoints/<tag>/``; we
write the ``latest`` pointer ourselves, after every rank has finished and with an atomic
rename, so a run killed at any moment resumes from the last complete checkpoint. The
client state carries what DeepSpeed does not know: the step, the data-loader position and
the resolved config.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch.distributed as dist

from cope_megatron.atomic_io import write_text_atomic
from cope_megatron.checkpoint.universal import write_layout
from cope_megatron.errors import UserError

LATEST = "latest"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be restored; the message names it and the way out."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_tag(run_dir: str | Path) -> str | None:
    pointer = checkpoint_dir(run_dir) / LATEST
    return pointer.read_text().strip() if pointer.is_file() else None


def save(engine, run_dir: str | Path, step: int, client_state: dict, layout: dict,
         keep: int = 0) -> str:
    """Write checkpoint ``step_<step>`` with its parallel ``layout``, point ``latest`` at it
    once every rank is done, then keep only the ``keep`` newest complete ones (0: all)."""
    root = checkpoint_dir(run_dir)
    tag = f"step_{step:08d}"
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    dist.barrier()
    if dist.get_rank() == 0:
        write_layout(root / tag, layout)
        write_text_atomic(root / LATEST, tag)
        prune(root, tag, keep)
    dist.barrier()
    return tag


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
