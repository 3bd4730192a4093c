"""A run's phases, and the one driver that runs them.

A run is a list of named phases (the FID reference, training, the weights, FID, coverage, grids,
sample speed, NLL, scaling); each is a small function of the run's :class:`RunState` that writes its
measurement into the result. The driver (:func:`run_phases`) times each under its name, records the
error of a failing measurement without stopping the others, writes the result after each, and skips
a phase whose measurement the result already holds, so a resumed run restarts at the first unfinished
phase. Test hooks are the driver's parameters (``stop_after_steps``), never exceptions raised through
the loop.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from trilemma.contract.likelihood import from_signed
from trilemma.contract.registry import build_model
from trilemma.measure import coverage
from trilemma.measure import fid as fidlib
from trilemma.measure import nll as nll_measure
from trilemma.measure import speed
from trilemma.measure.scaling import resolution_scaling
from trilemma.measure.timing import cpu_share, cpu_snapshot, is_contended, load_average
from trilemma.results.io import DiskFull, atomic_write_bytes, error_info, no_space
from trilemma.results.schema import (COVERAGE, ERRORS, FID, MEMORY, NLL, PARAMS, SAMPLE, SAMPLES_2X_FILE,
                                     SAMPLES_FILE, SCALING, TRAIN)
from trilemma.run import distributed
from trilemma.run.checkpoint import save_weights
from trilemma.run.data import DataConfig
from trilemma.run.execution import compile_networks, execution_record, sampling_precision
from trilemma.run.loop import throughput, train
from trilemma.run.pretrained import load_pretrained
from trilemma.run.settings import Run, RunConfig


@dataclasses.dataclass
class RunState:
    """What the phases of one run share: the run, its folder and result, and what earlier phases made."""

    run: Run
    run_dir: Path
    ctx: Any  # the suite's trilemma.run.runner.Context (loaded splits, the FID extractor and references)
    result: dict[str, Any]
    save: Callable[[], None]  # writes the result (and stops the run on a pre-emption signal)
    stop_after_steps: Optional[int] = None  # test hook: training stops after this many steps
    eval_model: Any = None  # what is measured: the trained (EMA) model, or the pretrained one
    trained: bool = True  # False when training stopped early (the test hook): the run stays resumable
    extractor: Optional[fidlib.FeatureExtractor] = None
    reference: Optional[fidlib.Reference] = None
    kept: Optional[torch.Tensor] = None  # the FID's first samples (uint8): the grid, and what coverage scores
    executed: Optional[dict[str, Any]] = None  # the sampling's execution record

    @property
    def measurements(self) -> dict[str, Any]:
        return self.result["measurements"]

    @property
    def timings(self) -> dict[str, float]:
        return self.result.setdefault("timings", {})  # seconds of each phase, summed over attempts

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.ctx.split(self.run.config.data, "train").shape[1:])


@dataclasses.dataclass(frozen=True)
class Phase:
    """One named step of a run. ``needed(state)``: whether it still has work (False: skipped, as on a
    resumed run whose result holds it); ``recorded``: the measurement whose failure is recorded (the
    run goes on, "incomplete"), None for a phase whose failure fails the run; ``timed``: whether the
    driver times it under ``name`` (FID times its own parts)."""

    name: str
    work: Callable[[RunState], None]
    needed: Callable[[RunState], bool] = lambda state: True
    recorded: Optional[str] = None
    timed: bool = True


def run_phases(state: RunState) -> bool:
    """Run every phase of a run in order; True when it finished, False when training stopped early
    (the test hook), the result then written and the run resumable."""
    for phase in TRAINING:
        _drive(phase, state)
        if not state.trained:
            return False
    with _sampling(state):
        for phase in SAMPLING:
            _drive(phase, state)
    for phase in AFTER_SAMPLING:
        _drive(phase, state)
    return True


def _drive(phase: Phase, state: RunState) -> None:
    if not phase.needed(state):
        return
    with (Measuring(state.result, phase.recorded) if phase.recorded else contextlib.nullcontext()):
        with (timed(state.timings, phase.name) if phase.timed else contextlib.nullcontext()):
            phase.work(state)
    state.save()


# --- training -------------------------------------------------------------------------------------

def reference(state: RunState) -> None:
    """The FID's extractor and reference features (cached on disk under a key naming all that changes them)."""
    state.extractor, state.reference = state.ctx.reference(state.run)


def _uses_fid(state: RunState) -> bool:
    ecfg = state.run.config.eval
    return bool(ecfg.fid or ecfg.curve_fid_samples)


def training(state: RunState) -> None:
    """Train (or resume, or reload the finished checkpoint). Pretrained weights are measured as loaded;
    training only times their training speed when asked: a short run of a copy, without a curve."""
    cfg, ctx = state.run.config, state.ctx
    tcfg, device, measurements = cfg.train, ctx.device, state.measurements
    train_images, train_labels = ctx.labeled(cfg.data, "train")
    shape = tuple(train_images.shape[1:])
    torch.manual_seed(cfg.seed)
    model = (load_pretrained(cfg.model, cfg.model_config, cfg.weights, shape) if cfg.weights
             else build_model(cfg.model, shape, None, cfg.model_config)).to(device)
    pretrained = bool(cfg.weights)
    state.eval_model = model
    speed.reset_peak_memory(device)
    if pretrained and not (cfg.train_speed and TRAIN not in measurements):
        return
    on_device = train_images.to(device)
    labels = train_labels.to(device) if model.capabilities.conditional and train_labels is not None else None
    timings = state.timings
    curve_before = timings.get("curve_fid", 0.0)
    load_before, cpu_before = load_average(), cpu_snapshot()
    with timed(timings, "train"):
        trained, loop = train(copy.deepcopy(model) if pretrained else model, on_device, tcfg, state.run_dir,
                              cfg.seed, lambda m, final=False: _curve_point(state, m), state.stop_after_steps,
                              labels)
    timings["train"] -= timings.get("curve_fid", 0.0) - curve_before  # the curve has its own line
    if not loop.finished:  # stopped early by the test hook: the checkpoint resumes it
        state.trained = False
        return
    if not pretrained:
        state.eval_model, state.result["curve"] = trained, loop.curve
    measurements[TRAIN] = {
        "images_per_second": throughput(loop), "images_seen": loop.images, "steps": loop.steps,
        "train_seconds": loop.train_seconds, "wall_seconds": loop.wall_seconds,
        "train_flops": loop.flops, "flops_per_image": loop.step_flops / tcfg.batch_size,
        "warmup_steps": tcfg.warmup_steps, "ema": tcfg.ema_halflife_images > 0,
        "load_before": load_before, "load_after": load_average(), "cores": os.cpu_count(),
        **execution_record(device, tcfg.precision, tcfg.tf32, tcfg.compile_mode if tcfg.compile else None,
                           tcfg.batch_size, per_device_batch=distributed.per_rank_batch(tcfg.batch_size),
                           processes=distributed.world_size())}
    # Over the whole phase, its curve points included; other data-parallel ranks are the job's own.
    share = cpu_share(cpu_before, cpu_snapshot(), device, peers=distributed.world_size() - 1)
    measurements[TRAIN] |= share | {"threads": torch.get_num_threads()}
    measurements[TRAIN]["contended"] = is_contended(share, load_before, measurements[TRAIN]["load_after"])
    if pretrained:  # the speed of a run from the weights, not of the training that made them
        measurements[TRAIN]["from_pretrained"] = True
    measurements[MEMORY] = {"train": speed.peak_memory(device)}


def _curve_point(state: RunState, eval_model) -> dict[str, Any]:
    """A point of the training curve: FID@curve_fid_samples (bf16 Inception where asked)."""
    ecfg, seed = state.run.config.eval, state.run.config.seed
    if not ecfg.curve_fid_samples:
        return {}
    with timed(state.timings, "curve_fid"), fork_rng(seed + 7), sampling_precision(eval_model, ecfg.sample_precision):
        values, _ = fidlib.fid(eval_model, state.extractor, state.reference, ecfg.curve_fid_samples,
                               ecfg.sample_batch, kid=False, prc=False, bf16=ecfg.curve_precision == "bf16",
                               bootstrap=0)
    return {"fid": values["fid"], "fid_samples": ecfg.curve_fid_samples, "precision": ecfg.curve_precision}


def weights(state: RunState) -> None:
    """The measured model's parameters, and its weights written beside the result."""
    state.measurements[PARAMS] = speed.parameters(state.eval_model)
    state.measurements.setdefault(MEMORY, {})
    save_weights(state.run_dir, state.eval_model, state.run.config.to_dict())


# --- sampling (at eval.sample_precision, compiled when eval.compile says so) ---------------------------

@contextlib.contextmanager
def _sampling(state: RunState) -> Iterator[None]:
    cfg = state.run.config
    ecfg, tcfg = cfg.eval, cfg.train
    with sampling_precision(state.eval_model, ecfg.sample_precision):
        compiled = ecfg.compile and bool(compile_networks(state.eval_model, tcfg.compile_mode))
        state.executed = execution_record(state.ctx.device, ecfg.sample_precision, tcfg.tf32,
                                          tcfg.compile_mode if compiled else None, ecfg.sample_batch)
        yield


def _scored(state: RunState) -> Optional[str]:
    """What coverage the FID's samples are scored for (classes, modes), or None."""
    ecfg = state.run.config.eval
    return coverage_kind(state.run.config.data, state.shape) if ecfg.coverage and ecfg.fid else None


def _coverage_count(state: RunState) -> int:
    ecfg = state.run.config.eval
    return ecfg.coverage_samples or ecfg.fid_samples


def fid(state: RunState) -> None:
    """FID@n with KID and precision/recall; the first samples become the grid, and the timed batches of
    the default sampler are its sample-speed measurement. The real-data row beside it: test images by
    the same protocol."""
    cfg, ctx = state.run.config, state.ctx
    ecfg, device, timings = cfg.eval, ctx.device, state.timings
    speed.reset_peak_memory(device)
    with fork_rng(cfg.seed + 1):
        values, state.kept = fidlib.fid(state.eval_model, state.extractor, state.reference, ecfg.fid_samples,
                                        ecfg.sample_batch, ecfg.kid, ecfg.precision_recall,
                                        keep=max(ecfg.grid_images, _coverage_count(state) if _scored(state) else 0))
    for part, seconds in values["seconds"].items():
        timings[f"fid_{part}"] = timings.get(f"fid_{part}", 0.0) + seconds
    state.measurements[FID] = values | {"sample_execution": state.executed}
    state.measurements[MEMORY]["sample"] = speed.peak_memory(device)
    with timed(timings, "fid_real_data"):
        state.measurements[FID]["real_data"] = ctx.real_data(state.run, ecfg.fid_samples)
    grid = state.kept[:ecfg.grid_images] if state.kept is not None else None
    save_grid(grid, state.run_dir / SAMPLES_FILE)


def coverage_phase(state: RunState) -> None:
    """Coverage (MNIST classes, Stacked MNIST modes) of the FID's first samples, by the reference
    classifier; a run finished before it draws the same samples again (the same seed and batches)."""
    n = _coverage_count(state)
    kept = state.kept if state.kept is not None and len(state.kept) >= n else None
    state.measurements[COVERAGE] = score_coverage(state.eval_model, state.run.config, state.ctx, _scored(state),
                                                  n, kept)


def score_coverage(model, cfg: RunConfig, ctx, kind: str, n: int, kept: Optional[torch.Tensor] = None) -> dict:
    """Coverage (``kind`` "classes" or "modes") of ``n`` samples drawn by the FID's seed stream and
    batches, so that its first samples are the FID's (``kept``: those samples, when already drawn)."""
    if kept is None:
        with fork_rng(cfg.seed + 1), torch.no_grad():
            kept = torch.cat([speed.sample_uint8(model, min(cfg.eval.sample_batch, n - i))
                              for i in range(0, n, cfg.eval.sample_batch)])
    measure = coverage.class_coverage if kind == "classes" else coverage.stacked_modes
    return measure(kept[:n], ctx.classifier(cfg.data), seed=cfg.seed) | {"kind": kind}


def grid(state: RunState) -> None:
    with fork_rng(state.run.config.seed + 1), torch.no_grad():
        save_grid(speed.sample_uint8(state.eval_model, state.run.config.eval.grid_images),
                  state.run_dir / SAMPLES_FILE)


def grid_2x(state: RunState) -> None:
    """A family that samples at any resolution also shows a grid at twice the one it trained at."""
    with fork_rng(state.run.config.seed + 3), torch.no_grad():
        images = state.eval_model.generate_at(state.run.config.eval.grid_images, 2 * state.shape[-1])
        save_grid(from_signed(images).cpu(), state.run_dir / SAMPLES_2X_FILE)


def sample_speed(state: RunState) -> None:
    """Sample speed of every sampler the model has (the default one from the FID's batches). One timed
    while other processes held its CPUs is timed on its own again once they leave; not between
    data-parallel ranks, whose peers are the job's own work."""
    ecfg, model = state.run.config.eval, state.eval_model
    alone = distributed.world_size() == 1
    speeds = {}
    for name in model.samplers():
        reused = speed.speed_from_batches(model, state.measurements.get(FID), name, ecfg.sample_batch,
                                          state.executed)
        if reused and reused["contended"] and alone:
            reused = None
        speeds[name] = reused or speed.sample_speed(model, ecfg.sample_batch, ecfg.sample_repeats,
                                                    ecfg.sample_seconds_cap, name, state.executed,
                                                    speed.RETIME_WAIT_SECONDS if alone else 0.0)
    state.measurements[SAMPLE] = {"default": next(iter(speeds)), "samplers": speeds}


# --- after sampling ---------------------------------------------------------------------------------

def nll(state: RunState) -> None:
    """NLL in bits/dim on the test split, where the model has a density (fp32, never autocast)."""
    cfg = state.run.config
    test = state.ctx.split(cfg.data, "test")
    test = test[:cfg.eval.nll_images] if cfg.eval.nll_images else test
    with fork_rng(cfg.seed + 2):
        state.measurements[NLL] = nll_measure.nll(state.eval_model, test, cfg.eval.nll_batch,
                                                  cfg.eval.nll_seconds_cap, cfg.eval.nll_draws)


def scaling(state: RunState) -> None:
    """Cost against resolution: fresh models at each resolution, the architecture adapting to it."""
    state.measurements[SCALING] = scaling_study(state.run, state.shape[0], state.ctx.device)
    scaling_failure(state.result)


def scaling_study(run: Run, channels: int, device: torch.device) -> dict[str, Any]:
    ecfg = run.config.eval
    return resolution_scaling(run.config.model, run.config.model_config, channels,
                              ecfg.scaling_resolutions, ecfg.scaling_batch, ecfg.scaling_repeats, device,
                              ecfg.scaling_seconds_cap, run.config.seed)


def scaling_failure(result: dict) -> None:
    """Record the scaling study as failed when a resolution failed with an error (out of memory is a
    measured outcome, not a failure); its points and slopes stay in the result."""
    failed = [p for p in result["measurements"][SCALING]["points"] if p.get("status") == "error"]
    if failed:
        sizes = ", ".join(f"{p['resolution']}x{p['resolution']}" for p in failed)
        record_failure(result, SCALING, {"type": failed[0].get("type") or "Error",
                                         "message": f"{failed[0].get('message', '')} (at {sizes})",
                                         "traceback": ""})


def _missing(key: str) -> Callable[[RunState], bool]:
    return lambda state: key not in state.measurements


def _grid_missing(state: RunState) -> bool:
    return bool(state.run.config.eval.grid_images) and not (state.run_dir / SAMPLES_FILE).exists()


TRAINING = (
    Phase("fid_reference", reference, needed=_uses_fid),
    Phase("train", training, timed=False),  # the loop's seconds, less the curve's
    Phase("save_weights", weights),
)
SAMPLING = (
    Phase(FID, fid, needed=lambda s: s.run.config.eval.fid and FID not in s.measurements, recorded=FID,
          timed=False),
    Phase("coverage", coverage_phase, needed=lambda s: bool(_scored(s)) and COVERAGE not in s.measurements,
          recorded=COVERAGE),
    Phase("grid", grid, needed=_grid_missing, recorded="grid"),
    Phase("grid", grid_2x, recorded="grid",
          needed=lambda s: (s.eval_model.capabilities.any_resolution and bool(s.run.config.eval.grid_images)
                            and not (s.run_dir / SAMPLES_2X_FILE).exists())),
    Phase("sample_speed", sample_speed, needed=_missing(SAMPLE), recorded=SAMPLE),
)
AFTER_SAMPLING = (
    Phase("nll", nll, recorded=NLL,
          needed=lambda s: (s.run.config.eval.nll and s.eval_model.capabilities.density != "none"
                            and NLL not in s.measurements)),
    Phase("scaling", scaling, needed=lambda s: s.run.config.eval.scaling and SCALING not in s.measurements,
          recorded=SCALING),
)


# --- the driver's parts -----------------------------------------------------------------------------

class Measuring:
    """``with Measuring(result, key):`` around a measurement made after training: an error is recorded
    under the result's ``errors[key]`` (and printed) instead of failing the run, so the other
    measurements are still made and the run ends "incomplete", saying which measurement failed."""

    def __init__(self, result: dict, key: str):
        self.result, self.key = result, key

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if error is None or not isinstance(error, Exception) or isinstance(error, DiskFull) or no_space(error):
            return False  # KeyboardInterrupt, a pre-emption and a full disk still stop the run
        record_failure(self.result, self.key, error)
        return True


def record_failure(result: dict, key: str, error: BaseException | dict) -> None:
    """Record that measurement ``key`` failed: ``errors[key]``, and ``error`` for the first one."""
    info = error_info(error) if isinstance(error, BaseException) else error
    result.setdefault(ERRORS, {})[key] = {"type": info["type"], "message": info["message"]}
    if not result.get("error"):
        result["error"] = info | {"phase": key}
    text = str(info["message"]).strip()
    print(f"  {result.get('run')}: {key} failed: {info['type']}: {text.splitlines()[0] if text else ''}",
          file=sys.stderr)


@contextlib.contextmanager
def timed(timings: dict[str, float], name: str) -> Iterator[None]:
    """Adds the seconds spent inside the block to ``timings[name]`` (also when it raises)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def coverage_kind(data: DataConfig, shape: tuple[int, int, int]) -> Optional[str]:
    """What coverage the reference MNIST classifier measures on a data set: ``"classes"`` on MNIST,
    ``"modes"`` on Stacked MNIST, None elsewhere."""
    if data.name == "mnist" and shape == (1, 28, 28):
        return "classes"
    if data.name == "stacked_mnist" and shape == (3, 28, 28):
        return "modes"
    return None


def save_grid(images: Optional[torch.Tensor], path: Path) -> None:
    """uint8 images ``(N, C, H, W)`` as one PNG grid, written atomically."""
    if images is None or not len(images):
        return
    import torchvision

    nrow = max(1, int(len(images) ** 0.5))
    grid_image = torchvision.utils.make_grid(images, nrow=nrow, padding=2, pad_value=255)  # uint8 (3, H, W)
    atomic_write_bytes(path, torchvision.io.encode_png(grid_image.cpu()).numpy().tobytes())


class fork_rng:
    """Seed the global RNGs for an evaluation and restore them after, so training is unaffected."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        torch.manual_seed(self.seed)

    def __exit__(self, *exc):
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
