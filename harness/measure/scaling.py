"""Resolution scaling: how a family's cost grows with the image size.

The review (Bond-Taylor et al. 2021) rates every family on "resolution scaling" by judgement; here it
is measured. The model is built afresh at each resolution (families adapt their architecture to the
data shape: more up/down-sampling stages, more pixels to generate one by one), and on random uint8
data of that size we time

    * one training step, ``model.train_step(x, plain_update(model))`` (with uniform random
      ``labels=`` for a class-conditional family);
    * one call of ``model.sample(batch)`` under ``torch.no_grad()``;

each by the timing protocol of :mod:`trilemma.measure.timing` (untimed warm-up, device synchronized
around every call, ``repeats`` timed calls, fewer when one call is longer than ``seconds_cap``). The
cost's growth is summarised by the least-squares slope of log(cost) against log(pixel count): 1 means the cost grows
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

The batch: the cost per image depends on it (launch overheads amortized over a larger batch, caches
overflowing at a still larger one: at a fixed batch of 4 on a CPU RealNVP's fitted slope was 0.21, at
64, 0.68), so each resolution and each of the two calls is timed at its most efficient batch: the least
per-image cost over a small sweep of batches (powers of two). The sweep starts at ``batch_size`` at the
smallest resolution (0: from 1, the train step from 2, whose batch statistics need two images) and,
above it, at the previous resolution's pixels per call. It doubles while a call is shorter than
``fill_seconds``; beyond, while doubling lowers the per-image cost by more than ``SWEEP_GAIN``, up to
calls of ``STRETCH`` times that, and further while doubling still saves more than ``OVERHEAD_GAIN`` per
image; and always only while the next call would stay under ``seconds_cap`` (an iterative sampler's
call is long from batch 1 while each of its steps is mostly overhead: DDPM's sweep from batch 2 stopped
at 2 under a fixed stretch, a slope of 0.09 against 1.04 from batch 64); up to ``max_batch`` at the
smallest resolution and as many pixels per call above it, so that no size is held to a less efficient
batch than the others. A sampling call's ``fill_seconds`` is at least ``EVAL_FILL_SECONDS`` per network
evaluation of the default sampler (its NFE), since it is each evaluation that has to fill the device.
From a start whose call was long already it halves while that pays by ``SWEEP_GAIN`` (a smaller batch
may fit a cache: DDPM's per-image cost at 256 was above that at 64). The cheapest of the batches tried
is the point's. Every batch tried gets one untimed call and ``SWEEP_TIMED`` timed ones (one where the
call is longer than the fill time); the cheapest then gets timed calls up to ``repeats``. The cost is
per image (``train_seconds_per_image``, the fastest timed call / its batch, the least disturbed on a
shared machine), and each point records the chosen batches (``train_batch``, ``sample_batch``) and the
sweep (``train_sweep``: [batch, seconds per image] of every batch tried). The slope thus belongs to the
family, not to a batch setting: ``batch_size`` only moves where the search starts. Memory is the train
step's at its chosen batch, per image.

Beside the timed slopes, ``flop_slopes`` fit the FLOPs per image counted
(:mod:`trilemma.measure.flops`: matmuls and convolutions) in one call at the smallest batch at each
resolution: the same on every machine, where the timed slope also carries the machine's caches and
overheads. ``slope_intervals`` give each timed slope's 95 % half-width, the spread of the timed calls
at each point propagated through the least-squares fit (None where a point was timed once).

Pixel-by-pixel and iterative samplers (PixelCNN, VQ-VAE's prior, DDPM, Langevin) are slow at 64x64
on a CPU: the sweep stops doubling at a call of ``fill_seconds``, and ``seconds_cap`` stops the timed
calls of one that runs longer than it.
"""
from __future__ import annotations

import gc
import math
import statistics
import time
from typing import Any, Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from trilemma.contract.family import GenerativeModel, count_parameters
from trilemma.contract.registry import build_model
from trilemma.contract.update import Update, plain_update
from trilemma.measure.flops import count_flops, counting_flops
from trilemma.measure.timing import fp32_label, interquartile_range, time_calls, timed

STATUS_OK, STATUS_OOM, STATUS_ERROR = "ok", "oom", "error"
# The cost series a slope is fitted to: slope name -> the point's field.
SLOPE_FIELDS = {"train": "train_seconds_per_image", "sample": "sample_seconds_per_image",
                "memory": "memory_bytes_per_image"}
FLOP_FIELDS = {"train": "train_flops_per_image", "sample": "sample_flops_per_image"}
FILL_SECONDS = 0.25  # the sweep doubles a batch only while its call is shorter (launch overheads amortized)
MAX_BATCH = 4096
TRAIN_MIN_BATCH = 2  # batch statistics in training mode need two images (BatchNorm at batch 1 fails)
SWEEP_TIMED = 2  # timed calls per batch of the sweep whose call is short (a long one: 1), after one untimed
SWEEP_GAIN = 0.05  # a long call's batch is doubled (or halved) only if that is this much cheaper per image
STRETCH = 4  # ... up to calls of STRETCH * fill_seconds
EVAL_FILL_SECONDS = 0.01  # a sampler's call fills the device once each network evaluation takes this long
OVERHEAD_GAIN = 0.3  # ... and beyond, while doubling saves this much per image (the call mostly overhead)
LEVEL_Z = 1.96  # the slopes' intervals: 95 %, normal


def resolution_scaling(model_name: str, model_config: dict[str, Any], channels: int,
                       resolutions: list[int], batch_size: int, repeats: int, device: torch.device,
                       seconds_cap: float = 60.0, seed: int = 0, fill_seconds: float = FILL_SECONDS,
                       max_batch: int = MAX_BATCH) -> dict[str, Any]:
    """Time a train step and a sampling call at each resolution, each at its most efficient batch; fit
    the log-log slopes of the timed costs and of the counted FLOPs.

    ``model_config`` is the family's resolved config as a dict (the ``model_config`` of a run);
    ``batch_size`` is where the batch sweep starts at the smallest resolution (0: the smallest batch).
    Returns ``{"resolutions", "points", "slopes": {"train", "sample", "memory"}, "slope_intervals",
    "flop_slopes", "batch_size", "batch_protocol", "repeats", "device", "precision", "memory_kind"}``;
    every point carries its ``status``.
    """
    device = torch.device(device)
    points = []
    # The study draws random data and weights: keep the caller's RNG streams untouched.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        per_call: dict[str, int] = {}  # pixels per call of each call's batch at the previous resolution
        bar = tqdm(sorted(resolutions), desc=f"scaling {model_name}", unit="size", leave=False,
                   dynamic_ncols=True)
        for r in bar:
            bar.set_postfix_str(f"{r}x{r}")
            torch.manual_seed(seed)
            starts = ({k: max(1, round(n / (r * r))) for k, n in per_call.items()} if per_call
                      else {"train": batch_size, "sample": batch_size})
            # The batch cap is one of pixels per call: a size capped at the smallest would otherwise be
            # timed at a less efficient batch than the larger ones, flattening the slope.
            cap = max(1, max_batch * min(resolutions) ** 2 // (r * r))
            point = _measure_point(model_name, model_config, (channels, r, r), starts, repeats, device,
                                   seconds_cap, fill_seconds, cap)
            if point["status"] == STATUS_OK:
                per_call = {k: point[f"{k}_batch"] * point["pixels"] for k in ("train", "sample")}
            points.append(point)
            _release(device)
    return {
        "resolutions": list(resolutions),
        "points": points,
        "slopes": {name: fit_slope(points, field) for name, field in SLOPE_FIELDS.items()},
        "slope_intervals": {name: slope_interval(points, name) for name in ("train", "sample")},
        "flop_slopes": {name: fit_slope(points, field) for name, field in FLOP_FIELDS.items()},
        "batch_size": batch_size,
        "batch_protocol": (f"per resolution and call, the least per-image cost over batches doubled from "
                           f"{batch_size or 1} (the train step from {max(batch_size, TRAIN_MIN_BATCH)}; above "
                           f"the smallest resolution, from the previous one's pixels per call) while a call "
                           f"takes under {fill_seconds:g} s (a sampling call: at least {EVAL_FILL_SECONDS:g} s per "
                           f"network evaluation), under {STRETCH * fill_seconds:g} s while the per-image "
                           f"cost falls by over {SWEEP_GAIN:.0%}, and while it falls by over {OVERHEAD_GAIN:.0%}, "
                           f"each while the next call stays under {seconds_cap:g} s (halved while it falls by "
                           f"{SWEEP_GAIN:.0%} from a "
                           f"longer first call), up to {max_batch} at the smallest resolution and as many "
                           f"pixels per call above it; {SWEEP_TIMED} timed calls per batch after an untimed "
                           f"one (1 for a call over the fill time), {repeats} at the chosen batch"),
        "repeats": repeats,
        "device": str(device),
        "precision": fp32_label(device),
        "memory_kind": _memory_kind(device),
    }


def _measure_point(name: str, model_config: dict[str, Any], shape: tuple[int, int, int],
                   starts: dict[str, int], repeats: int, device: torch.device, seconds_cap: float,
                   fill_seconds: float = FILL_SECONDS, max_batch: int = MAX_BATCH) -> dict[str, Any]:
    """One resolution: ``{"resolution", "pixels", "status", ...}``, never raising for OOM. ``starts``:
    the batch each call's sweep starts from (``train``, ``sample``; 0: the smallest)."""
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

        def train_call(b: int):
            x, kwargs = data(b), labels(b)  # (B, C, H, W)
            return lambda: model.train_step(x, update, **kwargs)

        def train_warm(b: int, call) -> None:  # each batch's untimed call also measures its memory
            train_memory[b] = _train_memory(model, update, call, device)

        def sample_warm(b: int, call) -> None:
            sample_memory[b] = _peak_memory(call, device)

        # Training step, at the batch of least cost per image. The sweep's steps update the weights (on
        # random data, where they may diverge): sampling is timed on the weights as built.
        built = {k: v.clone() for k, v in model.state_dict().items()}
        model.train()
        train_memory: dict[int, int] = {}
        train_flops = _Flops(TRAIN_MIN_BATCH, train_warm)
        train_batch, train, train_sweep = sweep_batch(train_call, device, starts["train"], TRAIN_MIN_BATCH,
                                                      max_batch, fill_seconds, repeats, seconds_cap,
                                                      train_flops.warm)
        train_bytes = train_memory[train_batch] - baseline
        train_flops_per_image = train_flops.per_image(lambda: train_call(TRAIN_MIN_BATCH)())

        # Sampling, under no_grad as in the sample-speed measurement.
        model.load_state_dict(built)
        del built
        model.eval()
        with torch.no_grad():
            sample_memory: dict[int, Optional[int]] = {}
            sample_flops = _Flops(1, sample_warm)
            # An iterative sampler's call is many network evaluations: it fills the device once each
            # of them is long enough, not the call (100 small steps take a second at batch 1).
            nfe = next(iter(model.samplers().values()))
            sample_fill = max(fill_seconds, nfe * EVAL_FILL_SECONDS)
            sample_batch, sample, sample_sweep = sweep_batch(lambda b: lambda: model.sample(b), device,
                                                             starts["sample"], 1, max_batch, sample_fill,
                                                             repeats, seconds_cap, sample_flops.warm)
            sample_bytes = sample_memory[sample_batch]
            sample_bytes = None if sample_bytes is None else sample_bytes - baseline
            sample_flops_per_image = sample_flops.per_image(lambda: model.sample(1))
    except Exception as e:  # noqa: BLE001 (recorded per point, not raised: the other sizes still count)
        return point | _failure(e)
    return point | {
        "status": STATUS_OK,
        "train_seconds": train["median"],
        "sample_seconds": sample["median"],
        "train_batch": train_batch,
        "sample_batch": sample_batch,
        # The slopes' costs: the fastest timed call per image, the least disturbed by other processes on
        # a shared machine (the medians are kept beside them).
        "train_seconds_per_image": min(train["seconds"]) / train_batch,
        "sample_seconds_per_image": min(sample["seconds"]) / sample_batch,
        "train_timings": train["seconds"],
        "sample_timings": sample["seconds"],
        "train_sweep": train_sweep,
        "sample_sweep": sample_sweep,
        "train_repeats": train["repeats"],
        "sample_repeats": sample["repeats"],
        "contended": train["contended"] or sample["contended"],
        "train_flops_per_image": train_flops_per_image,
        "sample_flops_per_image": sample_flops_per_image,
        "sample_fill_seconds": sample_fill,
        "memory_bytes": train_bytes,
        "memory_bytes_per_image": train_bytes / train_batch,
        "sample_memory_bytes": sample_bytes,
        "params": count_parameters([model]),
        "nfe_per_sample": next(iter(model.samplers().values())),
    }


class _Flops:
    """The FLOPs per image of a call at ``batch``: counted during the sweep's untimed call at that batch
    when the sweep tries it (``warm``, which also runs ``inner``: the memory measurement), else by one
    more call (``per_image``)."""

    def __init__(self, batch: int, inner: Callable[[int, Callable[[], Any]], None]):
        self.batch, self.inner, self.flops = batch, inner, None

    def warm(self, b: int, call: Callable[[], Any]) -> None:
        if b != self.batch or self.flops is not None:
            self.inner(b, call)
            return
        with counting_flops() as counter:
            self.inner(b, call)
        self.flops = counter.flops

    def per_image(self, call: Callable[[], Any]) -> float:
        if self.flops is None:
            self.flops = count_flops(call)
        return self.flops / self.batch


def sweep_batch(make_call: Callable[[int], Callable[[], Any]], device: torch.device, start: int,
                min_batch: int, max_batch: int, fill_seconds: float, repeats: int, seconds_cap: float,
                warm: Optional[Callable[[int, Callable[[], Any]], None]] = None
                ) -> tuple[int, dict[str, Any], list[list[float]]]:
    """The batch of least per-image cost for a call, by the sweep of the module docstring.

    ``make_call(b)`` returns a call on a fresh batch of ``b``; ``warm(b, call)`` runs its untimed call
    (and may measure what it likes meanwhile). The sweep starts at ``start`` (0: ``min_batch``), and a
    batch that runs out of memory is halved. Returns the chosen batch, its timing record
    (:func:`~trilemma.measure.timing.time_calls`' fields over all its timed calls) and the sweep,
    ``[[batch, seconds per image], ...]`` in the order tried.
    """
    warm = warm or (lambda b, call: timed(call, device))
    records: dict[int, dict[str, Any]] = {}

    def cost(b: int) -> float:
        return min(records[b]["seconds"]) / b

    def tried(b: int) -> bool:
        """Time batch ``b`` (once); False where it runs out of memory."""
        if b in records:
            return True
        try:
            call = make_call(b)
            begin = time.perf_counter()
            warm(b, call)
            # Short calls are timed twice (one stall of a busy machine must not steer the sweep); a long
            # one once, its own length averaging over such stalls.
            timed_calls = SWEEP_TIMED if time.perf_counter() - begin < fill_seconds else 1
            records[b] = time_calls(call, device, min(timed_calls, repeats), seconds_cap, warmup=0)
            return True
        except Exception as e:  # noqa: BLE001
            if not (is_oom(e) and b > min_batch):
                raise
            _release(device)
            return False

    # Start where asked, halving until it fits in memory.
    max_batch = max(max_batch, min_batch)
    batch = min(max(start, min_batch), max_batch)
    while not tried(batch):
        batch = max(min_batch, batch // 2)
    first = batch
    # Up: always while a call is shorter than fill_seconds (its overheads not yet amortized); while
    # doubling pays by over SWEEP_GAIN up to calls of STRETCH times that; and, beyond, for as long as
    # doubling nearly halves the per-image cost (by over OVERHEAD_GAIN: the call's time is still mostly
    # per-call overhead, as in an iterative sampler's many small steps at a small batch), while the next
    # call would stay under seconds_cap.
    gain = None  # the per-image saving of the last doubling
    while batch * 2 <= max_batch:
        call = min(records[batch]["seconds"])
        short, stretch = call < fill_seconds, call < STRETCH * fill_seconds
        overhead = gain is None or gain > OVERHEAD_GAIN
        # Never a call expected to run past the cap (it would be timed once): a pixel-by-pixel sampler's
        # fill time (its NFE grows with the pixels) is past the cap at 32x32 already.
        if not ((short or stretch or overhead) and 2 * call <= seconds_cap) or not tried(batch * 2):
            break
        gain = 1 - cost(batch * 2) / cost(batch)
        if not (short or gain > SWEEP_GAIN):
            break
        batch *= 2
    # A start whose call was long already and did not gain by doubling: down while halving pays
    # (caches a smaller batch fits in), unless one call is over the cap.
    if batch == first and max(records[first]["seconds"]) <= seconds_cap:
        while (batch // 2 >= min_batch and tried(batch // 2)
               and cost(batch // 2) < (1 - SWEEP_GAIN) * cost(batch)):
            batch //= 2
    best = min(records, key=cost)
    record = records[best]
    # The chosen batch's timed calls topped up to `repeats` (none more after a call over the cap).
    more = repeats - record["repeats"]
    if more > 0 and max(record["seconds"]) <= seconds_cap:
        record = _joined(record, time_calls(make_call(best), device, more, seconds_cap, warmup=0))
    return best, record, [[b, cost(b)] for b in records]


def _joined(first: dict[str, Any], then: dict[str, Any]) -> dict[str, Any]:
    """Two timing records of the same call as one."""
    seconds = first["seconds"] + then["seconds"]
    return {**then, "median": statistics.median(seconds), "iqr": interquartile_range(seconds),
            "seconds": seconds, "repeats": len(seconds), "warmup_seconds": first["warmup_seconds"],
            "load_before": first["load_before"], "contended": first["contended"] or then["contended"]}


def is_oom(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or a RuntimeError saying "out of memory" (CPU allocators, older torch)."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


def _failure(error: BaseException) -> dict[str, Any]:
    first_line = str(error).splitlines()[0] if str(error) else ""
    if is_oom(error):
        return {"status": STATUS_OOM, "message": first_line}
    return {"status": STATUS_ERROR, "type": type(error).__name__, "message": first_line}


def _train_memory(model: GenerativeModel, update: Update, call: Callable[[], Any], device: torch.device) -> int:
    """Run a train step ``call`` (untimed) and return its memory (the module docstring says what is counted)."""
    if device.type == "cuda":
        return _peak_memory(call, device)
    # CPU: the storages autograd saves for backward, each counted once, parameters left out.
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        call()
    state = sum(p.numel() * p.element_size() * 2 for p in model.parameters())  # weights + grads
    state += sum(t.numel() * t.element_size() for opt in update.optimizers.values()
                 for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return sum(saved.values()) + state


def _peak_memory(call: Callable[[], Any], device: torch.device) -> Optional[int]:
    """Run ``call`` (untimed); on CUDA, return the allocator's peak during it (None on a CPU)."""
    _reset_peak(device)
    timed(call, device)
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


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


def slope_interval(points: list[dict[str, Any]], call: str) -> Optional[float]:
    """The 95 % half-width of the timed slope of ``call`` (``train``, ``sample``): the spread (standard
    deviation of the log) of each point's timed calls at its batch, propagated through the least-squares
    fit; None with fewer than two points or a point timed once."""
    ok = [p for p in points if p.get("status") == STATUS_OK and len(p.get(f"{call}_timings") or []) >= 2]
    if len(ok) < 2 or len(ok) < sum(p.get("status") == STATUS_OK for p in points):
        return None
    x = np.log([p["pixels"] for p in ok])
    spread = np.array([np.std(np.log(p[f"{call}_timings"]), ddof=1) for p in ok])
    weights = (x - x.mean()) / ((x - x.mean()) ** 2).sum()  # the slope is sum_i weights_i log(cost_i)
    return float(LEVEL_Z * math.sqrt(float((weights ** 2 * spread ** 2).sum())))
