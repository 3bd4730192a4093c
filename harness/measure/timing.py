"""The one timing protocol, used by train speed, sample speed and the resolution-scaling study.

    * the device is synchronized on both sides of every timed call (a CUDA kernel queue would
      otherwise return before the work is done);
    * ``warmup`` untimed calls come first (allocations, kernel selection, caches, compilation);
    * then up to ``repeats`` timed calls; a call that takes longer than ``seconds_cap`` ends the
      repeats early (a pixel-by-pixel sampler at 64x64 on a CPU), and the record says how many ran;
    * the figure is the median, with the interquartile range and every time kept;
    * the machine's 1-minute load average is read before and after, so a figure timed on a busy
      machine can be told apart (``os.getloadavg``; None where the platform has none); a figure
      timed while the load exceeded the machine's cores is marked ``contended`` (other processes
      held the CPUs, so the figure is a lower bound on the speed).
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Any, Callable, Optional

import torch
from tqdm.auto import tqdm


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def fp32_label(device: torch.device) -> str:
    """What plain fp32 arithmetic is on ``device`` as torch is set now: ``tf32`` on a CUDA device with
    TF32 matmuls or convolutions allowed (cuDNN allows them by default), else ``fp32``."""
    tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32
    return "tf32" if torch.device(device).type == "cuda" and tf32 else "fp32"


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds of one call of ``fn`` with the device synchronized on both sides, and its result."""
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - t0, out


def load_average() -> Optional[float]:
    """The 1-minute load average, or None where the platform does not report one."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def contended(load_before: Optional[float], load_after: Optional[float], cores: Optional[int] = None) -> bool:
    """Whether the 1-minute load average exceeded the machine's cores at either end of a timing.

    The load counts the timed process itself, so a fully used machine reads about ``cores``; above
    it, runnable processes were waiting for a CPU."""
    cores = cores or os.cpu_count() or 1
    return any(load is not None and load > cores + 0.5 for load in (load_before, load_after))


def time_calls(fn: Callable[[], Any], device: torch.device, repeats: int, seconds_cap: float = float("inf"),
               warmup: int = 1, desc: Optional[str] = None) -> dict[str, Any]:
    """Time ``fn`` by the protocol above; returns the record every timed figure carries.

    ``{"median", "iqr", "seconds", "repeats", "warmup_seconds", "load_before", "load_after", "cores",
    "contended"}``. With ``desc``, a progress bar of the calls appears once they have taken 2 s.
    """
    bar = tqdm(total=warmup + max(1, repeats), desc=desc, unit="call", leave=False, delay=2.0,
               disable=desc is None, dynamic_ncols=True)
    load_before = load_average()
    warm = []
    for _ in range(warmup):
        warm.append(timed(fn, device)[0])
        bar.update()
    times: list[float] = []
    for _ in range(max(1, repeats)):
        times.append(timed(fn, device)[0])
        bar.update()
        if times[-1] > seconds_cap:
            break
    bar.close()
    load_after = load_average()
    return {"median": statistics.median(times), "iqr": interquartile_range(times), "seconds": times,
            "repeats": len(times), "warmup_seconds": warm, "load_before": load_before,
            "load_after": load_after, "cores": os.cpu_count(),
            "contended": contended(load_before, load_after)}


def interquartile_range(values: list[float]) -> float:
    """Q3 - Q1 (0 for fewer than two values)."""
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q3 - q1


class StepTimer:
    """Seconds of each training step, without serialising a GPU's stream.

    On a CPU (or any device but CUDA) each step is timed as every other figure is: the device
    synchronized on both sides, ``perf_counter`` read, the seconds known at once. On a CUDA device a
    synchronize per step would stop the host from queuing the next step while the device works, which
    is the overlap that keeps small models fast; there each step records a CUDA event before and after
    its work on the current stream, and the elapsed times are read only when :meth:`collect` is called
    (the loop does at logging ticks, at evaluation points and when the time budget may be spent), with
    one wait for the last event. The interval between a step's two events is the device time of that
    step's queued work, launch gaps included, and excludes what the host queued between steps (the EMA).

    ``event`` makes the CUDA events (``torch.cuda.Event(enable_timing=True)`` by default; a stand-in in
    the CPU tests).
    """

    def __init__(self, device: torch.device, event: Optional[Callable[[], Any]] = None):
        self.device = torch.device(device)
        self.deferred = self.device.type == "cuda" or event is not None
        self._event = event or (lambda: torch.cuda.Event(enable_timing=True))
        self._pending: list[tuple[Any, Any]] = []  # (start, end) events of steps not yet collected
        self._done: list[float] = []  # seconds of steps timed synchronously, not yet collected
        self._t0 = 0.0
        self._start: Any = None

    def start(self) -> None:
        if self.deferred:
            self._start = self._event()
            self._start.record()
        else:
            synchronize(self.device)
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self.deferred:
            end = self._event()
            end.record()
            self._pending.append((self._start, end))
        else:
            synchronize(self.device)
            self._done.append(time.perf_counter() - self._t0)

    @property
    def pending(self) -> int:
        """Steps stopped but not yet collected."""
        return len(self._pending) + len(self._done)

    def collect(self) -> list[float]:
        """The seconds of every step stopped since the last call, in order (waits for the device)."""
        if self._pending:
            self._pending[-1][1].synchronize()
            self._done += [start.elapsed_time(end) / 1000.0 for start, end in self._pending]
            self._pending = []
        done, self._done = self._done, []
        return done
