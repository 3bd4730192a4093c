"""Resolution scaling: how a family's cost grows with the image size.

The review (Bond-Taylor et al. 2021) rates every family on "resolution scaling" by judgement; here it
is measured. The model is built afresh at each resolution (families adapt their architecture to the
data shape: more up/down-sampling stages, more pixels to generate one by one), and on random uint8
data of that size we time

    * one training step, ``model.train_step(x, model.configure_optimizers())`` (with uniform random
      ``labels=`` for a class-conditional family);
    * one call of ``model.sample(batch)`` under ``torch.no_grad()``;

each by the timing protocol of :mod:`trilemma.measure.timing` (untimed warm-up, device synchronized
around every call, median of ``repeats`` calls, fewer when one call is longer than ``seconds_cap``). The cost's growth is
summarised by the least-squares slope of log(cost) against log(pixel count): 1 means the cost grows
in proportion to the pixels, 2 means with their square (a pixel-by-pixel sampler whose every step
costs a full network pass over the image), 0 means it does not grow at all.

Memory: on CUDA, the allocator's peak (``torch.cuda.max_memory_allocated``) during the train step and
during sampling, counted from a reset just before each, less what was allocated before the model was
built (a trained model or an FID network already on the device would otherwise add a constant that
flattens the slope); so it counts the model, its optimizer state, the batch and the activations.
A CPU has no allocator peak to read (the process's max RSS never goes down, so it cannot be compared
between resolutions), so there the train memory is an estimate: the bytes of the tensors autograd
saves for the backward pass (the activations, which carry the growth with resolution) plus the
parameters, their gradients and the optimizer state; sampling memory is not measured on a CPU.
``memory_kind`` records which it is.

An out-of-memory error at one resolution is recorded as ``{"status": "oom"}`` for that point and the
study goes on; any other error is recorded as ``{"status": "error"}`` with its message, so one
unsupported size never loses the others. Slopes are fitted over the points that succeeded and are
``None`` with fewer than two.

Pixel-by-pixel and iterative samplers (PixelCNN, VQ-VAE's prior, DDPM, Langevin) are slow at 64x64
on a CPU: keep ``batch_size`` tiny there (2-4); ``seconds_cap`` stops the repeats of a call that runs
longer than it.
"""
from __future__ import annotations

import gc
import math
from typing import Any, Optional

import numpy as np
import torch

from trilemma.contract.family import GenerativeModel, count_parameters
from trilemma.contract.registry import build_model
from trilemma.measure.timing import time_calls, timed

PRECISION = "fp32"
STATUS_OK, STATUS_OOM, STATUS_ERROR = "ok", "oom", "error"
# The cost series a slope is fitted to: slope name -> the point's field.
SLOPE_FIELDS = {"train": "train_seconds", "sample": "sample_seconds", "memory": "memory_bytes"}


def resolution_scaling(model_name: str, model_config: dict[str, Any], channels: int,
                       resolutions: list[int], batch_size: int, repeats: int, device: torch.device,
                       seconds_cap: float = 60.0, seed: int = 0) -> dict[str, Any]:
    """Time a train step and a sampling call at each resolution; fit the log-log slopes.

    ``model_config`` is the family's resolved config as a dict (the ``model_config`` of a run).
    Returns ``{"resolutions", "points", "slopes": {"train", "sample", "memory"}, "batch_size",
    "repeats", "device", "precision", "memory_kind"}``; every point carries its ``status``.
    """
    device = torch.device(device)
    points = []
    # The study draws random data and weights: keep the caller's RNG streams untouched.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for r in resolutions:
            torch.manual_seed(seed)
            points.append(_measure_point(model_name, model_config, (channels, r, r), batch_size,
                                         repeats, device, seconds_cap))
            _release(device)
    return {
        "resolutions": list(resolutions),
        "points": points,
        "slopes": {name: fit_slope(points, field) for name, field in SLOPE_FIELDS.items()},
        "batch_size": batch_size,
        "repeats": repeats,
        "device": str(device),
        "precision": PRECISION,
        "memory_kind": _memory_kind(device),
    }


def _measure_point(name: str, model_config: dict[str, Any], shape: tuple[int, int, int],
                   batch: int, repeats: int, device: torch.device, seconds_cap: float) -> dict[str, Any]:
    """One resolution: ``{"resolution", "pixels", "status", ...}``, never raising for OOM."""
    c, h, w = shape
    point: dict[str, Any] = {"resolution": h, "pixels": h * w}
    baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    try:
        model = build_model(name, shape, None, model_config).to(device)
        optimizers = model.configure_optimizers()
        x = torch.randint(0, 256, (batch, c, h, w), dtype=torch.uint8, device=device)  # (B, C, H, W)
        # A class-conditional family's steps get labels, uniform over its classes (as the loop's are).
        kwargs = ({"labels": torch.randint(0, model.config.num_classes, (batch,), device=device)}
                  if model.capabilities.conditional else {})

        # Training step: the warm-up also measures memory (allocations, optimizer state, kernels).
        model.train()
        train_bytes = _train_memory(model, optimizers, x, device, kwargs) - baseline
        train = time_calls(lambda: model.train_step(x, optimizers, **kwargs), device, repeats, seconds_cap,
                           warmup=0)

        # Sampling, under no_grad as in the sample-speed measurement; its warm-up call measures memory.
        model.eval()
        with torch.no_grad():
            _reset_peak(device)
            timed(lambda: model.sample(batch), device)  # warm-up, untimed
            sample_bytes = torch.cuda.max_memory_allocated(device) - baseline if device.type == "cuda" else None
            sample = time_calls(lambda: model.sample(batch), device, repeats, seconds_cap, warmup=0)
    except Exception as e:  # noqa: BLE001 (recorded per point, not raised: the other sizes still count)
        return point | _failure(e)
    return point | {
        "status": STATUS_OK,
        "train_seconds": train["median"],
        "sample_seconds": sample["median"],
        "train_repeats": train["repeats"],
        "sample_repeats": sample["repeats"],
        "memory_bytes": train_bytes,
        "sample_memory_bytes": sample_bytes,
        "params": count_parameters([model]),
        "nfe_per_sample": next(iter(model.samplers().values())),
    }


def is_oom(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or a RuntimeError saying "out of memory" (CPU allocators, older torch)."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


def _failure(error: BaseException) -> dict[str, Any]:
    first_line = str(error).splitlines()[0] if str(error) else ""
    if is_oom(error):
        return {"status": STATUS_OOM, "message": first_line}
    return {"status": STATUS_ERROR, "type": type(error).__name__, "message": first_line}


def _train_memory(model: GenerativeModel, optimizers, x: torch.Tensor, device: torch.device,
                  kwargs: dict[str, Any]) -> int:
    """Run the warm-up train step and return its memory (see the module docstring for what is counted)."""
    if device.type == "cuda":
        _reset_peak(device)
        timed(lambda: model.train_step(x, optimizers, **kwargs), device)
        return torch.cuda.max_memory_allocated(device)
    # CPU: the storages autograd saves for backward, each counted once, parameters left out.
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.train_step(x, optimizers, **kwargs)
    state = sum(p.numel() * p.element_size() * 2 for p in model.parameters())  # weights + grads
    state += sum(t.numel() * t.element_size() for opt in optimizers.values()
                 for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return sum(saved.values()) + state


def _memory_kind(device: torch.device) -> str:
    return "cuda_max_allocated" if device.type == "cuda" else "cpu_saved_activations_plus_state"


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _release(device: torch.device) -> None:
    """Free the last resolution's model before the next is built (matters after an OOM)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fit_slope(points: list[dict[str, Any]], field: str) -> Optional[float]:
    """Least-squares slope of log(point[field]) against log(pixels), over the successful points."""
    pairs = [(p["pixels"], p.get(field)) for p in points if p.get("status") == STATUS_OK]
    pairs = [(n, v) for n, v in pairs if v is not None and v > 0]
    if len({n for n, _ in pairs}) < 2:
        return None
    logn, logv = np.log([n for n, _ in pairs]), np.log([v for _, v in pairs])
    slope = float(np.polyfit(logn, logv, 1)[0])
    return slope if math.isfinite(slope) else None
