"""Stop cleanly when the cluster or the user asks: SIGTERM (preemption, ``scancel``),
SIGUSR1 (what SLURM's ``--signal`` sends ahead of the time limit) or SIGINT (Ctrl-C).

The handler only records the signal, so it never interrupts a step or a save (a second
SIGTERM or SIGUSR1 while saving changes nothing). The trainer checks after each step,
agreeing across ranks (``any_rank``) so that every rank saves the same step and exits. A
second Ctrl-C is a person who will not wait: the process exits at once, saying what is
lost.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
INTERRUPTED = 130
"""The exit status of a process ended by Ctrl-C (128 + SIGINT), as shells report it."""


class PreemptionHandler:
    def __init__(self, lost: Callable[[], str]) -> None:
        """``lost``: what exiting now loses (said on a second Ctrl-C)."""
        self.received: str | None = None
        """Name of the first stop signal received, if any."""
        self._lost = lost
        self._previous = {sig: signal.signal(sig, self._record) for sig in SIGNALS}

    def _record(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.received == "SIGINT":
            _say(f"second Ctrl-C: exiting now without a checkpoint; {self._lost()}")
            os._exit(INTERRUPTED)  # at once: no traceback, no cleanup that could hang
        if name == "SIGINT" and self.received is None:
            _say("Ctrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again "
                 "to exit at once without it)")
        self.received = self.received or name

    def close(self) -> None:
        """Put back the handlers that were there before; after a stop, ignore further stop
        signals instead: the process is on its way out, and one more must not kill it."""
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if self.received else handler)


def _say(line: str) -> None:
    # os.write: a print here could re-enter a print the signal interrupted.
    os.write(2, f"\n[train] {line}\n".encode())
