"""Where ``prep`` and ``export`` write: a new or empty directory, or one they wrote
before, never someone else's. A file already in a foreign directory could be read as ours
(a stale ``model.safetensors`` loaded instead of the export, a stray ``*.tar`` taken for a
shard), so such a directory is refused unless the user says ``--force``."""

from __future__ import annotations

from pathlib import Path

from cope_megatron.errors import UserError


class ForeignDirectoryError(UserError, FileExistsError):
    """An output directory that holds files we did not write."""


def check_output_dir(path: str | Path, markers: tuple[str, ...], what: str, *,
                     force: bool = False) -> None:
    """Refuse ``path`` unless it is missing, empty, or holds one of ``markers`` (the file
    each of our writers leaves first: it is ``what``, written by us, maybe unfinished).
    ``force`` writes into it anyway."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ForeignDirectoryError(f"{path} is a file, not a directory; choose a directory "
                                    f"for the {what}")
    if force or not path.exists() or any((path / m).exists() for m in markers):
        return
    if next(path.iterdir(), None) is not None:
        raise ForeignDirectoryError(
            f"{path} is not empty and is not a {what} of ours (no {' or '.join(markers)}): "
            "files already there could be mistaken for ours; choose a new or empty "
            "directory, or pass --force to write into it anyway")
