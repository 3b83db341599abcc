"""One training per run directory: an advisory lock (``flock``) on ``run.dir/train.lock``,
held by rank 0 for the run's life, with the holder's host and pid inside.

Two trainings on one directory would interleave their metrics and overwrite each other's
checkpoints while both exit 0. The kernel drops a ``flock`` when its process dies, however
it dies, so a lock file whose lock is free was left by a dead run and is taken over. The
file is deleted on release while still locked; a process that opened it just before then
finds, once it holds the lock, that the path names another file (or none), and retries.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from cope_megatron.errors import UserError

LOCK = "train.lock"


class RunLockError(UserError, RuntimeError):
    """Another training holds the run directory."""


class RunLock:
    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock or raise RunLockError naming the holder; returns a line to print
        when a stale lock of a dead run was taken over, or when locks do not work here."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise RunLockError(
                    f"run.dir {self.path.parent} is in use by another training ({holder}, "
                    f"lock {self.path}); wait for it to end, stop it, or set run.dir to "
                    "another directory") from None
            except OSError as e:  # a file system without flock (some network mounts)
                os.close(fd)
                return (f"[train] cannot lock {self.path} ({e.strerror}): nothing stops a "
                        "second training on this run.dir; start only one")
            if _same_file(fd, self.path):
                break
            os.close(fd)  # released and deleted meanwhile: lock the new file
        stale = _holder(fd) if os.fstat(fd).st_size else None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        self._fd = fd
        if stale:
            return (f"[train] took over the lock of a training that is gone ({stale}): "
                    f"{self.path} was left behind by a process that died")
        return None

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)  # closing drops the flock
        self._fd = None


def _holder(fd: int) -> str:
    """``host H, pid P since T`` from a lock file's content."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        info = {}
    return (f"host {info.get('host', '?')}, pid {info.get('pid', '?')}"
            + (f", since {info['since']}" if "since" in info else ""))


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino)
