"""A time limit's SIGTERM as an exception: a benchmark that ``bench/gpu_suite.sh`` stops at
its stage's budget ends the case it is in and still prints the rows it finished."""

from __future__ import annotations

import signal

NOT_RUN = "not run: stopped (time limit)"
"""The error of a row a stopped benchmark did not get to."""


class Stopped(BaseException):
    """SIGTERM: time is up. Like KeyboardInterrupt, not an ``Exception``: a benchmark's
    per-case ``except Exception`` (a case that fails is a row) must not swallow it."""


def _stop(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group's TERM may come twice
    raise Stopped


def stop_on_sigterm() -> None:
    """From now on, SIGTERM raises ``Stopped`` in the main thread."""
    signal.signal(signal.SIGTERM, _stop)
