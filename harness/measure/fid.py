"""FID, KID and precision/recall through torch-fidelity, with cached reference features.

Protocol: the 2048-d pool3 features of torch-fidelity's ``inception-v3-compat`` (the TF-FID network,
images resized inside the extractor to 299x299), uint8 RGB inputs (one-channel data repeated to three).
Generated samples are compared against the first ``n_ref`` images of the dataset's *training* split.
Precision and recall (Kynkäänniemi et al. 2019, k = 3) are computed on the same Inception features as
FID and KID; torch-fidelity's own default computes them on VGG-16 features instead, so compare with
``feature_extractor="inception-v3-compat"``. The metric functions are torch-fidelity's own (``fid_statistics_to_metric``, ``kid_features_to_metric``,
``prc_features_to_metric``), so a number here equals what ``torch_fidelity.calculate_metrics`` reports
for the same two image sets (tested).

Reference features are cached under a key that names everything that changes them: dataset, split,
resolution, number of images, extractor, feature layer and the weights file's hash.
"""
from __future__ import annotations

import hashlib
import io
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from tqdm.auto import tqdm

from trilemma.contract.errors import TrilemmaError
from trilemma.contract.family import GenerativeModel
from trilemma.contract.likelihood import from_signed
from trilemma.results.io import atomic_write_bytes

EXTRACTOR = "inception-v3-compat"
FEATURE_LAYER = "2048"
DEFAULT_CACHE = Path("~/.cache/trilemma/fid").expanduser()


def weights_path(configured: Optional[str]) -> Optional[str]:
    """The suite's weights file, else ``$TRILEMMA_FID_WEIGHTS``, else None (torch-fidelity downloads).

    A local file is checked before torch-fidelity sees it: it must load as tensors only
    (``weights_only=True``, so it cannot run code) and hold the Inception state dict.
    """
    path = configured or os.environ.get("TRILEMMA_FID_WEIGHTS") or None
    if not path:
        return None
    file = Path(path).expanduser()
    if not file.is_file():
        raise TrilemmaError(f"FID weights file {path} does not exist (set by the suite's eval.fid_weights "
                            f"or TRILEMMA_FID_WEIGHTS)")
    _check_weights(str(file))
    return str(file)


_checked: dict[tuple, bool] = {}


def _check_weights(path: str) -> None:
    stat = os.stat(path)
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key in _checked:
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # garbage, truncated, or objects other than tensors (a pickle payload)
        raise TrilemmaError(f"FID weights file {path} is not a tensors-only state dict ({type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    if not (isinstance(state, dict) and state and all(torch.is_tensor(v) for v in state.values())
            and any("Conv2d_1a_3x3" in k for k in state)):
        raise TrilemmaError(f"FID weights file {path} is not the inception-v3-compat state dict")
    _checked[key] = True


_sha_cache: dict[str, str] = {}


def weights_id(path: Optional[str]) -> str:
    """Short sha256 of the weights file (or the name of the standard download)."""
    if path is None:
        return "pt_inception-2015-12-05"
    if path not in _sha_cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _sha_cache[path] = h.hexdigest()[:16]
    return _sha_cache[path]


class FeatureExtractor:
    """torch-fidelity's Inception on a device, fed uint8 batches; channels-last for CPU speed."""

    def __init__(self, weights: Optional[str], device: torch.device, batch_size: int = 25):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        try:
            net = FeatureExtractorInceptionV3(EXTRACTOR, [FEATURE_LAYER],
                                              feature_extractor_weights_path=weights)
        except Exception as e:  # a failed download or an unreadable file
            raise TrilemmaError(f"cannot load the FID Inception weights ({e.__class__.__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}); set TRILEMMA_FID_WEIGHTS "
                                f"to a local inception-v3-compat file") from None
        self.net = net.eval().to(device).to(memory_format=torch.channels_last)
        self.device = device
        self.batch_size = batch_size
        self.weights_id = weights_id(weights)

    def __call__(self, batches: Iterator[torch.Tensor], total: Optional[int] = None,
                 desc: str = "inception") -> torch.Tensor:
        """Features ``(N, 2048)`` (CPU, float32) of uint8 batches ``(B, C, H, W)``, C in (1, 3).

        With ``total`` (images), a progress bar shows the pass. Only the network runs in inference
        mode: ``batches`` may be a generator drawing samples, and a sampler may need autograd
        (Langevin dynamics).
        """
        out = []
        bar = tqdm(total=total, desc=desc, unit="img", leave=False, mininterval=1.0,
                   disable=total is None, dynamic_ncols=True)
        for batch in batches:
            bar.update(len(batch))
            for chunk in batch.split(self.batch_size):
                if chunk.dtype != torch.uint8:
                    raise TypeError(f"FID inputs must be uint8, got {chunk.dtype}")
                if chunk.shape[1] == 1:
                    chunk = chunk.expand(-1, 3, -1, -1)
                with torch.inference_mode():
                    out.append(self.net(chunk.to(self.device))[0].float().cpu())
        bar.close()
        return torch.cat(out)


def reference_key(dataset: str, split: str, resolution: int, n: int, weights: str) -> str:
    return f"{dataset}-{split}-{resolution}px-n{n}-{EXTRACTOR}-{FEATURE_LAYER}-{weights}"


def reference_features(extractor: FeatureExtractor, images: torch.Tensor, key: str,
                       cache_dir: Path = DEFAULT_CACHE) -> torch.Tensor:
    """Features of ``images`` (uint8), loaded from ``cache_dir/<key>.pt`` or computed and cached."""
    path = Path(cache_dir).expanduser() / f"{key}.pt"
    if path.exists():
        try:
            cached = torch.load(path, weights_only=True)
            if torch.is_tensor(cached) and cached.ndim == 2 and len(cached) == len(images) \
                    and torch.isfinite(cached).all():
                return cached
            problem = f"holds {type(cached).__name__} {tuple(getattr(cached, 'shape', ()))}"
        except Exception as e:  # a torn or foreign file: recompute rather than fail every run
            problem = f"{type(e).__name__}"
        aside = path.with_name(path.name + ".corrupt")
        path.replace(aside)
        print(f"  FID cache entry {path} was unreadable ({problem}): moved to {aside.name}, recomputing",
              file=sys.stderr)
    feats = extractor(iter(images.split(100)), total=len(images), desc=f"FID reference ({len(images)} images)")
    buffer = io.BytesIO()
    torch.save(feats, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return feats


def metrics_from_features(gen: torch.Tensor, ref: torch.Tensor, kid: bool = True,
                          prc: bool = True, seed: int = 2020) -> dict[str, float]:
    """FID, KID (mean, std) and precision/recall from features, by torch-fidelity's own functions."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    fid = fid_statistics_to_metric(fid_features_to_statistics(gen), fid_features_to_statistics(ref),
                                   verbose=False)["frechet_inception_distance"]
    out = {"fid": fid}
    if kid:
        size = min(1000, len(gen), len(ref))
        k = kid_features_to_metric(gen, ref, kid_subset_size=size, kid_subsets=100, rng_seed=seed,
                                   verbose=False)
        out |= {"kid_mean": k["kernel_inception_distance_mean"],
                "kid_std": k["kernel_inception_distance_std"], "kid_subset_size": size}
    if prc:
        p = prc_features_to_metric(gen, ref, verbose=False)  # generated first, real second
        out |= {"precision": p["precision"], "recall": p["recall"]}
    return out


def generated_batches(sample: Callable[[int], torch.Tensor], n: int, batch: int) -> Iterator[torch.Tensor]:
    """``n`` uint8 samples in batches of at most ``batch`` from ``sample(k) -> uint8 (k, C, H, W)``."""
    done = 0
    while done < n:
        k = min(batch, n - done)
        yield sample(k)
        done += k


@torch.no_grad()
def fid(model: GenerativeModel, extractor: FeatureExtractor, ref_features: torch.Tensor,
        reference: str, n: int, batch: int, kid: bool = True, prc: bool = True,
        sampler: Optional[str] = None, keep: int = 0) -> tuple[dict[str, Any], Optional[torch.Tensor]]:
    """FID@n (with KID and precision/recall) of ``n`` samples against cached reference features.

    Returns the measurement and the first ``keep`` samples (uint8) for a sample grid.
    """
    kept = []
    sampler = model.resolve_sampler(sampler)

    def draw(k: int) -> torch.Tensor:
        raw = model.sample(k, sampler=sampler)
        if not torch.isfinite(raw).all():
            raise FloatingPointError(f"{model.name}: non-finite samples from sampler {sampler!r}")
        images = from_signed(raw).cpu()
        if sum(len(x) for x in kept) < keep:
            kept.append(images)
        return images

    feats = extractor(generated_batches(draw, n, batch), total=n if n >= 200 else None,
                      desc=f"FID@{n} samples")
    values = metrics_from_features(feats, ref_features, kid=kid and n >= 2, prc=prc)
    protocol = {"n_gen": n, "n_ref": len(ref_features), "reference": reference,
                "extractor": EXTRACTOR, "feature_layer": FEATURE_LAYER,
                "weights": extractor.weights_id, "sampler": sampler, "split": "train"}
    grid = torch.cat(kept)[:keep] if kept else None
    return values | protocol, grid
