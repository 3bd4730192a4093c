"""An *estimate* of a suite's GPU-hours from FLOPs counted, printed by ``trilemma run --dry-run``.

Training FLOPs per image are counted on one real training step of two random images
(:mod:`trilemma.measure.flops`). Sampling: an autoregressive sampler's network evaluations are one
position each, with the caches its family keeps (a key/value cache, PixelCNN's stacks), so one sample
of it is run and its FLOPs counted, as for a family whose evaluations are parts of its network
(``nfe_is_full_pass = False``: a residual flow's blocks); any other sampler costs ``NFE`` full network evaluations per image,
each counted as a third of a training step's FLOPs per image (forward + backward = 3 forwards), which
over-counts families whose step trains more than the sampling network (a GAN's discriminator, an
autoencoder's encoder). Hours are FLOPs over an H100's dense peak at a stated
utilisation; a time budget (``train.max_seconds``) counts as itself. Never a measurement.
"""
from __future__ import annotations

from typing import Any

import torch

from trilemma.contract.family import count_parameters
from trilemma.contract.registry import build_model
from trilemma.measure.flops import ASSUMED_MFU, H100_PEAK, count_flops, train_step_flops
from trilemma.run.data import data_shape


def run_estimate(run, flops: bool = True) -> dict[str, Any]:
    """Parameters and NFE; with ``flops``, FLOPs per training image and per sample, and the run's
    estimated H100 hours."""
    cfg = run.config
    shape = data_shape(cfg.data)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, shape, None, cfg.model_config)
    nfe = next(iter(model.samplers().values()))
    out = {"run": run.name, "params": count_parameters([model]), "nfe": nfe}
    if not flops:
        return out
    try:
        train = train_step_flops(model)
    except Exception as e:  # a family whose step cannot run on two random images: said, not hidden
        return out | {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    if model.capabilities.sampling == "autoregressive" or not model.nfe_is_full_pass:
        model.eval()
        with torch.no_grad():
            sample, sample_from = count_flops(lambda: model.sample(1)), "counted"
    else:
        sample, sample_from = nfe * train / 3, "nfe"
    tcfg, ecfg = cfg.train, cfg.eval
    rate = H100_PEAK["tf32" if tcfg.precision == "fp32" else tcfg.precision] * ASSUMED_MFU
    # A time budget is what it is; an image or FLOPs budget costs its FLOPs; whichever ends first.
    work = [f for f in (tcfg.max_flops, tcfg.max_images * train if tcfg.max_images else None) if f is not None]
    limits = ([min(work) / rate] if work else []) + ([tcfg.max_seconds] if tcfg.max_seconds is not None else [])
    train_s = min(limits)
    samples = (ecfg.fid_samples if ecfg.fid else 0) + ecfg.grid_images \
        + max(tcfg.eval_points - 1, 0) * ecfg.curve_fid_samples \
        + ecfg.sample_batch * (ecfg.sample_repeats + 1)
    sample_precision = "tf32" if ecfg.sample_precision == "fp32" else ecfg.sample_precision
    sample_rate = H100_PEAK[sample_precision] * ASSUMED_MFU
    eval_s = samples * sample / sample_rate
    return out | {"train_gflop_per_image": train / 1e9, "sample_gflop_per_image": sample / 1e9,
                  "sample_flops_from": sample_from,
                  "train_hours": train_s / 3600, "eval_hours": eval_s / 3600}


def suite_estimate(runs: list, flops: bool = True) -> list[dict[str, Any]]:
    return [run_estimate(run, flops) for run in runs]


def render_estimate(rows: list[dict[str, Any]]) -> str:
    """The table the dry run prints: parameters, and the GPU-hours labelled an estimate."""
    width = max([3, *(len(r["run"]) for r in rows)])
    if not any("train_hours" in r or "error" in r for r in rows):  # parameters only
        return "\n".join([f"{'run':<{width}} {'params':>11} {'NFE':>6}"]
                         + [f"{r['run']:<{width}} {r['params']:>11,} {r['nfe']:>6}" for r in rows]
                         + ["(add --estimate for the suite's GPU-hours estimated from FLOPs)"])
    lines = [f"ESTIMATE (not a measurement): H100 hours from FLOPs counted by torch.utils.flop_counter at "
             f"{ASSUMED_MFU:.0%} of the dense peak (TF32 for fp32); a time budget counts as itself;",
             "sampling = NFE x (train-step FLOPs / 3) per image, or * one sample counted (autoregressive, "
             "cached); NLL passes and FID features not counted.",
             f"{'run':<{width}} {'params':>11} {'NFE':>6} {'train GFLOP/img':>15} {'sample GFLOP/img':>16} "
             f"{'train h':>8} {'eval h':>8}"]
    total = 0.0
    for r in rows:
        if "error" in r:
            lines.append(f"{r['run']:<{width}} {r['params']:>11,} {r['nfe']:>6} "
                         f"(FLOPs not counted: {r['error']})")
            continue
        total += r["train_hours"] + r["eval_hours"]
        lines.append(f"{r['run']:<{width}} {r['params']:>11,} {r['nfe']:>6} "
                     f"{r['train_gflop_per_image']:>15.3f} "
                     f"{r['sample_gflop_per_image']:>15.3f}{'*' if r['sample_flops_from'] == 'counted' else ' '} "
                     f"{r['train_hours']:>8.3f} {r['eval_hours']:>8.3f}")
    lines.append(f"estimated total: {total:.1f} H100 hours")
    return "\n".join(lines)
