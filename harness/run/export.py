"""``trilemma export RUN -o DIR``: a finished run's model as a folder that a suite's ``weights:`` reads back.

DIR holds
    model.safetensors  the evaluated weights (the EMA where there is one): tensors only
    model.json         what rebuilds the model: family, data shape, model_config, and the run's
                       settings (preset, data, budget)
    README.md          a short model card: family, paper, data, budget, and the measured row

The two weight files are the run folder's own, copied byte for byte after
:func:`trilemma.run.checkpoint.load_weights` has rebuilt the model from them (a run whose weights do
not load is refused, not exported), so the export's SHA-256 is the run's.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from trilemma.contract.errors import TrilemmaError
from trilemma.results.formats import DASH, format_budget, format_fid, format_integer, format_nll, format_rate
from trilemma.results.io import atomic_write_bytes, read_result
from trilemma.results.schema import (MEASURED, PRETRAINED, WEIGHTS_CONFIG_FILE, WEIGHTS_FILE, dataset_label,
                                     summarize)
from trilemma.run.checkpoint import load_weights

CARD_FILE = "README.md"


def export_run(run_dir: Path, out: Path) -> Path:
    """Write the export of the finished run in ``run_dir`` to the folder ``out``; returns ``out``."""
    run_dir, out = Path(run_dir), Path(out)
    result = read_result(run_dir) if run_dir.is_dir() else None
    if result is None or result.get("status") not in MEASURED:
        raise TrilemmaError(f"{run_dir} holds no finished run (status: "
                            f"{result.get('status') if result else 'no result.json'}); only a finished run "
                            f"has measured weights to export")
    model, meta = load_weights(run_dir)  # the weights rebuild the model, or a one-line error
    if out.exists() and not out.is_dir():
        raise TrilemmaError(f"-o {out} is a file, not a folder")
    if out.resolve() == run_dir.resolve():
        raise TrilemmaError(f"-o {out} is the run folder itself; export to another folder")
    weights = (run_dir / WEIGHTS_FILE).read_bytes()
    atomic_write_bytes(out / WEIGHTS_FILE, weights)
    atomic_write_bytes(out / WEIGHTS_CONFIG_FILE, (run_dir / WEIGHTS_CONFIG_FILE).read_bytes())
    card = model_card(result, meta, hashlib.sha256(weights).hexdigest(), model.capabilities.as_dict())
    atomic_write_bytes(out / CARD_FILE, card.encode("utf-8"))
    return out


def model_card(result: dict[str, Any], meta: dict[str, Any], sha256: str, capabilities: dict[str, Any]) -> str:
    """The README.md of an export: what the model is, what it was trained on and for how long, what it
    measured, and the suite entry that measures it again."""
    s, model = summarize(result), result.get("model") or {}
    run_config, config = meta.get("run_config") or {}, result.get("config") or {}
    prov = result.get("provenance") or {}
    shape = "x".join(map(str, meta.get("data_shape") or []))
    trained = (result.get("measurements") or {}).get("train") or {}
    if s.pretrained:  # exported again: it was not trained by this run either
        budget = f"pretrained, not trained here (weights SHA-256 {prov[PRETRAINED].get('sha256')})"
    else:
        budget = format_budget(run_config.get("train") or {})
        if s.images_seen is not None and s.train_seconds is not None:
            budget += f"; it saw {s.images_seen:,} images in {s.train_seconds:.3g} s of training"
    ema = "an exponential moving average of the trained weights" if trained.get("ema") else "the trained weights"
    data = {k: v for k, v in (run_config.get("data") or {}).items()
            if k not in ("root", "download") and v is not None}
    entry = {"name": meta.get("model"), "preset": run_config.get("preset"), "weights": "path/to/this/folder"}
    sampler = f"{s.sampler}, {format_integer(s.sample_nfe)} NFE" if s.sampler else DASH
    lines = [
        f"# {model.get('title') or meta.get('model')} (`{meta.get('model')}`), measured by trilemma",
        "",
        f"{model.get('paper') or ''}",
        "",
        "| | |",
        "| --- | --- |",
        f"| family | {model.get('family') or DASH}; density {capabilities.get('density')}, sampling "
        f"{capabilities.get('sampling')} |",
        f"| data | {dataset_label(config)}, {shape} images, seed {run_config.get('seed')} |",
        f"| preset | {run_config.get('preset') or 'the defaults'} (`model.json` holds the full model_config) |",
        f"| budget | {budget} |",
        f"| weights | `{WEIGHTS_FILE}`: {ema}; SHA-256 `{sha256}` |",
        f"| run | suite `{result.get('suite')}`, run `{result.get('run')}`, {prov.get('finished') or '?'}, "
        f"on {prov.get('device_name') or '?'}, trilemma {(prov.get('versions') or {}).get('trilemma') or '?'}, "
        f"commit {(prov.get('git_commit') or '?')[:12]}{' (dirty)' if prov.get('git_dirty') else ''} |",
        "",
        "## Measured",
        "",
        "| FID | NLL (bits/dim) | train img/s | sample img/s | sampler | parameters |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| {format_fid(s.fid, s.fid_pm, s.fid_samples)} | {format_nll(s.nll, s.nll_pm, s.nll_bound, s.nll_kind)} | "
        f"{format_rate(s.train_images_per_second)} | {format_rate(s.sample_images_per_second)} | {sampler} | "
        f"{format_integer(s.params)} |",
        "",
        f"Measured on {prov.get('device_name') or '?'}; the run's `result.json` holds every protocol setting.",
        "",
        "## Measure it again",
        "",
        "A suite entry reads this folder back (`weights:`, relative to the suite file); with the same data,",
        "seed and `eval` settings it gives the same FID, NLL and parameter count:",
        "",
        "```yaml",
        "name: again",
        f"datasets: [{json.dumps(data)}]",
        f"seeds: [{run_config.get('seed')}]",
        f"eval: {json.dumps({k: v for k, v in (run_config.get('eval') or {}).items() if k in CARD_EVAL})}",
        "models:",
        f"  - {json.dumps({k: v for k, v in entry.items() if v is not None})}",
        "```",
        "",
    ]
    return "\n".join(lines)


# The eval settings the card's suite repeats: those that change the FID and NLL figures.
CARD_EVAL = ("fid", "nll", "fid_samples", "fid_ref_images", "kid", "precision_recall", "sample_batch", "nll_images",
             "nll_draws", "sample_precision")
