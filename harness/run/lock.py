"""A run folder claimed by one process at a time, so concurrent runners never train a run twice.

The claim is an OS record lock (``fcntl.lockf``) on ``<run>/.lock``: the OS drops it when the holding
process ends, however it ends (SIGKILL included), so a dead runner never leaves a stale claim behind,
and POSIX record locks also hold across hosts on NFS (a SLURM cluster's shared results folder). The
file records the holder's pid, host and start time, for the message another runner prints. Two
runners on one suite split its runs between them: each skips what the other holds, then waits for those
runs to be released and finds them done.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

try:
    import fcntl
except ImportError:  # Windows: no record locks; runs are not claimed (one runner at a time there)
    fcntl = None

LOCK_FILE = ".lock"


class RunLock:
    """``acquire()`` without waiting, or ``wait()``; ``release()``; ``holder()`` says who holds it."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: Optional[int] = None

    def acquire(self, block: bool = False) -> bool:
        """Claim the run; False when another process holds it (and ``block`` is False)."""
        if fcntl is None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX if block else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        # Ours now: say who holds it (rewritten in place; the lock stays on the open descriptor).
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "since": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, info, 0)
        self.fd = fd
        return True

    def wait(self) -> None:
        self.acquire(block=True)

    def release(self) -> None:
        if self.fd is not None:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def holder(self) -> str:
        """"pid 123 on host-a since ..." of the current holder, as far as the file says."""
        try:
            info = json.loads(self.path.read_text() or "{}")
            return f"pid {info['pid']} on {info['host']} since {info['since']}"
        except (OSError, ValueError, KeyError):
            return "another process"

    def __enter__(self) -> "RunLock":
        self.wait()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
