"""Resolution scaling: how a family's cost grows with the image size.

The review (Bond-Taylor et al. 2021) rates every family on "resolution scaling" by judgement; here it
is measured. The model is built afresh at each resolution (families adapt their architecture to the
data shape: more up/down-sampling stages, more pixels to generate one by one), and on random uint8
data of that size we time

    * one training step, ``model.train_step(x, plain_update(model))`` (with uniform random
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

The batch: a fixed small batch measures per-call overhead more than the architecture (at batch 4 on a
CPU, RealNVP's fitted slope was 0.34; at 32, 0.84), so with ``batch_size`` 0 each resolution and each
of the two calls gets a batch that fills the device: at the smallest resolution, starting from 1, the
batch doubles until one call takes ``fill_seconds`` or more, the device runs out of memory (the last
batch that fit is kept), or ``max_batch`` is reached; every larger resolution keeps the pixels per
call (batch x pixels) of that batch, halving it where memory runs out. Every call then does the
same work for a fixed-width network, so the slope is the family's, not the batch's efficiency
(doubling again at each resolution picked batches whose per-image cost differed by 20 %).
The cost is then per image (``train_seconds_per_image``, seconds of a
call / its batch; the fastest of the repeats, the least disturbed on a shared machine), and the
chosen batches are recorded with each point (``train_batch``,
``sample_batch``), so the figure shows the points behind every slope. With a fixed ``batch_size`` > 0
the per-image cost is the same call's seconds / that batch, and the slopes equal the per-call ones.
Memory is the train step's at its chosen batch, per image.

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
from tqdm.auto import tqdm

from trilemma.contract.family import GenerativeModel, count_parameters
from trilemma.contract.registry import build_model
from trilemma.contract.update import Update, plain_update
from trilemma.measure.timing import fp32_label, time_calls, timed

STATUS_OK, STATUS_OOM, STATUS_ERROR = "ok", "oom", "error"
# The cost series a slope is fitted to: slope name -> the point's field.
SLOPE_FIELDS = {"train": "train_seconds_per_image", "sample": "sample_seconds_per_image",
                "memory": "memory_bytes_per_image"}
FILL_SECONDS = 0.25  # batch 0: a call of at least this long fills the device (launch overheads amortized)
MAX_BATCH = 4096


def resolution_scaling(model_name: str, model_config: dict[str, Any], channels: int,
                       resolutions: list[int], batch_size: int, repeats: int, device: torch.device,
                       seconds_cap: float = 60.0, seed: int = 0, fill_seconds: float = FILL_SECONDS,
                       max_batch: int = MAX_BATCH) -> dict[str, Any]:
    """Time a train step and a sampling call at each resolution; fit the log-log slopes.

    ``model_config`` is the family's resolved config as a dict (the ``model_config`` of a run).
    Returns ``{"resolutions", "points", "slopes": {"train", "sample", "memory"}, "batch_size",
    "repeats", "device", "precision", "memory_kind"}``; every point carries its ``status``.
    """
    device = torch.device(device)
    points = []
    # The study draws random data and weights: keep the caller's RNG streams untouched.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        per_call: dict[str, int] = {}  # batch 0: pixels per call of each call, from the first resolution
        bar = tqdm(sorted(resolutions), desc=f"scaling {model_name}", unit="size", leave=False,
                   dynamic_ncols=True)
        for r in bar:
            bar.set_postfix_str(f"{r}x{r}")
            torch.manual_seed(seed)
            point = _measure_point(model_name, model_config, (channels, r, r), batch_size, repeats, device,
                                   seconds_cap, fill_seconds, max_batch, per_call)
            if point["status"] == STATUS_OK and not per_call and batch_size <= 0:
                per_call = {k: point[f"{k}_batch"] * point["pixels"] for k in ("train", "sample")}
            points.append(point)
            _release(device)
    return {
        "resolutions": list(resolutions),
        "points": points,
        "slopes": {name: fit_slope(points, field) for name, field in SLOPE_FIELDS.items()},
        "batch_size": batch_size,
        "batch_protocol": (f"doubled from 1 at the smallest resolution until a call takes "
                           f"{fill_seconds:g} s, memory runs out, or {max_batch}; its pixels per call kept above"
                           if batch_size <= 0 else f"fixed at {batch_size}"),
        "repeats": repeats,
        "device": str(device),
        "precision": fp32_label(device),
        "memory_kind": _memory_kind(device),
    }


def _measure_point(name: str, model_config: dict[str, Any], shape: tuple[int, int, int],
                   batch: int, repeats: int, device: torch.device, seconds_cap: float,
                   fill_seconds: float = FILL_SECONDS, max_batch: int = MAX_BATCH,
                   per_call: Optional[dict[str, int]] = None) -> dict[str, Any]:
    """One resolution: ``{"resolution", "pixels", "status", ...}``, never raising for OOM.

    ``batch`` 0: the batch of each call is ``per_call[call] / pixels`` (a larger resolution) or found
    by :func:`fill_batch` (the first)."""
    c, h, w = shape
    point: dict[str, Any] = {"resolution": h, "pixels": h * w}
    baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    data = lambda b: torch.randint(0, 256, (b, c, h, w), dtype=torch.uint8, device=device)  # noqa: E731
    try:
        model = build_model(name, shape, None, model_config).to(device)
        update = plain_update(model)
        # A class-conditional family's steps get labels, uniform over its classes (as the loop's are).
        conditional = getattr(getattr(model, "capabilities", None), "conditional", False)
        labels = lambda b: ({"labels": torch.randint(0, model.config.num_classes, (b,), device=device)}  # noqa: E731
                            if conditional else {})

        # Training step at its batch; the warm-up also measures memory (optimizer state, kernels).
        model.train()
        train_batch = choose_batch(lambda b: model.train_step(data(b), update, **labels(b)), device, batch,
                                   h * w, (per_call or {}).get("train"), fill_seconds, max_batch)
        x, kwargs = data(train_batch), labels(train_batch)  # (B, C, H, W)
        train_bytes = _train_memory(model, update, x, device, kwargs) - baseline
        train = time_calls(lambda: model.train_step(x, update, **kwargs), device, repeats, seconds_cap,
                           warmup=0)
        del x

        # Sampling, under no_grad as in the sample-speed measurement; its warm-up call measures memory.
        model.eval()
        with torch.no_grad():
            sample_batch = choose_batch(lambda b: model.sample(b), device, batch, h * w,
                                        (per_call or {}).get("sample"), fill_seconds, max_batch)
            sample_bytes = None
            if device.type == "cuda" or batch > 0:
                # The warm-up, untimed, which on a GPU also measures memory. On a CPU a chosen batch
                # was just run at this size (the batch search's last call: kernels and allocations
                # warm), and a second warm-up of an autoregressive sampler at 64x64 costs seconds.
                _reset_peak(device)
                timed(lambda: model.sample(sample_batch), device)
                if device.type == "cuda":
                    sample_bytes = torch.cuda.max_memory_allocated(device) - baseline
            sample = time_calls(lambda: model.sample(sample_batch), device, repeats, seconds_cap, warmup=0)
    except Exception as e:  # noqa: BLE001 (recorded per point, not raised: the other sizes still count)
        return point | _failure(e)
    return point | {
        "status": STATUS_OK,
        "train_seconds": train["median"],
        "sample_seconds": sample["median"],
        "train_batch": train_batch,
        "sample_batch": sample_batch,
        # The slopes' costs: the fastest repeat per image, the least disturbed by other processes on
        # a shared machine (the medians are kept beside them).
        "train_seconds_per_image": min(train["seconds"]) / train_batch,
        "sample_seconds_per_image": min(sample["seconds"]) / sample_batch,
        "train_repeats": train["repeats"],
        "sample_repeats": sample["repeats"],
        "contended": train["contended"] or sample["contended"],
        "memory_bytes": train_bytes,
        "memory_bytes_per_image": train_bytes / train_batch,
        "sample_memory_bytes": sample_bytes,
        "params": count_parameters([model]),
        "nfe_per_sample": next(iter(model.samplers().values())),
    }


def choose_batch(call, device: torch.device, batch: int, pixels: int, per_call: Optional[int],
                 fill_seconds: float, max_batch: int) -> int:
    """A fixed ``batch``; else the pixels per call of the first resolution, halved until it fits in
    memory; else (the first resolution) the batch that fills the device."""
    if batch > 0:
        return batch
    if per_call is None:
        return fill_batch(call, device, fill_seconds, max_batch)
    batch = max(1, round(per_call / pixels))
    while True:
        try:
            timed(lambda: call(batch), device)  # fits in memory? (also the warm-up at this size)
            return batch
        except Exception as e:  # noqa: BLE001
            if not (is_oom(e) and batch > 1):
                raise
            _release(device)
            batch //= 2


def fill_batch(call, device: torch.device, fill_seconds: float, max_batch: int) -> int:
    """The batch that fills the device for ``call(batch)``: doubled from 1 until a call (the faster of
    two, after an untimed one at the same batch: one stall of a busy machine must not stop the search
    early) takes ``fill_seconds``, the next size runs out of memory, or ``max_batch`` is reached."""
    batch = 1
    while True:
        try:
            timed(lambda: call(batch), device)  # allocations and kernel choice at this size
            seconds = min(timed(lambda: call(batch), device)[0] for _ in range(2))
        except Exception as e:  # noqa: BLE001
            if is_oom(e) and batch > 1:
                _release(device)
                return batch // 2
            raise
        if seconds >= fill_seconds or batch * 2 > max_batch:
            return batch
        batch *= 2


def is_oom(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or a RuntimeError saying "out of memory" (CPU allocators, older torch)."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


def _failure(error: BaseException) -> dict[str, Any]:
    first_line = str(error).splitlines()[0] if str(error) else ""
    if is_oom(error):
        return {"status": STATUS_OOM, "message": first_line}
    return {"status": STATUS_ERROR, "type": type(error).__name__, "message": first_line}


def _train_memory(model: GenerativeModel, update: Update, x: torch.Tensor, device: torch.device,
                  kwargs: dict[str, Any]) -> int:
    """Run the warm-up train step and return its memory (see the module docstring for what is counted)."""
    if device.type == "cuda":
        _reset_peak(device)
        timed(lambda: model.train_step(x, update, **kwargs), device)
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
        model.train_step(x, update, **kwargs)
    state = sum(p.numel() * p.element_size() * 2 for p in model.parameters())  # weights + grads
    state += sum(t.numel() * t.element_size() for opt in update.optimizers.values()
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
