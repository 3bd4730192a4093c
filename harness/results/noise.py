"""Seed noise: how far each metric of a model moves between seeds alone, for `trilemma compare`.

Measured from results that hold several seeds of a model (runs ``<model>-<data>-s<seed>`` of one
protocol): per model and metric, the standard deviation s over the seeds. Two runs that differ only in
their seed differ by more than ``Z * sqrt(2) * s`` in about 5 % of cases (normal), so a change smaller
than that is not evidence of a regression: :func:`seed_spread`.

``make bench-seeds`` stores the noise of its three seeds as ``noise.json`` in the suite's results folder
(``python -m trilemma.results.noise results/<suite>``), so that later one-seed results, a nightly
against the last, are compared with it.
"""
from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path
from typing import Any, Iterable, Optional

from trilemma.contract.errors import TrilemmaError
from trilemma.results.io import atomic_write_json, read_json, read_result
from trilemma.results.protocol import FIELDS, agree, fingerprint, group_by_protocol, group_fingerprint
from trilemma.results.schema import RESULT_FILE, STATUS_DONE, summarize

NOISE_FILE = "noise.json"
SCHEMA = "trilemma.noise/1"
Z = 1.96  # a two-sided 95 % range
NOISE_METRICS = ("fid", "kid", "precision", "recall", "nll", "train_images_per_second",
                 "sample_images_per_second", "params")  # the metrics compare checks (summary fields)


def model_key(result: dict[str, Any]) -> str:
    """The seeds of one model share this name: ``<model>-<data set>``."""
    s = summarize(result)
    return f"{s.model}-{s.dataset}"


def measure(results: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """model key -> {"seeds", "runs", "sd": {metric: standard deviation}, "fingerprint"} over the done
    runs of each model that share the protocol of most of them; models with one seed are left out."""
    by_model: dict[str, list[dict]] = {}
    for r in results:
        if r.get("status") == STATUS_DONE:
            by_model.setdefault(model_key(r), []).append(r)
    noise = {}
    for key, runs in sorted(by_model.items()):
        # The largest set of runs of one protocol: seeds of another budget are another experiment.
        runs = max(group_by_protocol(runs, FIELDS), key=len)
        if len(runs) < 2:
            continue
        sd = {}
        for metric in NOISE_METRICS:
            values = [v for r in runs if isinstance(v := getattr(summarize(r), metric), (int, float))
                      and math.isfinite(v)]
            if len(values) >= 2:
                sd[metric] = statistics.stdev(values)
        noise[key] = {"seeds": len(runs), "runs": sorted(r["run"] for r in runs), "sd": sd,
                      "fingerprint": group_fingerprint(runs)}
    return noise


def seed_spread(entry: Optional[dict[str, Any]], metric: str, result: dict[str, Any]) -> Optional[float]:
    """``Z * sqrt(2) * s``: the change between two seeds that seeds alone exceed 5 % of the time, from a
    noise entry measured under the result's protocol; None where there is none."""
    if not entry or not agree(entry.get("fingerprint") or {}, fingerprint(result)):
        return None
    sd = (entry.get("sd") or {}).get(metric)
    return Z * math.sqrt(2) * sd if isinstance(sd, (int, float)) else None


def read_noise(folder: Path) -> dict[str, dict[str, Any]]:
    """The noise stored in ``folder`` (a suite's results folder); {} where it has none."""
    path = Path(folder) / NOISE_FILE
    if not path.is_file():
        return {}
    noise = read_json(path)
    if not isinstance(noise, dict) or noise.get("schema") != SCHEMA or not isinstance(noise.get("models"), dict):
        raise TrilemmaError(f"{path}: not a noise file of schema {SCHEMA}")
    return noise["models"]


def write_noise(folder: Path, out: Optional[Path] = None) -> Path:
    """Measure the seed noise of the results in ``folder`` and write it to ``out`` (default
    ``folder/noise.json``); an error when no model has two seeds."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TrilemmaError(f"{folder} is not a results folder")
    results = [r for d in sorted(folder.iterdir()) if (d / RESULT_FILE).is_file() and (r := read_result(d))]
    noise = measure(results)
    if not noise:
        raise TrilemmaError(f"{folder}: no model has two finished seeds of one protocol; the noise needs "
                            f"several (e.g. make bench-seeds)")
    out = Path(out) if out is not None else folder / NOISE_FILE
    atomic_write_json(out, {"schema": SCHEMA, "folder": str(folder), "z": Z, "models": noise})
    return out


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m trilemma.results.noise RESULTS_FOLDER``: write its ``noise.json``."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m trilemma.results.noise RESULTS_FOLDER  (writes RESULTS_FOLDER/noise.json)",
              file=sys.stderr)
        return 2
    try:
        out = write_noise(Path(argv[0]))
    except TrilemmaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"seed noise of {len(read_noise(out.parent))} models written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
