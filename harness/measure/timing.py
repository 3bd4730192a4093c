"""The one timing protocol, used by train speed, sample speed and the resolution-scaling study.

    * the device is synchronized on both sides of every timed call (a CUDA kernel queue would
      otherwise return before the work is done);
    * ``warmup`` untimed calls come first (allocations, kernel selection, caches, compilation);
    * then up to ``repeats`` timed calls; a call that takes longer than ``seconds_cap`` ends the
      repeats early (a pixel-by-pixel sampler at 64x64 on a CPU), and the record says how many ran;
    * the figure is the median, with the interquartile range and every time kept;
    * the machine's 1-minute load average is read before and after, so a figure timed on a busy
      machine can be told apart (``os.getloadavg``; None where the platform has none);
    * and, where the kernel reports it (Linux's ``/proc/stat``), the CPU time every process spent
      during the timed calls, less this process's own: ``others_cpu``, the cores other processes kept
      busy on average while the figure was timed. A figure is marked ``contended`` when those cores
      took more than ``CONTENTION_SHARE`` of the machine's cores from those this process wanted (they
      held CPUs it wanted, so the figure is a lower bound on the speed); without
      ``/proc/stat``, or over a window too short for its clock ticks, when the load average exceeded the
      cores. The load average lags by a minute both ways (a hog that just stopped still counts, one that
      just started does not); the CPU share is of the timed window itself.
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


CONTENTION_SHARE = 0.1  # contended: other processes took more than this share of the machine's cores from us
CPU_WINDOW_SECONDS = 0.2  # the shortest window over which /proc/stat's clock ticks measure a CPU share


def cpu_snapshot() -> Optional[tuple[float, float, float]]:
    """``(wall seconds, seconds all CPUs were busy, this process's CPU seconds)`` now, from Linux's
    ``/proc/stat`` and ``os.times``; None where there is no ``/proc/stat``."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy = (sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)) / ticks
    own = os.times()
    return time.perf_counter(), busy, own.user + own.system


def cpu_share(before: Optional[tuple[float, float, float]], after: Optional[tuple[float, float, float]],
              device: torch.device | str = "cpu", cores: Optional[int] = None,
              peers: int = 0) -> dict[str, Optional[float]]:
    """Between two :func:`cpu_snapshot`\\ s: ``own_cpu`` and ``others_cpu``, the cores this process and
    all others kept busy on average, and ``contention``: the cores the others took of those this process
    wanted (on a CPU, its torch threads; on an accelerator, the cores it used; times ``1 + peers``); None
    where unknown or the window was too short."""
    unknown = {"own_cpu": None, "others_cpu": None, "contention": None}
    if before is None or after is None or after[0] - before[0] < CPU_WINDOW_SECONDS:
        return unknown
    wall = after[0] - before[0]
    own = max(0.0, (after[2] - before[2]) / wall)
    # ``peers``: processes of the same job (data-parallel ranks), each taken to use what this one does.
    others = max(0.0, (after[1] - before[1]) / wall - own * (1 + peers))
    cores = cores or os.cpu_count() or 1
    wanted = (torch.get_num_threads() if torch.device(device).type == "cpu" else max(1.0, own)) * (1 + peers)
    return {"own_cpu": own, "others_cpu": others, "contention": max(0.0, others - (cores - min(wanted, cores)))}


class CpuMeter:
    """The CPU share summed over several timed windows (a FID's sampling batches, between which its
    feature extraction runs): :meth:`measure` a call, then :meth:`share`."""

    def __init__(self):
        self.total, self.known = [0.0, 0.0, 0.0], True

    def measure(self, fn: Callable[[], Any]) -> Any:
        before = cpu_snapshot()
        out = fn()
        after = cpu_snapshot()
        if before is None or after is None:
            self.known = False
        else:
            self.total = [t + b - a for t, a, b in zip(self.total, before, after)]
        return out

    def share(self, device: torch.device | str = "cpu") -> dict[str, Optional[float]]:
        return cpu_share((0.0, 0.0, 0.0), tuple(self.total), device) if self.known else cpu_share(None, None)


def wait_for_quiet(device: torch.device | str = "cpu", max_wait: float = 60.0, window: float = 2.0) -> bool:
    """Wait, up to ``max_wait`` seconds, until other processes leave this process's CPUs alone for a
    ``window`` (the contention of an idle wait is measured, so this process's wanted threads count as
    free); True once they do, False if they never did (or the share cannot be measured)."""
    deadline = time.perf_counter() + max_wait
    while time.perf_counter() < deadline:
        before = cpu_snapshot()
        if before is None:
            return False
        time.sleep(window)
        if not is_contended(cpu_share(before, cpu_snapshot(), device), None, None):
            return True
    return False


def is_contended(share: dict[str, Optional[float]], load_before: Optional[float], load_after: Optional[float],
                 cores: Optional[int] = None) -> bool:
    """The ``contended`` mark: from the CPU share where it was measured (others took more than
    ``CONTENTION_SHARE`` of the machine's cores from those this process wanted), else from the load."""
    cores = cores or os.cpu_count() or 1
    if share.get("contention") is not None:
        return share["contention"] > CONTENTION_SHARE * cores
    return contended(load_before, load_after, cores)


def time_calls(fn: Callable[[], Any], device: torch.device, repeats: int, seconds_cap: float = float("inf"),
               warmup: int = 1, desc: Optional[str] = None) -> dict[str, Any]:
    """Time ``fn`` by the protocol above; returns the record every timed figure carries.

    ``{"median", "iqr", "seconds", "repeats", "warmup_seconds", "load_before", "load_after", "cores",
    "own_cpu", "others_cpu", "contention", "threads", "contended"}``. With ``desc``, a progress bar of the
    calls appears once they have taken 2 s.
    """
    bar = tqdm(total=warmup + max(1, repeats), desc=desc, unit="call", leave=False, delay=2.0,
               disable=desc is None, dynamic_ncols=True)
    load_before = load_average()
    warm = []
    for _ in range(warmup):
        warm.append(timed(fn, device)[0])
        bar.update()
    times: list[float] = []
    before = cpu_snapshot()
    for _ in range(max(1, repeats)):
        times.append(timed(fn, device)[0])
        bar.update()
        if times[-1] > seconds_cap:
            break
    share = cpu_share(before, cpu_snapshot(), device)
    bar.close()
    load_after = load_average()
    return {"median": statistics.median(times), "iqr": interquartile_range(times), "seconds": times,
            "repeats": len(times), "warmup_seconds": warm, "load_before": load_before,
            "load_after": load_after, "cores": os.cpu_count(), **share,
            "threads": torch.get_num_threads(),
            "contended": is_contended(share, load_before, load_after)}


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
