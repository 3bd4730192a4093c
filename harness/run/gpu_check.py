"""``make gpu-check``: one command that shows what works on a device the project has not met yet.

For every registered family it builds the ``cifar10_gpu`` preset (3x32x32) on the device, counts its
parameters, times a few bf16 autocast training steps of the compiled networks through the harness's
own step (:func:`trilemma.run.profile_train._step`: :class:`~trilemma.contract.update.Update`, the
execution settings of :mod:`trilemma.run.execution`; synchronized, after untimed warm-up steps that
hold the compilation), and draws one small batch from the default sampler. Each family's error is
caught and reported in one line. Then it times a FID-50k end to end (one fast family's samples, the
Inception features and the metrics: :func:`trilemma.measure.fid.fid`), and writes
``reports/gpu-check/report.md`` and ``report.json``. A time budget (default 480 s) stops starting new
families once spent, and one family may take at most ``--family-seconds`` (150); the report lists
those left out and those cut.

On a CPU (``--device cpu``, or no GPU) the same command runs the ``tiny`` preset instead (labelled),
skips the FID-50k (``--fid-samples N`` runs a FID@N against N reference images instead, labelled; a FID is
skipped with its reason where the reference data or the Inception weights are missing), and marks
what needs CUDA (peak memory) as skipped. Compilation or bf16 that fail fall back to eager, then
fp32, and the report says which ran.

On a GPU machine without internet (``/work/shared/DEVICE.md``): stage the missing packages, the CIFAR-10
subset and the FID weights with ``../shared/bin/stage-device`` here; there, from the checkout,
``bash .stage/p1/setup.sh``, then ``source .stage/p2/setup.sh && python3 -m pip install -q --no-deps
--no-build-isolation -e . && python3 -m trilemma gpu-check`` (the image's torch, no venv; the setup
exports ``PYTHONPATH``, ``TRILEMMA_DATA`` and ``TRILEMMA_FID_WEIGHTS``). Without full CIFAR-10 the FID
reference is the staged subset's training images (``--fid-dataset auto``); the report says which.
"""
from __future__ import annotations

import argparse
import gc
import contextlib
import platform
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import torch

from trilemma.contract.errors import TrilemmaError
from trilemma.contract.registry import get_model_class, model_names
from trilemma.measure.speed import parameters, peak_memory, reset_peak_memory
from trilemma.measure.timing import time_calls
from trilemma.results.io import atomic_write_bytes, atomic_write_json
from trilemma.run.execution import execution_record, sampling_precision, set_tf32
from trilemma.run.profile_train import _step

SHAPE = (3, 32, 32)
GPU_PRESET, CPU_PRESET = "cifar10_gpu", "tiny"
# Samples per sampling call by the sampler's kind: a full batch for one pass, a few for chains.
SAMPLE_BATCH = {"one_pass": 64, "iterative": 4, "mcmc": 4, "autoregressive": 2}
NEEDS_CUDA = "needs CUDA"
FID_SECONDS = 300.0  # the FID's own limit, apart from the families' budget


def first_line(e: BaseException) -> str:
    """``Type: first line`` of an error (with the next line where the first only introduces it)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    text = " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else (lines[0] if lines else "")
    return f"{type(e).__name__}: {text}".rstrip(": ")


def _free(device: torch.device) -> None:
    """Drop compiled graphs and cached blocks between families (one family's OOM must not sink the next)."""
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def time_limit(seconds: Optional[float]):
    """Raise TimeoutError inside the block after ``seconds`` (SIGALRM: the main thread of a Unix process
    only; elsewhere, or with None, no limit). A stuck compilation or sampler ends as this family's error."""
    if not seconds or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"over the {seconds:g} s limit of one family (--family-seconds)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --- one family ------------------------------------------------------------------------------------

def check_family(name: str, preset: str, device: torch.device, batch: int, steps: int,
                 compile_mode: Optional[str], sample_batch: Optional[int], warmup: int = 2,
                 limit: Optional[float] = None) -> dict[str, Any]:
    """Build, train ``steps`` timed steps and sample once; never raises (the error is the record's).

    Status: ``ok``; ``fallback`` when training ran only without compilation or bf16 (the failures are
    in ``fallbacks``); ``error`` with the failing phase and the error's first line; ``skipped``.
    """
    row: dict[str, Any] = {"name": name, "preset": preset, "status": "ok", "error": None}
    phase = "build"
    try:
        with time_limit(limit):
            cls = get_model_class(name)
            if preset not in cls.presets:
                return row | {"status": "skipped", "error": f"no {preset!r} preset"}
            row["sampling_kind"] = cls.capabilities.sampling
            phase = "training"
            row |= _train(name, preset, device, batch, steps, compile_mode, warmup)
            model = row.pop("_model")
            phase = "sampling"
            row |= _sample(model, device, sample_batch or SAMPLE_BATCH[cls.capabilities.sampling],
                           row["precision"])
            del model
        if row["fallbacks"]:
            row["status"] = "fallback"
    except Exception as e:  # any failure is this family's finding, not the command's
        row |= {"status": "error", "error": f"{phase}: {first_line(e)}"}
    _free(device)
    return row


def _train(name: str, preset: str, device: torch.device, batch: int, steps: int,
           compile_mode: Optional[str], warmup: int) -> dict[str, Any]:
    """Time the training step, dropping compilation then bf16 where they fail (each failure recorded)."""
    attempts = [("bf16", compile_mode), ("bf16", None), ("fp32", None)]
    attempts = list(dict.fromkeys(attempts))  # without --compile, bf16 eager comes first
    fallbacks = []
    for precision, mode in attempts:
        reset_peak_memory(device)
        try:
            model, step = _step(name, preset, SHAPE, batch, device, precision, mode)
            timing = time_calls(step, device, steps, warmup=warmup)
        except Exception as e:
            if isinstance(e, (torch.cuda.OutOfMemoryError, TimeoutError)) or len(fallbacks) == len(attempts) - 1:
                raise
            fallbacks.append(f"{precision} {mode or 'eager'}: {first_line(e)}")
            _free(device)
            continue
        memory = peak_memory(device)
        count = parameters(model)
        return {"_model": model, "params": count["total"], "sampling_params": count["sampling"],
                "precision": precision, "compile": mode or "eager", "batch_size": batch,
                "warmup_seconds": sum(timing["warmup_seconds"]), "step_seconds": timing["median"],
                "step_iqr_seconds": timing["iqr"], "timed_steps": timing["repeats"],
                "train_images_per_second": batch / timing["median"],
                "peak_memory_bytes": memory["peak_bytes"],
                # on a CPU, the process's resident peak where it can be reset (Linux): speed.peak_memory
                "peak_memory": memory["kind"] if memory["peak_bytes"] is not None else f"skipped: {NEEDS_CUDA}",
                "fallbacks": fallbacks}
    raise AssertionError("unreachable")


@torch.no_grad()
def _sample(model, device: torch.device, n: int, precision: str) -> dict[str, Any]:
    """One call of the default sampler at ``n`` samples (under the training's precision); its NFE."""
    model.eval()
    sampler = model.resolve_sampler(None)
    with sampling_precision(model, precision):
        timing = time_calls(lambda: model.sample(n, sampler=sampler), device, 1, warmup=0)  # one call: bounded
    return {"sampler": sampler, "nfe_per_sample": model.samplers()[sampler], "sample_batch": n,
            "sample_seconds": timing["median"], "samples_per_second": n / timing["median"],
            "sample_note": "one call, compilation of the sampling graphs included"}


# --- FID end to end --------------------------------------------------------------------------------

def check_fid(name: str, preset: str, device: torch.device, n: int, n_ref: Optional[int], batch: int,
              dataset: str) -> dict[str, Any]:
    """FID@n of ``name``'s samples (untrained: the figure is a timing, not a quality) end to end."""
    from trilemma.measure import fid as fidlib
    from trilemma.run.data import dataset_label

    row: dict[str, Any] = {"model": name, "preset": preset, "n": n, "dataset": dataset, "status": "ok",
                           "error": None}
    if n <= 0:
        return row | {"status": "skipped", "error": "--fid-samples 0"}
    try:
        weights = fidlib.weights_path(None)
        if weights is None:
            fidlib.check_download()
        data, images = _reference_images(dataset)
        row["dataset"] = dataset_label(data) if data.name == "cifar10" else data.path
        if tuple(images.shape[1:]) != SHAPE:
            raise TrilemmaError(f"FID reference {dataset}: images are {tuple(images.shape[1:])}, not {SHAPE}")
        images = images[:n_ref or len(images)]
        t0 = time.perf_counter()
        extractor = fidlib.FeatureExtractor(weights, device, batch_size=batch if device.type == "cuda" else 0)
        key = fidlib.reference_key(dataset_label(data), "train", images, extractor.weights_id)
        ref = fidlib.reference(extractor, images, key)
        t1 = time.perf_counter()
        torch.manual_seed(0)
        model = get_model_class(name)(_config(name, preset), SHAPE).to(device).eval()
        with sampling_precision(model, "bf16"):
            values, _ = fidlib.fid(model, extractor, ref, n, min(batch, n), kid=True, prc=False, bootstrap=0)
        t2 = time.perf_counter()
        row |= {"fid": values["fid"], "n_ref": len(images), "reference_seconds": t1 - t0,
                "end_to_end_seconds": t2 - t1, "seconds": values["seconds"], "sample_batch": min(batch, n),
                "sampler": values["sampler"], "features": values["features"],
                "note": "untrained model: a timing of the FID path (sampling bf16, Inception fp32, "
                        "FID and KID; precision/recall and bootstrap left out)"}
        del model
    except Exception as e:
        row |= {"status": "skipped" if isinstance(e, TrilemmaError) else "error", "error": first_line(e)}
    _free(device)
    return row


def _reference_images(dataset: str):
    """The FID reference's data config and training images: ``cifar10``, an npz folder, or ``auto``
    (CIFAR-10 where it is found, else the CIFAR-10 subset under ``$TRILEMMA_DATA`` that the GPU
    machine's staging brings)."""
    from trilemma.run.data import DataConfig, data_root, load_split

    if dataset in ("cifar10", "auto"):
        data = DataConfig(name="cifar10", download=False)
        try:
            return data, load_split(data, "train")
        except TrilemmaError:
            subset = data_root(data) / "cifar10-subset"
            if dataset == "cifar10" or not (subset / "train.npz").is_file():
                raise
        dataset = str(subset)
    data = DataConfig(name="npz", path=str(Path(dataset).expanduser().resolve()), label="fid_reference")
    return data, load_split(data, "train")


def _config(name: str, preset: str):
    from trilemma.contract.family import build_config

    return build_config(get_model_class(name), preset, {})


# --- the whole check -------------------------------------------------------------------------------

def gpu_check(device: torch.device, families: Optional[list[str]] = None, preset: Optional[str] = None,
              steps: int = 3, batch: Optional[int] = None, compile_mode: Optional[str] = "default",
              sample_batch: Optional[int] = None, budget: float = 480.0, fid_model: str = "dcgan",
              fid_samples: Optional[int] = None, fid_dataset: str = "auto", warmup: int = 2,
              out: Optional[Path] = None, family_seconds: Optional[float] = 150.0) -> dict[str, Any]:
    """The report's record: the environment, one row per family, and the FID timing; with ``out``,
    the report is rewritten there after each part (a run killed midway leaves what it found)."""
    cuda = device.type == "cuda"
    preset = preset or (GPU_PRESET if cuda else CPU_PRESET)
    names = families or model_names()
    unknown = [n for n in names if n not in model_names()]
    if unknown:
        raise TrilemmaError(f"unknown model(s) {', '.join(unknown)}; registered: {', '.join(model_names())}")
    batch = batch or (64 if cuda else 8)
    if cuda:
        set_tf32(True)
    started = time.perf_counter()
    env = execution_record(device, "bf16", True, compile_mode, batch)
    record: dict[str, Any] = {
        "schema": "gpu-check/1", "device": str(device), "device_name": env["device_name"],
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "preset": preset,
        "preset_note": None if preset == GPU_PRESET else
        f"{preset!r} preset, not {GPU_PRESET!r} ({'asked for' if cuda else 'CPU mode: the GPU presets are for CUDA'})",
        "settings": {"steps": steps, "warmup": warmup, "batch_size": batch, "precision": "bf16 autocast",
                     "compile": compile_mode or "eager", "shape": list(SHAPE), "budget_seconds": budget,
                     "family_seconds": family_seconds},
        "models": names, "families": [], "fid": None, "not_started": [], "complete": False}

    def save() -> None:
        record["elapsed_seconds"] = time.perf_counter() - started
        record["budget_exceeded"] = bool(record["not_started"])
        if out is not None:
            write_report(record, out)

    # The FID first: a fixed cost that the per-family loop must not starve.
    n = fid_samples if fid_samples is not None else (50_000 if cuda else 0)
    with time_limit(FID_SECONDS):  # a TimeoutError ends inside check_fid as the FID's error
        fid_row = check_fid(fid_model, preset, device, n, None if cuda else n, 500 if cuda else 100, fid_dataset)
    why = "asked for" if cuda else "CPU mode"
    fid_row["label"] = "FID-50k" if n in (0, 50_000) else f"FID@{n} (not FID-50k: {why})"
    if n <= 0:
        fid_row["error"] = (f"FID-50k {NEEDS_CUDA} (--fid-samples N runs a FID@N on the CPU)"
                            if not cuda and fid_samples is None
                            else "--fid-samples 0")
    record["fid"] = fid_row
    print(f"  {fid_row['label']}: {fid_row['status']} {fid_row.get('end_to_end_seconds') or fid_row['error'] or ''}",
          file=sys.stderr)
    save()

    for name in names:
        if time.perf_counter() - started > budget:
            record["not_started"].append(name)
            record["families"].append({"name": name, "preset": preset, "status": "skipped",
                                       "error": f"time budget of {budget:.0f} s spent"})
            continue
        row = check_family(name, preset, device, batch, steps, compile_mode, sample_batch, warmup, family_seconds)
        record["families"].append(row)
        print(f"  {name}: {row['status']} {row['error'] or ''}", file=sys.stderr)
        save()
    record["complete"] = True
    save()
    return record


# --- the report ------------------------------------------------------------------------------------

def _num(value: Optional[float], fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def render(record: dict[str, Any]) -> str:
    s = record["settings"]
    lines = [f"# GPU check: {record['device_name']}", "",
             f"{record['date']}; device {record['device']}; torch {record['torch']}, CUDA {record['cuda']}, "
             f"cuDNN {record['cudnn']}, Python {record['python']}.", "",
             f"Preset **{record['preset']}** at {'x'.join(map(str, s['shape']))}"
             + (f" ({record['preset_note']})" if record["preset_note"] else "")
             + f"; {s['steps']} timed training steps of batch {s['batch_size']} after {s['warmup']} untimed "
             f"warm-up steps (compilation), {s['precision']}, compile {s['compile']}; one call of the default sampler. "
             f"{record['elapsed_seconds']:.0f} s of a {s['budget_seconds']:.0f} s budget.", ""]
    if not record["complete"]:
        lines += [f"**Incomplete**: stopped or still running after {len(record['families'])} of "
                  f"{len(record['models'])} families.", ""]
    if record["not_started"]:
        lines += [f"**Time budget spent**: not started: {', '.join(record['not_started'])}.", ""]
    lines += ["| family | status | params (M) | precision | compile | step (ms) | train img/s | sampler | NFE "
              "| sample batch | samples/s | peak memory (GiB) | error / fallback |",
              "| --- | --- | ---: | --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in record["families"]:
        memory = (_num(r["peak_memory_bytes"] / 2**30, ".2f") if r.get("peak_memory_bytes") is not None
                  else r.get("peak_memory", ""))
        note = r["error"] or "; ".join(r.get("fallbacks") or [])
        cells = [r["name"], r["status"], _num(r.get("params") and r["params"] / 1e6, ".3f"),
                 r.get("precision", ""), r.get("compile", ""),
                 _num(r.get("step_seconds") and r["step_seconds"] * 1e3, ".1f"),
                 _num(r.get("train_images_per_second"), ".1f"), r.get("sampler", ""), r.get("nfe_per_sample", ""),
                 r.get("sample_batch", ""), _num(r.get("samples_per_second"), ".2f"), memory, note.replace("|", "/")]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    f = record["fid"]
    lines += ["", f"## {f['label']} end to end ({f['model']}, preset {f['preset']})", ""]
    if f["status"] == "ok":
        sec = f["seconds"]
        lines.append(f"{f['end_to_end_seconds']:.1f} s for {f['n']} samples (sampling {sec['sampling']:.1f} s, "
                     f"Inception features {sec['features']:.1f} s, metrics {sec['metrics']:.1f} s) against "
                     f"{f['n_ref']} reference images of {f['dataset']} (their features: "
                     f"{f['reference_seconds']:.1f} s, cached after the first time); FID {f['fid']:.2f}. {f['note']}.")
    else:
        lines.append(f"{f['status']}: {f['error']}")
    return "\n".join(lines) + "\n"


def write_report(record: dict[str, Any], out: Path) -> Path:
    out = Path(out)
    atomic_write_json(out / "report.json", record)
    atomic_write_bytes(out / "report.md", render(record).encode())
    return out / "report.md"


# --- command line ----------------------------------------------------------------------------------

def run_from_args(args: argparse.Namespace) -> int:
    from trilemma.run.runner import resolve_device

    if (args.steps < 1 or args.warmup < 0 or (args.batch is not None and args.batch < 1) or args.budget <= 0
            or args.family_seconds <= 0):
        raise TrilemmaError("--steps and --batch must be at least 1, --warmup 0 or more, --budget and "
                            "--family-seconds above 0")
    families = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    record = gpu_check(resolve_device(args.device), families, args.preset, args.steps, args.batch,
                       None if args.no_compile else "default", args.sample_batch, args.budget,
                       args.fid_model, args.fid_samples, args.fid_dataset, args.warmup, args.out, args.family_seconds)
    path = Path(args.out) / "report.md"
    print(render(record))
    print(f"report written to {path} and {path.with_suffix('.json')}")
    return 0
