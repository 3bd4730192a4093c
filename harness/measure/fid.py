"""FID, KID and precision/recall of a model's samples, against cached reference features.

Protocol: the 2048-d pool3 features of torch-fidelity's ``inception-v3-compat`` (the TF-FID network,
images resized to 299x299 with TF1's bilinear rule), uint8 inputs (one-channel data repeated to three),
run by :mod:`trilemma.measure.inception` (the same network, folded and resized once: features equal to
torch-fidelity's to about 1e-6 relative). Generated samples are compared against the first ``n_ref``
images of the dataset's *training* split. FID and KID come from :mod:`trilemma.measure.stats` (torch-
fidelity's definitions, computed once and fast); precision and recall (Kynkäänniemi et al. 2019, k = 3)
are torch-fidelity's own function on the same Inception features (its default uses VGG-16 features
instead, so compare with ``feature_extractor="inception-v3-compat"``). A number here equals what
``torch_fidelity.calculate_metrics`` reports for the same two image sets (tested).

Every final FID carries percentile bootstrap intervals of FID, KID, precision and recall over the
generated samples (:func:`trilemma.measure.stats.bootstrap`, ``BOOTSTRAP_RESAMPLES`` draws of the
features already extracted: seconds, not a new sample).

Reference features and their statistics are cached under a key that names everything that changes
them: dataset, split, image shape (channels and resolution), number of images, a hash of the images'
bytes (so two image sets under one label, or one label under two data roots, never share features),
extractor, feature layer and the weights file's hash.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from tqdm.auto import tqdm

from trilemma.contract.errors import TrilemmaError
from trilemma.contract.family import GenerativeModel
from trilemma.contract.likelihood import from_signed
from trilemma.measure.inception import FastInception, cached_calibration, set_threads
from trilemma.measure.stats import bootstrap as bootstrap_intervals
from trilemma.measure.stats import (FID_INF_MIN_SAMPLES, SubsetFID, fid_infinity, fid_stats, frechet_distance,
                                    normal_intervals)
from trilemma.measure.stats import kid as kid_metric
from trilemma.measure.timing import CpuMeter, load_average, timed
from trilemma.results.io import atomic_write_bytes

EXTRACTOR = "inception-v3-compat"
FEATURE_LAYER = "2048"
DEFAULT_CACHE = Path("~/.cache/trilemma/fid").expanduser()
BOOTSTRAP_RESAMPLES = 50  # about 0.1 s each at n = 1000 on one CPU core
BOOTSTRAP_LEVEL = 0.95


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


WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
               "weights-inception-2015-12-05-6726825d.pth")  # torch-fidelity's download of the weights
_download_checked: dict[str, str] = {}


def check_download(timeout: float = 10.0) -> str:
    """Where torch-fidelity will get the weights when no file is given: its download, already in
    torch's hub cache or reachable now (a HEAD request); a TrilemmaError when neither, so a suite
    without weights stops at its preflight instead of failing each run."""
    url = WEIGHTS_URL
    cached = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if cached.is_file():
        return f"{cached} (torch-fidelity's download, cached)"
    if url not in _download_checked:
        import urllib.request

        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
        except Exception as e:  # no network, a proxy, a moved release
            reason = getattr(e, "reason", None) or e
            raise TrilemmaError(f"FID weights: no file is set (eval.fid_weights or TRILEMMA_FID_WEIGHTS) and "
                                f"torch-fidelity's download {url} is unreachable ({reason}); set "
                                f"TRILEMMA_FID_WEIGHTS to a local inception-v3-compat file, or eval.fid: "
                                f"false and eval.curve_fid_samples: 0") from None
        _download_checked[url] = f"{url} (to be downloaded into {cached.parent})"
    return _download_checked[url]


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


def _calibrated(attribute: str, doc: str) -> property:
    """A setting of :class:`FeatureExtractor` that reads as chosen by calibration (the first read
    calibrates unless it was given) and can be set."""
    def get(self) -> int:
        self._calibrate()
        return getattr(self, attribute)

    return property(get, lambda self, value: setattr(self, attribute, value), doc=doc)


class FeatureExtractor:
    """The FID Inception (:class:`~trilemma.measure.inception.FastInception`) on a device, fed uint8
    batches, with its thread count and batch chosen by timing on this machine unless given (once per
    machine, cached, and only when features are first computed)."""

    def __init__(self, weights: Optional[str], device: torch.device, batch_size: int = 0, threads: int = 0):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        try:
            reference = FeatureExtractorInceptionV3(EXTRACTOR, [FEATURE_LAYER],
                                                    feature_extractor_weights_path=weights)
        except Exception as e:  # a failed download or an unreadable file
            raise TrilemmaError(f"cannot load the FID Inception weights ({e.__class__.__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}); set TRILEMMA_FID_WEIGHTS "
                                f"to a local inception-v3-compat file") from None
        self.device = torch.device(device)
        self.net = FastInception(reference).to(self.device)
        self.weights_id = weights_id(weights)
        self.calibration = None
        self._batch, self._threads = batch_size, threads

    def _calibrate(self) -> None:
        """Choose the batch and threads the first time they are needed, that is when features are
        computed (cached references need none): this machine's cached choice, else timed now."""
        if self._batch <= 0:
            self.calibration = cached_calibration(self.net, self.device)
            self._batch = self.calibration["batch"]
            self._threads = self._threads or self.calibration["threads"]
        self._threads = self._threads or torch.get_num_threads()

    batch_size = _calibrated("_batch", "images per Inception pass")
    threads = _calibrated("_threads", "CPU threads of an Inception pass")

    def protocol(self, bf16: bool = False) -> dict[str, Any]:
        """How features were extracted (recorded with every FID)."""
        return {"network": "inception-v3-compat, batch norm folded, resized once", "batch": self.batch_size,
                "threads": self.threads, "precision": "bf16" if bf16 else "fp32", "device": str(self.device)}

    def __call__(self, batches: Iterator[torch.Tensor], total: Optional[int] = None,
                 desc: str = "inception", bf16: bool = False) -> torch.Tensor:
        """Features ``(N, 2048)`` (float32, on the extractor's device) of uint8 batches ``(B, C, H, W)``,
        C in (1, 3).

        With ``total`` (images), a progress bar shows a pass that has taken 2 s. Only the network runs in inference
        mode and with the chosen threads: ``batches`` may be a generator drawing samples, and a sampler
        may need autograd (Langevin dynamics) and its own threads.
        """
        out = []
        self.net.bf16 = bf16
        bar = tqdm(total=total, desc=desc, unit="img", leave=False, mininterval=1.0, delay=2.0,
                   disable=total is None, dynamic_ncols=True)
        for batch in batches:
            bar.update(len(batch))
            if batch.dtype != torch.uint8:
                raise TypeError(f"FID inputs must be uint8, got {batch.dtype}")
            before = set_threads(self.threads)
            try:
                with torch.inference_mode():
                    for chunk in batch.split(self.batch_size):
                        out.append(self.net(chunk.to(self.device)))
            finally:
                set_threads(before)
        bar.close()
        self.net.bf16 = False
        return torch.cat(out)


@dataclass
class Reference:
    """Reference features of a data set's split, their statistics, and the cache key naming them."""

    key: str
    features: torch.Tensor  # (n_ref, 2048) on the extractor's device
    stats: dict[str, torch.Tensor]  # mu, sigma (float64)


def content_hash(images: torch.Tensor) -> str:
    """Short sha256 of uint8 images' bytes and shape (50k CIFAR-10 images: about a third of a second)."""
    h = hashlib.sha256(str(tuple(images.shape)).encode())
    h.update(images.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def reference_key(dataset: str, split: str, images: torch.Tensor, weights: str) -> str:
    """The cache key of the reference ``images`` (uint8 ``(n, C, H, W)``)."""
    n, c, h, w = images.shape
    size = f"{h}px" if h == w else f"{h}x{w}px"
    return (f"{dataset}-{split}-{c}ch-{size}-n{n}-{content_hash(images)}-{EXTRACTOR}-{FEATURE_LAYER}-"
            f"{weights}")


def reference_features(extractor: FeatureExtractor, images: torch.Tensor, key: str,
                       cache_dir: Path = DEFAULT_CACHE) -> torch.Tensor:
    """Features of ``images`` (uint8), loaded from ``cache_dir/<key>.pt`` or computed and cached."""
    path = Path(cache_dir).expanduser() / f"{key}.pt"
    cached = _load_cached(path, lambda t: torch.is_tensor(t) and t.ndim == 2 and len(t) == len(images)
                          and bool(torch.isfinite(t).all()))
    if cached is not None:
        return cached.to(extractor.device)
    feats = extractor(iter(images.split(100)), total=len(images), desc=f"FID reference ({len(images)} images)")
    _save_cached(path, feats.cpu())
    return feats


def reference(extractor: FeatureExtractor, images: torch.Tensor, key: str,
              cache_dir: Path = DEFAULT_CACHE) -> Reference:
    """The reference of ``images``: features and their statistics, both cached under ``key``."""
    feats = reference_features(extractor, images, key, cache_dir)
    path = Path(cache_dir).expanduser() / f"{key}-stats.pt"
    stats = _load_cached(path, lambda s: isinstance(s, dict) and set(s) == {"mu", "sigma"}
                         and s["sigma"].shape == (feats.shape[1], feats.shape[1]))
    if stats is None:
        stats = fid_stats(feats)
        _save_cached(path, {k: v.cpu() for k, v in stats.items()})
    return Reference(key, feats, {k: v.to(extractor.device) for k, v in stats.items()})


def real_data(extractor: FeatureExtractor, ref: Reference, images: torch.Tensor, dataset: str,
              cache_dir: Path = DEFAULT_CACHE, bootstrap: int = BOOTSTRAP_RESAMPLES) -> dict[str, Any]:
    """The floor of a FID@n: ``n`` real test images (uint8) scored against the same reference, by the
    same metrics and intervals as a model's samples; their features and the figures (seeded: the same
    on every call) cached like the reference's, so each run's worker process reads them."""
    key = reference_key(dataset, "test", images, extractor.weights_id)
    path = Path(cache_dir).expanduser() / f"{key}-vs-{ref.key}-b{bootstrap}.json"
    if path.exists():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            path.unlink(missing_ok=True)  # a torn entry: computed again
    feats = reference_features(extractor, images, key, cache_dir)
    values = metrics_from_features(feats, ref.features, kid=len(images) >= 2, prc=True, ref_stats=ref.stats,
                                   bootstrap=bootstrap)
    values |= {"fid_samples": len(images), "n_ref": len(ref.features), "reference": ref.key, "split": "test",
               "images": key}
    atomic_write_bytes(path, json.dumps(values).encode())
    return values


def _load_cached(path: Path, valid: Callable[[Any], bool]) -> Any:
    """A cache entry, or None; an unreadable or invalid one is moved aside (and recomputed)."""
    if not path.exists():
        return None
    try:
        value = torch.load(path, weights_only=True)
        if valid(value):
            return value
        problem = f"holds {type(value).__name__} {tuple(getattr(value, 'shape', ()))}"
    except Exception as e:  # a torn or foreign file: recompute rather than fail every run
        problem = f"{type(e).__name__}"
    aside = path.with_name(path.name + ".corrupt")
    path.replace(aside)
    print(f"  FID cache entry {path} was unreadable ({problem}): moved to {aside.name}, recomputing",
          file=sys.stderr)
    return None


def _save_cached(path: Path, value: Any) -> None:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def metrics_from_features(gen: torch.Tensor, ref: torch.Tensor, kid: bool = True, prc: bool = True,
                          seed: int = 2020, ref_stats: Optional[dict] = None,
                          bootstrap: int = 0) -> dict[str, float]:
    """FID, KID (mean, std) and precision/recall from features (:mod:`trilemma.measure.stats`, and
    torch-fidelity's own precision/recall), with ``ref_stats`` reused when given; with ``bootstrap``
    resamples, their intervals under ``"bootstrap"``, and from ``FID_INF_MIN_SAMPLES`` samples on
    the extrapolated FID∞ (:func:`trilemma.measure.stats.fid_infinity`) beside FID@n."""
    from torch_fidelity.metric_prc import prc_features_to_metric

    ref_stats = ref_stats if ref_stats is not None else fid_stats(ref)
    out: dict[str, Any] = {"fid": frechet_distance(gen, ref_stats)}
    if kid:
        out |= kid_metric(gen, ref, subset_size=min(1000, len(gen), len(ref)), seed=seed)
    if prc:
        p = prc_features_to_metric(gen.float().cpu(), ref.float().cpu(), verbose=False)  # generated first
        out |= {"precision": p["precision"], "recall": p["recall"]}
    subset_fid = SubsetFID(gen.double().to(ref_stats["mu"].device), ref_stats) if bootstrap else None
    if bootstrap and len(gen) >= FID_INF_MIN_SAMPLES:
        out |= fid_infinity(gen, ref_stats, seed=seed, subset_fid=subset_fid)
    if bootstrap and len(gen) >= 2:
        boot = bootstrap_intervals(gen, ref, ref_stats, bootstrap, BOOTSTRAP_LEVEL, seed, kid=kid, prc=prc,
                                   subset_fid=subset_fid)
        estimates = {"fid": out["fid"], "kid": out.get("kid_mean"), "precision": out.get("precision"),
                     "recall": out.get("recall")}
        out["bootstrap"] = normal_intervals(estimates, boot)
    return out


def generated_batches(sample: Callable[[int], torch.Tensor], n: int, batch: int) -> Iterator[torch.Tensor]:
    """``n`` uint8 samples in batches of at most ``batch`` from ``sample(k) -> uint8 (k, C, H, W)``."""
    done = 0
    while done < n:
        k = min(batch, n - done)
        yield sample(k)
        done += k


@torch.no_grad()
def fid(model: GenerativeModel, extractor: FeatureExtractor, ref: Reference, n: int, batch: int,
        kid: bool = True, prc: bool = True, sampler: Optional[str] = None, keep: int = 0,
        bf16: bool = False,
        bootstrap: int = BOOTSTRAP_RESAMPLES) -> tuple[dict[str, Any], Optional[torch.Tensor]]:
    """FID@n (with KID and precision/recall) of ``n`` samples against a reference.

    Returns the measurement and the first ``keep`` samples (uint8) for a sample grid. The measurement
    also says where its time went (``seconds``: sampling, features, metrics) and times each sampling
    batch with the device synchronized (``batch_seconds``), so the batches of a FID can serve as the
    sample-speed measurement of the same sampler at the same batch.
    """
    kept, batch_seconds = [], []
    sampler = model.resolve_sampler(sampler)

    meter = CpuMeter()  # the CPU share of the timed sampling batches alone

    def draw(k: int) -> torch.Tensor:
        seconds, raw = meter.measure(lambda: timed(lambda: model.sample(k, sampler=sampler), model.device))
        if k == batch:
            batch_seconds.append(seconds)
        if not torch.isfinite(raw).all():
            raise FloatingPointError(f"{model.name}: non-finite samples from sampler {sampler!r}")
        images = from_signed(raw).cpu()
        if sum(len(x) for x in kept) < keep:
            kept.append(images)
        return images

    load_before = load_average()
    t0 = time.perf_counter()
    feats = extractor(generated_batches(draw, n, batch), total=n, desc=f"FID@{n} samples", bf16=bf16)
    t1 = time.perf_counter()
    values = metrics_from_features(feats, ref.features, kid=kid and n >= 2, prc=prc, ref_stats=ref.stats,
                                   bootstrap=bootstrap)
    t2 = time.perf_counter()
    sampling = sum(batch_seconds)
    protocol = {"fid_samples": n, "n_ref": len(ref.features), "reference": ref.key,
                "extractor": EXTRACTOR, "feature_layer": FEATURE_LAYER, "weights": extractor.weights_id,
                "sampler": sampler, "split": "train", "features": extractor.protocol(bf16),
                "batch_seconds": batch_seconds, "sample_batch": batch, "load_before": load_before,
                "load_after": load_average(), **meter.share(model.device),
                "seconds": {"sampling": sampling, "features": t1 - t0 - sampling, "metrics": t2 - t1}}
    grid = torch.cat(kept)[:keep] if kept else None
    return values | protocol, grid
