"""The suite runner: each run trained, measured and written to ``results/<suite>/<run>/``.

A run whose result is done with the same config hash is skipped; one with a checkpoint or a partial
result resumes (measurements already in the result are not redone); one whose config changed starts
over. A run that fails is recorded as failed with its error and the suite goes on. A finished run
keeps its evaluated weights as ``model.safetensors`` (:mod:`trilemma.run.checkpoint`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from trilemma.contract.errors import TrilemmaError
from trilemma.contract.likelihood import from_signed
from trilemma.contract.registry import build_model, get_model_class
from trilemma.measure import fid as fidlib
from trilemma.measure import nll as nll_measure
from trilemma.measure import speed
from trilemma.measure.scaling import resolution_scaling
from trilemma.measure.timing import contended, load_average
from trilemma.results.io import (atomic_write_bytes, atomic_write_json, config_hash, error_info, new_result,
                                 now, read_result)
from trilemma.results.provenance import provenance
from trilemma.results.schema import (CHECKPOINT_FILE, CONFIG_FILE, FID, MEMORY, NLL, PARAMS, RESULT_FILE,
                                     PREVIOUS_DIR, SAMPLE, SAMPLES_2X_FILE, SAMPLES_FILE, SCALING,
                                     STATUS_DONE, STATUS_FAILED, SUITE_FILE, TRAIN, WEIGHTS_CONFIG_FILE,
                                     WEIGHTS_FILE)
from trilemma.run.checkpoint import checkpoint_loads, quarantine, save_weights
from trilemma.run import distributed
from trilemma.run.data import DataConfig, check_splits, data_root, dataset_label, load_labeled
from trilemma.run.execution import compile_networks, execution_record, sampling_precision
from trilemma.run.lock import LOCK_FILE, RunLock
from trilemma.run.loop import throughput, train
from trilemma.run.settings import Run, SuiteConfig, hashed_config, same_results_config, suite_dict


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise TrilemmaError(f"unknown device {requested!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrilemmaError(f"device {requested!r} requested but no CUDA device is available")
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} threads")


class Context:
    """What runs of one suite share: loaded splits and the FID extractor, each made once."""

    def __init__(self, device: torch.device):
        self.device = device
        self._splits: dict[tuple, tuple[torch.Tensor, Optional[torch.Tensor]]] = {}
        self._extractors: dict[tuple, fidlib.FeatureExtractor] = {}
        self._references: dict[str, fidlib.Reference] = {}
        self._real: dict[tuple, dict[str, Any]] = {}

    def split(self, data: DataConfig, split: str) -> torch.Tensor:
        """The images of a split, uint8 ``(N, C, H, W)``."""
        return self.labeled(data, split)[0]

    def labeled(self, data: DataConfig, split: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The images of a split and their labels (None where the data set has none)."""
        key = (json.dumps(dataclasses.asdict(data), sort_keys=True), split)
        if key not in self._splits:
            self._splits[key] = load_labeled(data, split)
        return self._splits[key]

    def extractor(self, weights: Optional[str], batch: int) -> fidlib.FeatureExtractor:
        if (weights, batch) not in self._extractors:
            self._extractors[(weights, batch)] = fidlib.FeatureExtractor(weights, self.device, batch)
        return self._extractors[(weights, batch)]

    def reference(self, run: Run) -> tuple[fidlib.FeatureExtractor, fidlib.Reference]:
        """The extractor and the reference (features and statistics, cached on disk) of a run's FID."""
        data, ecfg = run.config.data, run.config.eval
        train_images = self.split(data, "train")
        extractor = self.extractor(fidlib.weights_path(ecfg.fid_weights), ecfg.fid_batch)
        n_ref = min(ecfg.fid_ref_images or len(train_images), len(train_images))
        key = fidlib.reference_key(dataset_label(data), "train", train_images[:n_ref], extractor.weights_id)
        if key not in self._references:
            self._references[key] = fidlib.reference(extractor, train_images[:n_ref], key,
                                                     Path(ecfg.fid_cache or fidlib.DEFAULT_CACHE))
        return extractor, self._references[key]

    def real_data(self, run: Run, n: int) -> dict[str, Any]:
        """FID@n and the rest of ``n`` test images against the run's reference (once per suite)."""
        extractor, ref = self.reference(run)
        data, ecfg = run.config.data, run.config.eval
        test = self.split(data, "test")[:n]
        key = (ref.key, len(test))
        if key not in self._real:
            self._real[key] = fidlib.real_data(extractor, ref, test, dataset_label(data),
                                               Path(ecfg.fid_cache or fidlib.DEFAULT_CACHE))
        return self._real[key]


def results_config(run: Run) -> dict[str, Any]:
    """The hashed config of a run plus the inputs that change its numbers without being settings: the
    resolved data root (files-backed data sets) and the FID weights' hash, so that pointing either
    elsewhere makes a finished run stale instead of leaving it "done" with its old numbers."""
    config = hashed_config(run.config.to_dict())
    data, ecfg = run.config.data, run.config.eval
    weights = ecfg.fid_weights or os.environ.get("TRILEMMA_FID_WEIGHTS") or None
    uses_fid = ecfg.fid or ecfg.curve_fid_samples
    config["inputs"] = {
        "data_root": None if data.name == "synthetic" else str(data_root(data).resolve()),
        "fid_weights": (fidlib.weights_id(weights and str(Path(weights).expanduser()))
                        if weights is None or Path(weights).expanduser().is_file()
                        else f"missing: {weights}") if uses_fid else None}
    return config


def run_dir_for(results_root: Path, run: Run) -> Path:
    return Path(results_root) / run.suite / run.name


def status_of(results_root: Path, run: Run) -> str:
    """'done', 'failed', 'partial' (resumable), 'stale' (config changed), 'corrupt' or 'new'."""
    run_dir = run_dir_for(results_root, run)
    try:
        result = read_result(run_dir)
    except TrilemmaError:
        return "corrupt"
    if result is None:
        return "partial" if (run_dir / CHECKPOINT_FILE).exists() else "new"
    if not same_results_config(result["config"], results_config(run)):
        return "stale"
    return {"done": "done", "failed": "failed"}.get(result["status"], "partial")


def run_suite(suite: SuiteConfig, runs: list[Run], results_root: Path, device: torch.device,
              retry_failed: bool = True) -> dict[str, str]:
    """Run (or skip, or resume) every run; returns run name -> final status.

    Each run is claimed (:class:`~trilemma.run.lock.RunLock`) while it is worked on; a run another
    process holds is left to it and waited for at the end, so concurrent runners share a suite.
    """
    ctx = Context(device)
    outcome, started = {}, time.perf_counter()
    status = {run.name: status_of(results_root, run) for run in runs}  # read each result once
    todo = [r for r in runs if status[r.name] != "done"]
    preflight(todo, ctx)
    suite_dir = Path(results_root) / suite.name
    remove_stale_temporaries(suite_dir, older_than=600)
    atomic_write_json(suite_dir / SUITE_FILE, suite_dict(suite))
    for run in runs:
        if run not in todo:
            print(f"[skip] {run.name}: done with the same config", file=sys.stderr)
            with RunLock(run_dir_for(results_root, run)):
                add_missing(run, run_dir_for(results_root, run), ctx)
            outcome[run.name] = STATUS_DONE
    claimed = []
    for i, run in enumerate(todo):
        elapsed = time.perf_counter() - started
        left = f", about {_clock(elapsed / i * (len(todo) - i))} left" if i else ""
        lock = RunLock(run_dir_for(results_root, run))
        if not lock.acquire():
            print(f"[claimed] {run.name}: being run by {lock.holder()}; waiting for it at the end",
                  file=sys.stderr)
            claimed.append(run)
            continue
        print(f"[{i + 1}/{len(todo)}] {run.name} (elapsed {_clock(elapsed)}{left})", file=sys.stderr)
        try:
            outcome[run.name] = _claimed_run(run, results_root, ctx, retry_failed)
        finally:
            lock.release()
    for run in claimed:  # held by another runner: wait for it, then it is done (or ours to finish)
        lock = RunLock(run_dir_for(results_root, run))
        print(f"[wait] {run.name}: waiting for {lock.holder()}", file=sys.stderr)
        with lock:
            outcome[run.name] = _claimed_run(run, results_root, ctx, retry_failed)
    return outcome


def _claimed_run(run: Run, results_root: Path, ctx: "Context", retry_failed: bool) -> str:
    """Work on a run this process has claimed: its status is read again, under the claim."""
    status = status_of(results_root, run)
    if status == "done":
        print(f"  {run.name}: done (by another runner)", file=sys.stderr)
        return STATUS_DONE
    if status == "failed" and not retry_failed:
        return STATUS_FAILED
    return execute(run, run_dir_for(results_root, run), ctx)


def remove_stale_temporaries(folder: Path, older_than: float = 0.0) -> None:
    """Delete ``.<name>.*.tmp`` files that writers killed mid-write left in ``folder``."""
    if not folder.is_dir():
        return
    cutoff = time.time() - older_than
    for tmp in folder.glob(".*.tmp"):
        try:
            if tmp.stat().st_mtime <= cutoff:
                tmp.unlink()
        except OSError:
            pass


def keep_previous(run_dir: Path, result: dict[str, Any]) -> Path:
    """Move a run folder's files (an earlier config's result) to ``previous/<its config hash>/``."""
    dest = run_dir / PREVIOUS_DIR / str(result.get("config_hash") or "unknown")
    n = 1
    while dest.exists():
        dest, n = dest.with_name(f"{dest.name.split('.')[0]}.{n}"), n + 1
    dest.mkdir(parents=True)
    for entry in run_dir.iterdir():
        if entry.name not in (PREVIOUS_DIR, LOCK_FILE):
            entry.replace(dest / entry.name)
    return dest


def discard_attempt(run_dir: Path) -> None:
    """Remove what an unfinished attempt left (grids, weights) when training starts afresh, so a
    result never mixes the measurements of two models."""
    for name in (SAMPLES_FILE, SAMPLES_2X_FILE, WEIGHTS_FILE, WEIGHTS_CONFIG_FILE, RESULT_FILE):
        (run_dir / name).unlink(missing_ok=True)


def add_missing(run: Run, run_dir: Path, ctx: Context) -> None:
    """Add to a finished run the measurements that need no trained model and that it lacks: the
    real-data row of its FID (test images against the same references; results written before it
    was stored lack it) and the resolution-scaling study, when the suite asks for it."""
    result = read_result(run_dir)
    fid = result["measurements"].get(FID)
    if run.config.eval.fid and isinstance(fid, dict) and "real_data" not in fid:
        print(f"  adding the real-data FID row to {run.name}", file=sys.stderr)
        fid["real_data"] = ctx.real_data(run, run.config.eval.fid_samples)
        atomic_write_json(run_dir / RESULT_FILE, result)
    add_scaling(run, run_dir, ctx, result)


def add_scaling(run: Run, run_dir: Path, ctx: Context, result: Optional[dict[str, Any]] = None) -> None:
    """Add the resolution-scaling study to a finished run that lacks it, when the suite asks for it."""
    result = result or read_result(run_dir)
    if not run.config.eval.scaling or SCALING in result["measurements"]:
        return
    print(f"  adding the resolution-scaling study to {run.name}", file=sys.stderr)
    channels = ctx.split(run.config.data, "test").shape[1]  # loaded once per dataset
    result["measurements"][SCALING] = _scaling(run, channels, ctx.device)
    result["config"] = results_config(run)  # now records the scaling settings too
    result["config_hash"] = config_hash(result["config"])
    atomic_write_json(run_dir / RESULT_FILE, result)


def _scaling(run: Run, channels: int, device: torch.device) -> dict[str, Any]:
    ecfg = run.config.eval
    return resolution_scaling(run.config.model, run.config.model_config, channels,
                              ecfg.scaling_resolutions, ecfg.scaling_batch, ecfg.scaling_repeats, device,
                              ecfg.scaling_seconds_cap, run.config.seed)


def preflight(runs: list[Run], ctx: Context) -> None:
    """Check every run's inputs before anything is written: both splits of each data set (files,
    shapes, labels where the family needs them), the FID weights, and each model built on its data's
    shape. A problem is one error for the whole suite, not a failed result per run."""
    for run in runs:
        cfg = run.config
        train_images, train_labels = ctx.labeled(cfg.data, "train")
        test_images = ctx.split(cfg.data, "test")
        check_splits(cfg.data, train_images, test_images)
        where = f"{run.name}"
        cls = get_model_class(cfg.model)
        if cls.capabilities.conditional and train_labels is None:
            raise TrilemmaError(f"{where}: {cls.name} is class-conditional, but data set "
                                f"{dataset_label(cfg.data)!r} has no labels")
        try:
            with fork_rng(cfg.seed):
                build_model(cfg.model, tuple(train_images.shape[1:]), None, cfg.model_config)
        except (ValueError, TypeError, RuntimeError) as e:
            raise TrilemmaError(f"{where}: {cls.name} cannot be built for {tuple(train_images.shape[1:])} "
                                f"images: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
        if cfg.eval.fid or cfg.eval.curve_fid_samples:
            fidlib.weights_path(cfg.eval.fid_weights)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def execute(run: Run, run_dir: Path, ctx: Context, stop_after_steps: Optional[int] = None) -> str:
    """Train and measure one run, writing its result after every step; returns its final status.

    The caller holds the run's claim. An earlier config's result is kept under ``previous/``; a
    corrupt result or checkpoint is moved aside and named; an attempt that has to start training
    afresh starts with an empty result, so every measurement belongs to the weights it reports.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(run_dir)
    config = run.config.to_dict()
    hashed = results_config(run)
    try:
        result = read_result(run_dir)
    except TrilemmaError as e:
        aside = quarantine(run_dir / RESULT_FILE)
        print(f"  {e}: moved to {aside.name}, the run starts afresh", file=sys.stderr)
        result = None
    if result is not None and not same_results_config(result["config"], hashed):
        kept = keep_previous(run_dir, result)
        print(f"  config of {run.name} changed: its earlier result is kept in {kept}", file=sys.stderr)
        result = None
    checkpoint = run_dir / CHECKPOINT_FILE
    if checkpoint.exists() and not checkpoint_loads(checkpoint):
        aside = quarantine(checkpoint)
        print(f"  checkpoint {checkpoint} could not be loaded: moved to {aside.name}, training starts afresh",
              file=sys.stderr)
    if not checkpoint.exists():  # training starts from scratch: nothing of an earlier attempt stays
        discard_attempt(run_dir)
        result = None
    atomic_write_json(run_dir / CONFIG_FILE, config)
    device = ctx.device
    cls = get_model_class(run.config.model)
    if result is None:
        result = new_result(run.suite, run.name, hashed, {
            "name": cls.name, "title": cls.display_name(), "paper": cls.paper, "family": cls.family,
            "literature": cls.literature, "reported": cls.reported,
            "capabilities": cls.capabilities.as_dict()},
            provenance(str(device), device_name(device), run.config.seed))
        result["data_root"] = str(data_root(run.config.data))
    result["status"], result["error"] = "running", None
    save = lambda: atomic_write_json(run_dir / RESULT_FILE, result)  # noqa: E731
    save()
    try:
        _train_and_measure(run, run_dir, ctx, result, save, stop_after_steps)
        result["status"] = STATUS_DONE
    except KeyboardInterrupt:
        save()  # stays "running": the next invocation resumes it
        raise
    except Exception as e:  # a failing run is recorded, and the suite goes on
        result["status"], result["error"] = STATUS_FAILED, error_info(e)
        print(f"  {run.name} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
              file=sys.stderr)
    result["provenance"]["finished"] = now()
    save()
    if result["status"] == STATUS_DONE:  # only now: the result and the weights hold it all
        checkpoint.unlink(missing_ok=True)
    return result["status"]


def _train_and_measure(run: Run, run_dir: Path, ctx: Context, result: dict, save: Callable[[], None],
                       stop_after_steps: Optional[int]) -> None:
    cfg = run.config
    tcfg, ecfg = cfg.train, cfg.eval
    device, seed = ctx.device, cfg.seed
    measurements = result["measurements"]
    train_images, train_labels = ctx.labeled(cfg.data, "train")
    shape = tuple(train_images.shape[1:])
    torch.manual_seed(seed)
    model = build_model(cfg.model, shape, None, cfg.model_config).to(device)

    timings = result.setdefault("timings", {})  # seconds of each phase, summed over attempts

    def phase(name: str):
        return _Phase(timings, name)

    # Reference features for FID, cached on disk under a key naming all that changes them.
    extractor = ref = None
    if ecfg.fid or ecfg.curve_fid_samples:
        with phase("fid_reference"):
            extractor, ref = ctx.reference(run)

    def evaluate(eval_model, final: bool = False) -> dict[str, float]:
        if not ecfg.curve_fid_samples:
            return {}
        if final and ecfg.fid:  # the final point is the final FID itself, measured once, below
            return {"fid": None, "fid_n": ecfg.fid_samples, "final": True}
        with phase("curve_fid"), fork_rng(seed + 7), sampling_precision(eval_model, ecfg.sample_precision):
            values, _ = fidlib.fid(eval_model, extractor, ref, ecfg.curve_fid_samples, ecfg.sample_batch,
                                   kid=False, prc=False, bf16=ecfg.curve_precision == "bf16", bootstrap=0)
        return {"fid": values["fid"], "fid_n": ecfg.curve_fid_samples, "precision": ecfg.curve_precision}

    # Train (or resume, or reload the finished checkpoint).
    speed.reset_peak_memory(device)
    on_device = train_images.to(device)
    labels = train_labels.to(device) if model.capabilities.conditional and train_labels is not None else None
    curve_before = timings.get("curve_fid", 0.0)
    load_before = load_average()
    with phase("train"):
        eval_model, state = train(model, on_device, tcfg, run_dir, seed, evaluate, stop_after_steps, labels)
    timings["train"] -= timings.get("curve_fid", 0.0) - curve_before  # the curve has its own line
    del on_device, labels
    result["curve"] = state.curve
    measurements[TRAIN] = {
        "images_per_second": throughput(state), "images_seen": state.images, "steps": state.steps,
        "train_seconds": state.train_seconds, "wall_seconds": state.wall_seconds,
        "train_flops": state.flops, "flops_per_image": state.step_flops / tcfg.batch_size,
        "warmup_steps": tcfg.warmup_steps, "ema": tcfg.ema_halflife_images > 0,
        "load_before": load_before, "load_after": load_average(), "cores": os.cpu_count(),
        **execution_record(device, tcfg.precision, tcfg.tf32, tcfg.compile_mode if tcfg.compile else None,
                           tcfg.batch_size, per_device_batch=distributed.per_rank_batch(tcfg.batch_size),
                           processes=distributed.world_size())}
    measurements[TRAIN]["contended"] = contended(load_before, measurements[TRAIN]["load_after"])
    measurements[PARAMS] = speed.parameters(eval_model)
    measurements[MEMORY] = {"train": speed.peak_memory(device)}
    with phase("save_weights"):
        save_weights(run_dir, eval_model, cfg.to_dict())
    save()

    # Sampling (FID, grids, sample speed) at eval.sample_precision, compiled when eval.compile says so.
    sampling = contextlib.ExitStack()
    sampling.enter_context(sampling_precision(eval_model, ecfg.sample_precision))
    compiled = ecfg.compile and bool(compile_networks(eval_model, tcfg.compile_mode))
    executed = execution_record(device, ecfg.sample_precision, tcfg.tf32,
                                tcfg.compile_mode if compiled else None, ecfg.sample_batch)

    # FID@n with KID and precision/recall; the first samples become the grid, and the timed batches
    # of the default sampler are its sample-speed measurement.
    grid_path = run_dir / SAMPLES_FILE
    if ecfg.fid and FID not in measurements:
        speed.reset_peak_memory(device)
        with fork_rng(seed + 1):
            values, grid = fidlib.fid(eval_model, extractor, ref, ecfg.fid_samples, ecfg.sample_batch,
                                      ecfg.kid, ecfg.precision_recall, keep=ecfg.grid_images)
        for part, seconds in values["seconds"].items():
            timings[f"fid_{part}"] = timings.get(f"fid_{part}", 0.0) + seconds
        measurements[FID] = values | {"sample_execution": executed}
        measurements[MEMORY]["sample"] = speed.peak_memory(device)
        with phase("fid_real_data"):  # the floor the figure is read against: test images, same protocol
            measurements[FID]["real_data"] = ctx.real_data(run, ecfg.fid_samples)
        save_grid(grid, grid_path)
        save()
    _final_curve_point(result)
    if not grid_path.exists() and ecfg.grid_images:
        with phase("grid"), fork_rng(seed + 1), torch.no_grad():
            save_grid(speed.sample_uint8(eval_model, ecfg.grid_images), grid_path)
    # A family that samples at any resolution also shows a grid at twice the one it trained at.
    grid_2x = run_dir / SAMPLES_2X_FILE
    if eval_model.capabilities.any_resolution and ecfg.grid_images and not grid_2x.exists():
        with phase("grid"), fork_rng(seed + 3), torch.no_grad():
            images = eval_model.generate_at(ecfg.grid_images, 2 * shape[-1])
            save_grid(from_signed(images).cpu(), grid_2x)

    # Sample speed, for every sampler the model has (the default one from the FID's batches).
    if SAMPLE not in measurements:
        speeds = {}
        with phase("sample_speed"):
            for name in eval_model.samplers():
                reused = speed.speed_from_batches(eval_model, measurements.get(FID), name, ecfg.sample_batch,
                                                  executed)
                speeds[name] = reused or speed.sample_speed(eval_model, ecfg.sample_batch, ecfg.sample_repeats,
                                                            ecfg.sample_seconds_cap, name, executed)
        measurements[SAMPLE] = {"default": next(iter(speeds)), "samplers": speeds}
        save()

    sampling.close()

    # NLL in bits/dim on the test split, where the model has a density (fp32, never autocast).
    if ecfg.nll and eval_model.capabilities.density != "none" and NLL not in measurements:
        test = ctx.split(cfg.data, "test")
        test = test[:ecfg.nll_images] if ecfg.nll_images else test
        with phase("nll"), fork_rng(seed + 2):
            measurements[NLL] = nll_measure.nll(eval_model, test, ecfg.nll_batch, ecfg.nll_seconds_cap,
                                                ecfg.nll_draws)
        save()

    # Cost against resolution: fresh models at each resolution, the architecture adapting to it.
    if ecfg.scaling and SCALING not in measurements:
        with phase("scaling"):
            measurements[SCALING] = _scaling(run, shape[0], device)
        save()


def _final_curve_point(result: dict) -> None:
    """Fill the curve's last point, which is the final FID (measured once, not twice)."""
    fid = result["measurements"].get(FID)
    if fid and result["curve"] and result["curve"][-1].get("final"):
        result["curve"][-1].update(fid=fid["fid"], fid_n=fid["n_gen"], precision="fp32")


class _Phase:
    """Adds the seconds spent inside a ``with`` block to ``timings[name]``."""

    def __init__(self, timings: dict[str, float], name: str):
        self.timings, self.name = timings, name

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.timings[self.name] = self.timings.get(self.name, 0.0) + time.perf_counter() - self.t0


def save_grid(images: Optional[torch.Tensor], path: Path) -> None:
    """uint8 images ``(N, C, H, W)`` as one PNG grid, written atomically."""
    if images is None or not len(images):
        return
    import torchvision

    nrow = max(1, int(len(images) ** 0.5))
    grid = torchvision.utils.make_grid(images, nrow=nrow, padding=2, pad_value=255)  # uint8 (3, H, W)
    atomic_write_bytes(path, torchvision.io.encode_png(grid.cpu()).numpy().tobytes())


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
