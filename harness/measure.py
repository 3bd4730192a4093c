"""Measurements of a trained model, each returned with the protocol that produced it."""
from __future__ import annotations

import resource
import statistics
import time
from typing import Any, Optional

import torch

from harness import fid as fidlib
from harness.likelihood import bits_per_dim, from_signed
from harness.model import GenerativeModel, count_parameters
from harness.train import synchronize

PRECISION = "fp32"


def parameters(model: GenerativeModel) -> dict[str, int]:
    return {"total": count_parameters([model]), "sampling": count_parameters(model.sampling_modules())}


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak memory since the last reset: CUDA allocator peak, or the process's max RSS on a CPU."""
    if device.type == "cuda":
        return {"peak_bytes": torch.cuda.max_memory_allocated(device), "kind": "cuda_max_allocated"}
    # ru_maxrss is in KiB on Linux; it is the whole process's high-water mark (data and Inception too).
    return {"peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "kind": "process_max_rss"}


@torch.no_grad()
def sample_speed(model: GenerativeModel, batch: int, repeats: int, seconds_cap: float,
                 sampler: Optional[str] = None) -> dict[str, Any]:
    """Images/s of ``sample(batch)``: one untimed warm-up call, then the median of timed repeats.

    When one call takes longer than ``seconds_cap`` the remaining repeats are skipped (recorded).
    """
    device = model.device
    model.eval()
    synchronize(device)
    t0 = time.perf_counter()
    model.sample(batch, sampler=sampler)  # warm-up: allocations, kernels, caches
    synchronize(device)
    warmup = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        model.sample(batch, sampler=sampler)
        synchronize(device)
        times.append(time.perf_counter() - t0)
        if times[-1] > seconds_cap:
            break
    median = statistics.median(times)
    return {"images_per_second": batch / median, "seconds_per_batch": median, "seconds": times,
            "warmup_seconds": warmup, "batch_size": batch, "repeats": len(times),
            "nfe_per_sample": model.samplers()[sampler or next(iter(model.samplers()))],
            "precision": PRECISION, "device": str(device)}


def sample_uint8(model: GenerativeModel, n: int, sampler: Optional[str] = None) -> torch.Tensor:
    return from_signed(model.sample(n, sampler=sampler)).cpu()


@torch.no_grad()
def fid(model: GenerativeModel, extractor: fidlib.FeatureExtractor, ref_features: torch.Tensor,
        reference: str, n: int, batch: int, kid: bool = True, prc: bool = True,
        sampler: Optional[str] = None, keep: int = 0) -> tuple[dict[str, Any], Optional[torch.Tensor]]:
    """FID@n (with KID and precision/recall) of ``n`` samples against cached reference features.

    Returns the measurement and the first ``keep`` samples (uint8) for a sample grid.
    """
    kept = []

    def draw(k: int) -> torch.Tensor:
        images = sample_uint8(model, k, sampler)
        if sum(len(x) for x in kept) < keep:
            kept.append(images)
        return images

    feats = extractor(fidlib.generated_batches(draw, n, batch), total=n if n >= 200 else None,
                      desc=f"FID@{n} samples")
    values = fidlib.metrics_from_features(feats, ref_features, kid=kid and n >= 2, prc=prc)
    protocol = {"n_gen": n, "n_ref": len(ref_features), "reference": reference,
                "extractor": fidlib.EXTRACTOR, "feature_layer": fidlib.FEATURE_LAYER,
                "weights": extractor.weights_id, "sampler": sampler or next(iter(model.samplers())),
                "split": "train"}
    grid = torch.cat(kept)[:keep] if kept else None
    return values | protocol, grid


@torch.no_grad()
def nll(model: GenerativeModel, images: torch.Tensor, batch: int) -> dict[str, Any]:
    """Mean NLL in bits/dim over ``images`` (uint8, test split), marked as a bound when it is one."""
    model.eval()
    total, count = 0.0, 0
    device = model.device
    for chunk in images.split(batch):
        values = model.nll(chunk.to(device))  # (B,) nats per image
        if not torch.isfinite(values).all():
            raise FloatingPointError(f"{model.name}: non-finite NLL on the test split")
        total += float(values.double().sum())
        count += len(chunk)
    return {"bpd": float(bits_per_dim(total / count, model.num_dims)),
            "nats_per_image": total / count, "bound": model.capabilities.density == "bound",
            "split": "test", "n_images": count, "protocol": model.nll_protocol()}
