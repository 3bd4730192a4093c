"""The suite runner: each run trained, measured and written to ``results/<suite>/<run>/``.

A run whose result is done with the same config hash is skipped; one with a checkpoint or a partial
result resumes (measurements already in the result are not redone); one whose config changed starts
over. A run that fails is recorded as failed with its error and the suite goes on. A finished run
keeps its evaluated weights as ``model.safetensors`` (:mod:`trilemma.run.checkpoint`).

Two things stop the suite instead: a pre-emption signal (:mod:`trilemma.run.preemption`: the run's
checkpoint and result are written, it stays resumable, and :class:`Preempted` is raised), and a disk
that fills (:class:`~trilemma.results.io.DiskFull`: every file stays as it was before the failed write).
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from trilemma.contract.errors import TrilemmaError
from trilemma.contract.registry import build_model, get_model_class, plugin_of
from trilemma.measure import coverage
from trilemma.measure import fid as fidlib
from trilemma.results.io import (DiskFull, atomic_write_json, config_hash, error_info, new_result, no_space, now,
                                 read_result)
from trilemma.results.provenance import provenance
from trilemma.results.schema import (CHECKPOINT_FILE, CONFIG_FILE, ERRORS, FID, PRETRAINED, RESULT_FILE,
                                     PREVIOUS_DIR, SAMPLES_2X_FILE, SAMPLES_FILE, SCALING, STATUS_DONE,
                                     STATUS_FAILED, STATUS_INCOMPLETE, SUITE_FILE, WEIGHTS_CONFIG_FILE,
                                     WEIGHTS_FILE, failed_measurements)
from trilemma.run.checkpoint import checkpoint_problem, quarantine
from trilemma.run import preemption, worker
from trilemma.run.preemption import Preempted
from trilemma.run.data import DataConfig, check_splits, data_inputs, data_root, dataset_label, load_labeled
from trilemma.run.execution import fix_allocator
from trilemma.run.lock import LOCK_FILE, RunLock
from trilemma.run.phases import RunState, fork_rng, run_phases, scaling_failure, scaling_study
from trilemma.run.pretrained import load_pretrained, weights_record, weights_sha256
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
        self._classifiers: dict[str, coverage.ReferenceClassifier] = {}

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

    def classifier(self, data: DataConfig) -> coverage.ReferenceClassifier:
        """The reference MNIST classifier (trained once and cached on disk), from MNIST beside ``data``."""
        mnist = DataConfig(name="mnist", root=data.root, download=data.download)
        key = json.dumps(dataclasses.asdict(mnist), sort_keys=True)
        if key not in self._classifiers:
            (train, train_labels), (test, test_labels) = (self.labeled(mnist, s) for s in ("train", "test"))
            self._classifiers[key] = coverage.reference_classifier(train, train_labels, test, test_labels,
                                                                   device=self.device)
        return self._classifiers[key]

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


def results_config(run: Run, stored: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The hashed config of a run plus the inputs that change its numbers without being settings: the
    hash of the data's contents and the FID weights' hash, so that changing either makes a finished run
    stale instead of leaving it "done" with its old numbers. ``stored``: the config of the result it is
    compared with (whose data may be named the legacy way: :func:`trilemma.run.data.data_inputs`)."""
    config = hashed_config(run.config.to_dict())
    data, ecfg = run.config.data, run.config.eval
    weights = ecfg.fid_weights or os.environ.get("TRILEMMA_FID_WEIGHTS") or None
    uses_fid = ecfg.fid or ecfg.curve_fid_samples
    config["inputs"] = {
        **data_inputs(data, (stored or {}).get("inputs")),
        "fid_weights": (fidlib.weights_id(weights and str(Path(weights).expanduser()))
                        if weights is None or Path(weights).expanduser().is_file()
                        else f"missing: {weights}") if uses_fid else None}
    if run.config.weights:  # pretrained: the measured weights, by their SHA-256
        config["inputs"]["weights"] = (weights_sha256(run.config.weights) if Path(run.config.weights).exists()
                                       else f"missing: {run.config.weights}")
    return config


def run_dir_for(results_root: Path, run: Run) -> Path:
    return Path(results_root) / run.suite / run.name


def status_of(results_root: Path, run: Run) -> str:
    """'done', 'incomplete' (a measurement failed), 'failed', 'partial' (resumable), 'stale' (config
    changed), 'corrupt' or 'new'."""
    run_dir = run_dir_for(results_root, run)
    try:
        result = read_result(run_dir)
    except TrilemmaError:
        return "corrupt"
    if result is None:
        return "partial" if (run_dir / CHECKPOINT_FILE).exists() else "new"
    if not same_results_config(result["config"], results_config(run, result["config"])):
        return "stale"
    status = {"done": "done", "failed": "failed", "incomplete": "incomplete"}.get(result["status"], "partial")
    return STATUS_INCOMPLETE if status == STATUS_DONE and failed_measurements(result) else status


def needs_training(results_root: Path, run: Run, status: str) -> bool:
    """Whether a run of this status is (re)trained: all but a done one, and an incomplete one without
    a checkpoint (a finished run whose added scaling study failed: re-measured, not retrained)."""
    resumable = (run_dir_for(results_root, run) / CHECKPOINT_FILE).exists()
    return not (status == STATUS_DONE or (status == STATUS_INCOMPLETE and not resumable))


def run_suite(suite: SuiteConfig, runs: list[Run], results_root: Path, device: torch.device,
              retry_failed: bool = True, isolate: bool = False) -> dict[str, str]:
    """Run (or skip, or resume) every run; returns run name -> final status.

    Each run is claimed (:class:`~trilemma.run.lock.RunLock`) while it is worked on; a run another
    process holds is left to it and waited for at the end, so concurrent runners share a suite. With
    ``isolate`` each run (and each measurement added to a finished run) executes in a fresh worker
    process (:mod:`trilemma.run.worker`; ``trilemma run`` does so unless ``--in-process``).
    """
    fix_allocator()  # every run timed in the allocator state of a process that has run others
    ctx = Context(device)
    outcome, started = {}, time.perf_counter()
    status = {run.name: status_of(results_root, run) for run in runs}  # read each result once
    todo = [r for r in runs if needs_training(results_root, r, status[r.name])]
    preflight(todo, ctx, results_root)
    suite_dir = Path(results_root) / suite.name
    remove_stale_temporaries(suite_dir, older_than=600)
    atomic_write_json(suite_dir / SUITE_FILE, suite_dict(suite))

    def work(run: Run, task: str = RUN) -> str:
        """A claimed run (or, with ``ADD_MISSING``, what a finished one lacks), in a fresh worker
        process with ``isolate``, else in this one."""
        if isolate:
            return worker.run_in_worker(run, results_root, device, retry_failed, task)
        if task == ADD_MISSING:
            return add_missing(run, run_dir_for(results_root, run), ctx)
        return claimed_run(run, results_root, ctx, retry_failed)

    for run in runs:
        if run not in todo:
            print(f"[skip] {run.name}: {status[run.name]} with the same config", file=sys.stderr)
            with RunLock(run_dir_for(results_root, run)):
                outcome[run.name] = work(run, ADD_MISSING)
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
            outcome[run.name] = work(run)
        finally:
            lock.release()
    for run in claimed:  # held by another runner: wait for it, then it is done (or ours to finish)
        lock = RunLock(run_dir_for(results_root, run))
        print(f"[wait] {run.name}: waiting for {lock.holder()}", file=sys.stderr)
        with lock:
            outcome[run.name] = work(run)
    return outcome


RUN, ADD_MISSING = "run", "add_missing"  # a worker's tasks: a claimed run, or what a finished run lacks


def claimed_run(run: Run, results_root: Path, ctx: "Context", retry_failed: bool) -> str:
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


def add_missing(run: Run, run_dir: Path, ctx: Context) -> str:
    """Add to a finished run the measurements that need no trained model and that it lacks: the
    real-data row of its FID (test images against the same references; results written before it
    was stored lack it) and the resolution-scaling study, when the suite asks for it; returns the
    run's status (incomplete when the study failed)."""
    result = read_result(run_dir)
    fid = result["measurements"].get(FID)
    if run.config.eval.fid and isinstance(fid, dict) and "real_data" not in fid:
        print(f"  adding the real-data FID row to {run.name}", file=sys.stderr)
        fid["real_data"] = ctx.real_data(run, run.config.eval.fid_samples)
        atomic_write_json(run_dir / RESULT_FILE, result)
    add_scaling(run, run_dir, ctx, result)
    return result["status"]


def add_scaling(run: Run, run_dir: Path, ctx: Context, result: Optional[dict[str, Any]] = None) -> None:
    """Add the resolution-scaling study to a finished run that lacks it, when the suite asks for it."""
    result = result or read_result(run_dir)
    if not run.config.eval.scaling or (SCALING in result["measurements"]
                                       and SCALING not in failed_measurements(result)):
        return
    print(f"  adding the resolution-scaling study to {run.name}", file=sys.stderr)
    errors = result.pop(ERRORS, None) or {}
    errors.pop(SCALING, None)
    if errors:  # other failures stay recorded
        result[ERRORS] = errors
    elif result["status"] == STATUS_INCOMPLETE:  # the failed study was all that was missing
        result["status"], result["error"] = STATUS_DONE, None
    channels = ctx.split(run.config.data, "test").shape[1]  # loaded once per dataset
    result["measurements"][SCALING] = scaling_study(run, channels, ctx.device)
    scaling_failure(result)
    if result.get(ERRORS):
        result["status"] = STATUS_INCOMPLETE
    result["config"] = results_config(run)  # now records the scaling settings too
    result["config_hash"] = config_hash(result["config"])
    atomic_write_json(run_dir / RESULT_FILE, result)


def preflight(runs: list[Run], ctx: Context, results_root: Optional[Path] = None) -> list[str]:
    """Check everything the runs need before anything is written or trained: both splits of each data
    set (files, shapes, labels where the family needs them), each model built on its data's shape, the
    FID weights (a file, or torch-fidelity's download cached or reachable), the run folders, and the
    disk space for the weights and checkpoints. A problem is one error for the whole suite, not a
    failed result per run; when all is well, one line per check is printed and returned."""
    if not runs:
        return []
    datasets, built, weights, run_bytes, loaded = {}, {}, set(), {}, set()
    for run in runs:
        cfg = run.config
        where = f"{run.name}"
        label = dataset_label(cfg.data)
        if label not in datasets:
            train_images, train_labels = ctx.labeled(cfg.data, "train")
            test_images = ctx.split(cfg.data, "test")
            check_splits(cfg.data, train_images, test_images)
            datasets[label] = (tuple(train_images.shape[1:]), len(train_images), len(test_images),
                               train_labels is not None)
        shape, _, _, labeled = datasets[label]
        cls = get_model_class(cfg.model)
        if cls.capabilities_for(cfg.family_config()).conditional and not labeled:
            raise TrilemmaError(f"{where}: {cls.name} is class-conditional, but data set {label!r} has no "
                                f"labels")
        key = (cfg.model, shape, json.dumps(cfg.model_config, sort_keys=True))
        if key not in built:
            try:
                with fork_rng(cfg.seed):
                    model = build_model(cfg.model, shape, None, cfg.model_config)
            except Exception as e:  # noqa: BLE001 (a family's own check, or torch's, at this shape)
                raise TrilemmaError(f"{where}: {cls.name} cannot be built for {shape} images: "
                                    f"{type(e).__name__}: {_first_line(e)}") from None
            built[key] = sum(v.numel() * v.element_size() for v in model.state_dict().values())
            del model
        if cfg.weights and (cfg.weights, key) not in loaded:  # pretrained: every key fits the configured model
            load_pretrained(cfg.model, cfg.model_config, cfg.weights, shape)
            loaded.add((cfg.weights, key))
        run_bytes[run.name] = built[key]
        if cfg.eval.fid or cfg.eval.curve_fid_samples:
            weights.add(fidlib.weights_path(cfg.eval.fid_weights) or fidlib.check_download())
    lines = [f"preflight: data {label}: {n_train:,} training and {n_test:,} test images of "
             f"{'x'.join(map(str, shape))}" for label, (shape, n_train, n_test, _) in datasets.items()]
    lines.append(f"preflight: {len(built)} model{'s' if len(built) > 1 else ''} built on their data's shape "
                 f"(the largest {_size(max(built.values()))} of weights)"
                 + (f"; {len(loaded)} loaded from pretrained weights" if loaded else ""))
    lines += [f"preflight: FID weights {w}" for w in sorted(weights)]
    if results_root is not None:
        lines.append(_check_folders(runs, Path(results_root), run_bytes))
    for line in lines:
        print(line, file=sys.stderr)
    return lines


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _size(n: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _check_folders(runs: list[Run], root: Path, weights: dict[str, int]) -> str:
    """Each run's folder can be made (nothing in its place is a file), and the disk holds what the runs
    will write: each run's weights, kept, and the largest checkpoint (weights, EMA and two optimizer
    moments: four times the weights) twice over while it is replaced."""
    for folder in [root / runs[0].suite, *(run_dir_for(root, r) for r in runs)]:
        if folder.exists() and not folder.is_dir():
            raise TrilemmaError(f"{folder} is a file, not a results folder; move it away, or name the "
                                f"results folder otherwise (--name or --results)")
    kept = sum(weights.values())
    checkpoint = 2 * 4 * max(weights.values())
    need = kept + checkpoint + 10_000_000 * len(runs)  # results, logs and grids: a few MB a run
    existing = root.absolute()
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < need:
        raise TrilemmaError(f"{root}: {_size(free)} free, but the runs need about {_size(need)} (weights "
                            f"{_size(kept)}, checkpoints {_size(checkpoint)}); free some space or give "
                            f"--results on a larger disk")
    return (f"preflight: disk: about {_size(need)} to be written under {root} (weights {_size(kept)}, "
            f"checkpoints {_size(checkpoint)}), {_size(free)} free")


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
    if result is not None and not same_results_config(result["config"], results_config(run, result["config"])):
        kept = keep_previous(run_dir, result)
        print(f"  config of {run.name} changed: its earlier result is kept in {kept}", file=sys.stderr)
        result = None
    checkpoint = run_dir / CHECKPOINT_FILE
    if checkpoint.exists() and (problem := checkpoint_problem(checkpoint, _fresh_model(run, ctx))):
        aside = quarantine(checkpoint)
        print(f"  checkpoint {checkpoint} cannot resume {run.name} ({problem}): moved to {aside.name}, "
              f"training starts afresh", file=sys.stderr)
    if not checkpoint.exists() and not run.config.weights:  # training starts from scratch: nothing of an
        discard_attempt(run_dir)  # earlier attempt stays (pretrained weights, by their hash, are the same)
        result = None
    atomic_write_json(run_dir / CONFIG_FILE, config)
    device = ctx.device
    cls = get_model_class(run.config.model)
    if result is None:
        result = new_result(run.suite, run.name, hashed, {
            "name": cls.name, "title": cls.display_name(), "paper": cls.paper, "family": cls.family,
            "literature": cls.literature, "reported": cls.reported, "plugin": plugin_of(cls.name),
            "capabilities": cls.capabilities_for(run.config.family_config()).as_dict()},
            provenance(str(device), device_name(device), run.config.seed))
        result["data_root"] = str(data_root(run.config.data))
        if run.config.weights:  # pretrained, not trained here: which weights, by their hash
            result["provenance"][PRETRAINED] = weights_record(run.config.model, run.config.weights)
    result["status"], result["error"] = "running", None
    for key in result.pop(ERRORS, None) or {}:  # measurements that failed last time are measured again
        result["measurements"].pop(key, None)

    def save(stop: bool = True) -> None:
        """Write the result; then, when a pre-emption signal has come (and ``stop``), stop the run."""
        atomic_write_json(run_dir / RESULT_FILE, result)
        if stop and (signum := preemption.requested()):
            raise Preempted(f"pre-empted ({preemption.name(signum)}) while measuring: the result so far "
                            f"is written; run again to resume", signum)

    with preemption.catching():  # SIGTERM and submitit's signals: checkpoint, then stop (resumable)
        save()
        try:
            if not run_phases(RunState(run, run_dir, ctx, result, save, stop_after_steps)):
                save(stop=False)  # the test hook stopped training: "running", resumable
                return result["status"]
            result["status"] = STATUS_INCOMPLETE if result.get(ERRORS) else STATUS_DONE
        except KeyboardInterrupt:
            save(stop=False)  # stays "running": the next invocation resumes it
            raise
        except Preempted as e:
            save(stop=False)  # stays "running": a requeue (the same command) resumes it
            raise Preempted(f"{run.name} {e}", e.signum) from None
        except DiskFull:  # nothing more can be written: the suite stops, the result as it was on disk
            raise
        except Exception as e:  # a failing run is recorded, and the suite goes on
            if no_space(e):  # a write of a family or a library (a log line) that found the disk full
                raise DiskFull(f"no space left on device while running {run.name}: {_first_line(e)}; free "
                               f"some space and run again to resume") from None
            result["status"], result["error"] = STATUS_FAILED, error_info(e)
            print(f"  {run.name} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                  file=sys.stderr)
        result["provenance"]["finished"] = now()
        save(stop=False)
        if result["status"] == STATUS_DONE:  # only now: the result and the weights hold it all
            checkpoint.unlink(missing_ok=True)
        if signum := preemption.requested():  # it came as the run ended: the next run is not started
            raise Preempted(f"{run.name} {result['status']}; pre-empted ({preemption.name(signum)}) before "
                            f"the next run; run again to go on", signum)
    return result["status"]


def _fresh_model(run: Run, ctx: Context):
    """The run's model as training would build it (on the CPU), to check a checkpoint against."""
    shape = tuple(ctx.split(run.config.data, "train").shape[1:])
    with fork_rng(run.config.seed):
        return build_model(run.config.model, shape, None, run.config.model_config)
