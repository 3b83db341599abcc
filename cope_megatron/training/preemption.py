"""Stop cleanly when the cluster asks: SIGTERM (preemption, ``scancel``) or SIGUSR1 (what
SLURM's ``--signal`` sends ahead of the time limit).

The handler only records the signal, so it never interrupts a step or a save (a second
one while saving changes nothing). The trainer checks after each step, agreeing across
ranks (``any_rank``) so that every rank saves the same step and exits.
"""

from __future__ import annotations

import signal

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionHandler:
    def __init__(self) -> None:
        self.received: str | None = None
        """Name of the first stop signal received, if any."""
        self._previous = {sig: signal.signal(sig, self._record) for sig in SIGNALS}

    def _record(self, signum: int, frame) -> None:
        self.received = self.received or signal.Signals(signum).name

    def close(self) -> None:
        """Put back the handlers that were there before; after a stop, ignore further stop
        signals instead: the process is on its way out, and one more must not kill it."""
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if self.received else handler)
