"""Proof that a shard holds the bytes prep wrote: the manifest records each shard's size
and sha256 (``format.shard_entry``).

- At start-up (``startup.check``) every local shard must exist with its recorded size: one
  ``stat`` a shard, so a deleted or truncated shard stops the run before its first step,
  not hours in when the loader reaches it.
- ``data.verify`` decides when the digest is checked: ``first_read`` (default) hashes a
  shard just before it is first read, so start-up stays instant and the hashing is spread
  over the run; ``startup`` hashes every shard before any step; ``off`` never does.
  Each process hashes a shard at most once: the results are kept here by URL and handed
  to DataLoader workers (``results``/``adopt``), and a worker reads no shard it has not
  seen verified. A shard is hashed, then read: the digest is of the file the reader
  then opens (a file swapped in between is not caught; nothing here guards against that).
- Shards behind a remote ``url_prefix`` are never downloaded before training: at
  start-up an ``http(s)://`` shard's size is asked of the server (HEAD); a ``pipe:``
  command's shard cannot be asked without reading it, so it is not checked then. Unless
  ``data.verify=off``, a remote shard is hashed as it streams, its first read in a process
  going on to the shard's end (``source.shard_samples``): a mismatch raises there, after
  the shard's samples were read (checking first would download every shard twice).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Protocol

from cope_megatron.data.format import DataError, file_sha256
from cope_megatron.data.remote import remote_size

VERIFY_MODES = ("startup", "first_read", "off")
RERUN = "re-run prep into a fresh directory, or set data.on_error=skip to skip bad shards"

_results: dict[str, str | None] = {}
"""This process's verdicts by shard URL: None (verified) or why the shard is bad."""


class Shard(Protocol):
    url: str
    sha256: str | None
    bytes: int | None
    local: bool


def stat_problem(shard: Shard) -> str | None:
    """Why a local shard is missing or has the wrong size, or None."""
    try:
        size = os.stat(shard.url).st_size
    except FileNotFoundError:
        return f"shard {shard.url} is missing"
    if shard.bytes is not None and size != shard.bytes:
        return (f"shard {shard.url} has {size} bytes but the manifest records {shard.bytes}: "
                "it was changed or truncated after prep")
    return None


def remote_problem(shard: Shard) -> str | None:
    """Why an HTTP shard is unreachable or has the wrong size, or None (a command's shard
    is not asked)."""
    try:
        size = remote_size(shard.url)
    except DataError as e:
        return str(e)
    if None not in (size, shard.bytes) and size != shard.bytes:
        return (f"shard {shard.url} has {size} bytes but the manifest records {shard.bytes}: "
                "the server holds another file")
    return None


def check_present(shards: Iterable[Shard]) -> list[str]:
    """Stat every local shard, ask the server the size of every HTTP one; returns the
    problems (also remembered as verdicts, so the loader reports them when it reaches the
    shard without hashing it)."""
    problems = []
    for shard in shards:
        problem = stat_problem(shard) if shard.local else remote_problem(shard)
        if problem:
            _results[shard.url] = problem
            problems.append(problem)
    return problems


def verify(shard: Shard) -> str | None:
    """Why ``shard`` does not hold the bytes prep wrote, or None; hashes it once per process."""
    if not shard.local or shard.sha256 is None:
        return None
    if shard.url not in _results:
        problem = stat_problem(shard)
        if problem is None and file_sha256(shard.url) != shard.sha256:
            problem = (f"shard {shard.url} does not match its sha256 in the manifest: its "
                       "bytes changed after prep")
        _results[shard.url] = problem
    return _results[shard.url]


def is_verified(shard: Shard) -> bool:
    return shard.url in _results and _results[shard.url] is None


def ensure_streamed(shard: Shard, sha256: str, size: int) -> None:
    """Record the verdict on a remote shard read whole as it streamed (``sha256`` of its
    ``size`` bytes); raise DataError naming it unless they are the ones prep wrote."""
    problem = None
    if shard.sha256 is not None and sha256 != shard.sha256:
        problem = (f"shard {shard.url} ({size} bytes read) does not match its sha256 in the "
                   "manifest: the store holds other bytes than prep wrote")
    _results[shard.url] = problem
    if problem:
        raise DataError(f"{problem}; {RERUN}")


def ensure_verified(shard: Shard) -> None:
    """Raise DataError naming the shard unless it holds the bytes prep wrote."""
    problem = verify(shard)
    if problem:
        raise DataError(f"{problem}; {RERUN}")


def verify_all(shards: Iterable[Shard]) -> list[str]:
    """Hash every shard not yet verified (``data.verify=startup``); returns the problems."""
    return [p for p in (verify(s) for s in shards) if p]


def results() -> dict[str, str | None]:
    """This process's verdicts, for the DataLoader workers it starts."""
    return dict(_results)


def adopt(verdicts: dict[str, str | None]) -> None:
    """Take the verdicts of the process that started this worker."""
    _results.update(verdicts)
