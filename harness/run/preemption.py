"""Pre-emption: a scheduler's signal asks a run to checkpoint and stop, so that a requeue resumes it.

While a run is worked on, :func:`catching` replaces the handlers of SIGTERM (what SLURM and most
schedulers send before they kill a job), SIGUSR1 and SIGUSR2 (submitit's pre-emption and time-out
signals) with one that only notes the signal; the earlier handlers are restored when the run ends.
The training loop looks after each step, writes a checkpoint and raises :class:`Preempted`; the runner
leaves the result "running" (resumable), and ``trilemma run`` prints one line and exits with status
128 + the signal's number (143 for SIGTERM), as a process killed by it would.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator, Optional

SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1", "SIGUSR2") if hasattr(signal, name))

_received: list[int] = []  # the signals noted while catching, first first


class Preempted(BaseException):
    """A run stopped by a pre-emption signal, its checkpoint and result written. A BaseException, as
    KeyboardInterrupt is: no measurement records it as its failure, and no run is marked failed."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def requested() -> Optional[int]:
    """The pre-emption signal received while catching (its number), or None."""
    return _received[0] if _received else None


def name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


@contextlib.contextmanager
def catching() -> Iterator[None]:
    """Note pre-emption signals instead of dying of them, for the duration of the block (main thread
    only: elsewhere Python cannot install handlers, and the block runs with the handlers it has)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received.clear()
    previous = {}
    try:
        for signum in SIGNALS:
            previous[signum] = signal.signal(signum, _note)
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _received.clear()


def _note(signum: int, frame) -> None:
    _received.append(signum)
