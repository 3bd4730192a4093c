"""Result files: one schema-versioned JSON document per run, written atomically, with provenance.

Layout: ``results/<suite>/<run>/result.json`` beside the run's ``config.json``, ``log.jsonl``,
``checkpoint.pt`` and ``samples.png``. A result is rewritten after every measurement, so a crash loses
nothing already measured and a resumed run skips what is there.

Document (``SCHEMA`` = "trilemma.result/1"):

    schema, suite, run, status ("running" | "done" | "failed"), config_hash
    config        the run's fully resolved config (model, data, train, eval, seed, device)
    model         {"name", "paper", "family", "literature", "capabilities": {density, free_form_jacobian,
                   sampling}}
    measurements  {key: measurement dict}, keys below; each dict carries its own protocol fields
    curve         [{"images", "train_seconds", "wall_seconds", <metric>: value, ...}, ...]
    provenance    {"versions", "device", "device_name", "git_commit", "git_dirty", "seed", "python",
                   "platform", "started", "finished"}
    error         null, or {"type", "message", "traceback"} when status is "failed"
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import traceback
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

SCHEMA = "trilemma.result/1"
RESULT_FILE = "result.json"
SUITE_FILE = "suite.json"  # results/<suite>/suite.json: the resolved suite of the last invocation
CONFIG_FILE = "config.json"
LOG_FILE = "log.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
SAMPLES_FILE = "samples.png"

STATUS_RUNNING, STATUS_DONE, STATUS_FAILED = "running", "done", "failed"

# Measurement keys, and the value fields the report reads from each.
TRAIN = "train"  # images_per_second, wall_seconds, train_seconds, images_seen, batch_size, precision, device
SAMPLE = "sample"  # {sampler: {images_per_second, nfe_per_sample, batch_size, seconds, ...}}, "default"
PARAMS = "params"  # total, sampling
MEMORY = "memory"  # train_peak_bytes, sample_peak_bytes, kind
FID = "fid"  # fid, kid_mean, kid_std, precision, recall, n_gen, n_ref, reference, extractor, sampler
NLL = "nll"  # bpd, bound, split, n_images, protocol
SCALING = "scaling"  # written by the resolution-scaling study

PACKAGES = ("torch", "torchvision", "torch-fidelity", "geomloss", "numpy", "omegaconf", "trilemma")


def config_hash(config: dict[str, Any]) -> str:
    """Stable hash of a resolved run config: a run is redone only when this changes."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write JSON to a temporary file in the same folder, fsync it, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False, default=_jsonable)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _jsonable(obj: Any):
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def read_result(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / RESULT_FILE
    if not path.exists():
        return None
    with open(path) as f:
        result = json.load(f)
    if result.get("schema") != SCHEMA:
        raise ValueError(f"{path}: schema {result.get('schema')!r}, expected {SCHEMA!r}")
    return result


def load_results(suite_dir: Path) -> list[dict[str, Any]]:
    """Every result under ``results/<suite>/``, sorted by run name."""
    return [r for d in sorted(Path(suite_dir).iterdir()) if d.is_dir() and (r := read_result(d))]


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_state(root: Path | None = None) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout trilemma runs from, or (None, None) outside git."""
    root = root or Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10).stdout
        return commit, (bool(status.strip()) if commit else None)
    except (OSError, subprocess.SubprocessError):
        return None, None


def provenance(device: str, device_name: str, seed: int) -> dict[str, Any]:
    commit, dirty = git_state()
    return {
        "versions": package_versions(),
        "device": device,
        "device_name": device_name,
        "git_commit": commit,
        "git_dirty": dirty,
        "seed": seed,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "started": now(),
        "finished": None,
    }


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_result(suite: str, run: str, config: dict[str, Any], model_info: dict[str, Any],
               prov: dict[str, Any]) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "suite": suite,
        "run": run,
        "status": STATUS_RUNNING,
        "config_hash": config_hash(config),
        "config": config,
        "model": model_info,
        "measurements": {},
        "curve": [],
        "provenance": prov,
        "error": None,
    }


def error_info(exc: BaseException) -> dict[str, str]:
    return {"type": type(exc).__name__, "message": str(exc),
            "traceback": "".join(traceback.format_exception(exc))}
