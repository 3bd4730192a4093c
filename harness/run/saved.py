"""Use a finished run's saved model: re-measure it (``trilemma eval``) or draw from it (``trilemma sample``).

Both rebuild the model from ``model.safetensors`` and ``model.json`` (:mod:`trilemma.run.checkpoint`),
so nothing is retrained. A re-measurement draws its samples with the same seed stream as the run's
own FID (the run's seed + 1), so at the run's own n it reproduces the run's figure, and at a larger
n it is the same protocol with more samples. Each re-measurement is appended to the result's
``evaluations`` with its protocol and time; the run's own measurements are never overwritten.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import torch

from trilemma.contract.errors import TrilemmaError
from trilemma.measure import fid as fidlib
from trilemma.measure import nll as nll_measure
from trilemma.measure.speed import sample_uint8
from trilemma.results.io import atomic_write_json, now, read_result
from trilemma.results.schema import EVALUATIONS, MEASURED, RESULT_FILE
from trilemma.run.checkpoint import load_weights
from trilemma.run.phases import coverage_kind, fork_rng, save_grid, score_coverage
from trilemma.run.runner import Context, device_name, resolve_device
from trilemma.run.settings import Run, RunConfig


def _load(run_dir: Path, device: str):
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise TrilemmaError(f"{run_dir} is not a run folder")
    torch_device = resolve_device(device)
    model, meta = load_weights(run_dir, torch_device)
    config = RunConfig.from_dict(meta["run_config"], str(run_dir / "model.json"))
    return model, config, torch_device


def evaluate_saved(run_dir: Path, fid_samples: Optional[int] = None, nll: bool = False,
                   sampler: Optional[str] = None, device: str = "auto", nll_draws: Optional[int] = None,
                   coverage_samples: Optional[int] = None) -> dict[str, Any]:
    """Re-measure the saved model of ``run_dir``; returns the evaluation record it appended.

    ``nll_draws`` (default: the run's ``eval.nll_draws``) > 1 scores a flow that offers it by the
    importance-weighted NLL (:func:`trilemma.measure.nll.nll`). ``coverage_samples`` scores the MNIST
    classes or Stacked MNIST modes of that many samples, drawn by the FID's seed stream (so its first
    ones are the run's FID samples): the literature's 26,000 for Stacked MNIST costs sampling only, no
    Inception features."""
    run_dir = Path(run_dir)
    result = read_result(run_dir)
    if result is None or result.get("status") not in MEASURED:  # trained, its weights saved
        raise TrilemmaError(f"{run_dir} holds no finished run (status: "
                            f"{result.get('status') if result else 'no result.json'})")
    model, config, torch_device = _load(run_dir, device)
    run = Run(result.get("suite", "?"), result.get("run", run_dir.name), config)
    ctx = Context(torch_device)
    kind = None
    if coverage_samples is not None:  # checked before anything is measured
        kind = coverage_kind(config.data, tuple(ctx.split(config.data, "test").shape[1:]))
        if kind is None:
            raise TrilemmaError(f"--coverage-samples: coverage is measured on mnist and stacked_mnist only, "
                                f"not on {config.data.name}")
        if coverage_samples < 2:
            raise TrilemmaError(f"--coverage-samples must be at least 2, got {coverage_samples}")
    record: dict[str, Any] = {"time": now(), "device": str(torch_device), "device_name": device_name(torch_device)}
    if fid_samples is not None or not (nll or coverage_samples):
        n = fid_samples or config.eval.fid_samples
        if n < 2:
            raise TrilemmaError(f"--fid-samples must be at least 2, got {n}")
        extractor, ref = ctx.reference(run)
        with fork_rng(config.seed + 1):  # the run's own FID seed stream
            values, _ = fidlib.fid(model, extractor, ref, n, config.eval.sample_batch,
                                   config.eval.kid, config.eval.precision_recall, sampler=sampler)
        record["fid"] = values
        print(f"FID@{n} = {values['fid']:.3f}", file=sys.stderr)
    if nll:
        if model.capabilities.density == "none":
            raise TrilemmaError(f"model {model.name!r} has no density: there is no NLL to measure")
        test = ctx.split(config.data, "test")
        test = test[:config.eval.nll_images] if config.eval.nll_images else test
        with fork_rng(config.seed + 2):
            record["nll"] = nll_measure.nll(model, test, config.eval.nll_batch,
                                            draws=nll_draws or config.eval.nll_draws)
        print(f"NLL = {record['nll']['bpd']:.4f} bits/dim ({record['nll']['kind']})", file=sys.stderr)
    if coverage_samples is not None:
        record["coverage"] = score_coverage(model, config, ctx, kind, coverage_samples)
        shown = (f"{record['coverage']['modes']} modes of 1000, KL {record['coverage']['modes_kl']:.3f}"
                 if kind == "modes" else f"{record['coverage']['classes_hit']} classes, "
                 f"KL {record['coverage']['class_kl']:.3f}")
        print(f"coverage@{coverage_samples}: {shown}", file=sys.stderr)
    result.setdefault(EVALUATIONS, []).append(record)
    atomic_write_json(run_dir / RESULT_FILE, result)
    return record


def sample_saved(run_dir: Path, n: int, out: Path, sampler: Optional[str] = None, seed: int = 0,
                 device: str = "auto") -> Path:
    """Draw ``n`` samples from the saved model of ``run_dir`` into a PNG grid at ``out``."""
    if n < 1:
        raise TrilemmaError(f"-n must be at least 1, got {n}")
    model, _, _ = _load(Path(run_dir), device)
    with fork_rng(seed), torch.no_grad():
        images = sample_uint8(model, n, model.resolve_sampler(sampler))
    save_grid(images, Path(out))
    return Path(out)
