"""Speed, size and memory of a trained model, each returned with the protocol that produced it.

Train speed is measured inside the training loop (``trilemma.run.loop``), step by step, with the
synchronization of :mod:`trilemma.measure.timing`; sample speed here, by the same protocol.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Optional

import torch

from trilemma.contract.family import GenerativeModel, count_parameters
from trilemma.contract.likelihood import from_signed
from trilemma.measure.timing import fp32_label, interquartile_range, is_contended, time_calls, wait_for_quiet


def _execution(model: GenerativeModel, execution: Optional[dict[str, Any]]) -> dict[str, Any]:
    """How the timed calls ran (precision, compile mode, device name, versions: see
    :func:`trilemma.run.execution.execution_record`), or fp32 as torch is set now (tf32 where a GPU
    allows TF32)."""
    if execution:
        return dict(execution)
    return {"precision": fp32_label(model.device), "device": str(model.device)}


def parameters(model: GenerativeModel) -> dict[str, int]:
    return {"total": count_parameters([model]), "sampling": count_parameters(model.sampling_modules())}


_rss_start: Optional[int] = None  # the resident bytes when the CPU's peak was last reset (None: not reset)


def reset_peak_memory(device: torch.device) -> None:
    """Start a phase's memory peak: the CUDA allocator's, or on Linux the process's resident peak
    (``/proc/self/clear_refs``: VmHWM back to the current resident set)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    global _rss_start
    _rss_start = None
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return
    _rss_start = _status_bytes("VmRSS")


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak memory of the phase since the last reset: the CUDA allocator's peak; on a CPU, the
    process's resident peak (``start_bytes``: the resident set at the reset). On a CPU the figure is the
    whole process's (interpreter, torch, the data, the FID network): a run in its own worker process
    (:mod:`trilemma.run.worker`) counts nothing of another run. Where the platform cannot reset the
    peak (not Linux), not measured: a lifetime high-water mark is not the phase's."""
    if device.type == "cuda":
        return {"peak_bytes": torch.cuda.max_memory_allocated(device), "kind": "cuda_max_allocated"}
    peak = _status_bytes("VmHWM") if _rss_start is not None else None
    if peak is None:
        return {"peak_bytes": None, "kind": "not measured (the process's resident peak cannot be reset here)"}
    return {"peak_bytes": peak, "start_bytes": _rss_start, "kind": "cpu_peak_rss"}


def _status_bytes(field: str) -> Optional[int]:
    """A ``kB`` field of ``/proc/self/status`` in bytes; None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


CPU_FIELDS = ("own_cpu", "others_cpu", "contention")  # the CPU share of a timing (measure.timing)
RETIME_WAIT_SECONDS = 60.0  # a contended sample-speed timing is timed again once the machine is quiet, within this


@torch.no_grad()
def sample_speed(model: GenerativeModel, batch: int, repeats: int, seconds_cap: float,
                 sampler: Optional[str] = None, execution: Optional[dict[str, Any]] = None,
                 retime_wait: float = RETIME_WAIT_SECONDS) -> dict[str, Any]:
    """Images/s of ``sample(batch)`` by the timing protocol: one untimed warm-up call, the median of
    up to ``repeats`` timed calls (fewer when one takes longer than ``seconds_cap``); timed again once
    the machine is quiet where other processes held its CPUs (waiting up to ``retime_wait`` seconds)."""
    model.eval()
    name = model.resolve_sampler(sampler)
    timing = time_calls(lambda: model.sample(batch, sampler=name), model.device, repeats, seconds_cap,
                        desc=f"sample speed {model.name} ({name})")
    retimed, warmup = False, timing["warmup_seconds"]
    if timing["contended"] and retime_wait > 0 and wait_for_quiet(model.device, retime_wait):
        # Other processes held CPUs it wanted: timed again once they have left them (else kept, marked).
        timing, retimed = time_calls(lambda: model.sample(batch, sampler=name), model.device, repeats,
                                     seconds_cap, warmup=0), True
    median = timing["median"]
    return {"images_per_second": batch / median, "seconds_per_batch": median,
            "seconds": timing["seconds"], "iqr_seconds": timing["iqr"],
            "warmup_seconds": warmup[0] if warmup else None, "batch_size": batch,  # the re-timing has none
            "repeats": timing["repeats"], "nfe_per_sample": model.samplers()[name],
            "load_before": timing["load_before"], "load_after": timing["load_after"],
            **{k: timing[k] for k in CPU_FIELDS}, "retimed": retimed,
            "contended": timing["contended"], "source": "timed calls", **_execution(model, execution),
            "batch_size": batch}


def speed_from_batches(model: GenerativeModel, fid: Optional[dict[str, Any]], sampler: str,
                       batch: int, execution: Optional[dict[str, Any]] = None) -> Optional[dict[str, Any]]:
    """The sample-speed record of ``sampler`` from the timed batches of a FID measurement of the same
    sampler at the same batch (the first batch is the untimed warm-up), or None when there are too
    few. The FID drew them with the device synchronized around each call, as :func:`sample_speed` does."""
    if not fid or fid.get("sampler") != sampler or fid.get("sample_batch") != batch:
        return None
    times = fid.get("batch_seconds") or []
    if len(times) < 2:
        return None
    timed_batches = times[1:]
    median = statistics.median(timed_batches)
    share = {k: fid.get(k) for k in CPU_FIELDS}
    return {"images_per_second": batch / median, "seconds_per_batch": median, "seconds": timed_batches,
            "iqr_seconds": interquartile_range(timed_batches), "warmup_seconds": times[0], "batch_size": batch,
            "repeats": len(timed_batches), "nfe_per_sample": model.samplers()[sampler],
            "load_before": fid.get("load_before"), "load_after": fid.get("load_after"),
            **share, "contended": is_contended(share, fid.get("load_before"), fid.get("load_after")),
            "source": "the FID's sampling batches", **_execution(model, execution), "batch_size": batch}


def sample_uint8(model: GenerativeModel, n: int, sampler: Optional[str] = None) -> torch.Tensor:
    """``n`` samples as uint8 images on the CPU (the 256 levels, as the data)."""
    return from_signed(model.sample(n, sampler=sampler)).cpu()
