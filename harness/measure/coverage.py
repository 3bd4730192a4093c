"""Mode coverage, read by a reference MNIST classifier: class coverage on MNIST, modes on Stacked MNIST.

The classifier is trained by the harness itself on MNIST's training split (a small strided CNN, fixed
seed, fixed data order, deterministic algorithms, one CPU thread: about two minutes here) and cached as
safetensors under a key naming everything its weights depend on (architecture, training settings, a
hash of the training images and labels, torch version). Its test accuracy is measured on every load,
recorded with every measurement, and must reach ``MIN_ACCURACY``.

Stacked MNIST follows the protocol of the mode-collapse literature (Metz et al. 2017, Unrolled GANs;
Srivastava et al. 2017, VEEGAN; Lin et al. 2018, PacGAN, whose code is the published reference): each
channel of a sample is classified separately by argmax, no confidence threshold; the sample's mode is
``100 d0 + 10 d1 + d2``; *modes* counts the modes that receive at least one sample; *KL* is
``KL(p || uniform over 1000) = sum_k p_k log(1000 p_k)`` (natural log, 0 log 0 = 0) of the samples' mode
histogram ``p``. VEEGAN and PacGAN's Table 2 use 26,000 samples, Metz et al. and PacGAN's Table 3
25,600. Both statistics depend on n: a perfect sampler of 1,000 equal modes covers on average
``1000 (1 - (1 - 1/1000)^n)`` of them (926 at n = 2,600) and its KL is about ``999 / (2n)`` (0.019 at
26,000, 0.19 at 2,600), so a result is read against the real data at the same n (Stacked MNIST's test
images, by the reference classifier: 1,000 modes and KL 0.026 at 26,000; 929 and 0.217 at 2,600).

Every statistic carries a bootstrap interval over the samples, as FID's does: ``BOOTSTRAP_RESAMPLES``
resamples with replacement, ``estimate ± 1.96 sd`` (:func:`trilemma.measure.stats.normal_intervals`),
the resamples' percentiles and mean kept to show their bias (a resample holds about 63 % distinct
samples, so it covers fewer modes).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trilemma.contract.errors import TrilemmaError
from trilemma.contract.likelihood import from_signed, to_signed
from trilemma.measure.stats import normal_intervals
from trilemma.results.io import atomic_write_bytes

DEFAULT_CACHE = Path("~/.cache/trilemma/classifier").expanduser()
ARCHITECTURE = "cnn-s2-32-64-fc128"  # MnistClassifier; part of the cache key
MIN_ACCURACY = 0.99  # the reference classifier's required MNIST test accuracy
CONFIDENCE = 0.9  # class coverage: a sample is "a digit" when its top class has this probability
CLASSES = 10
STACKED_MODES = 1000
LITERATURE_SAMPLES = 26_000  # VEEGAN, PacGAN Table 2 (Metz et al. and PacGAN Table 3: 25,600)
BOOTSTRAP_RESAMPLES = 50
BOOTSTRAP_LEVEL = 0.95
BATCH = 1000  # images per classifier forward pass

# Result keys (the bootstrap block adds ``<key>_sd``, ``<key>_ci``, ``<key>_percentile``, ``<key>_mean``).
CLASS_KEYS = ("class_confident_fraction", "classes_hit", "classes_hit_confident", "class_kl")
STACKED_KEYS = ("modes", "modes_kl", "modes_confident_fraction")


@dataclass(frozen=True)
class ClassifierSettings:
    """How the reference classifier is trained; every field is part of its cache key."""

    epochs: int = 5  # passes over MNIST's 60,000 training images (99.2 % test accuracy here)
    batch_size: int = 128  # the last partial batch of an epoch is dropped
    lr: float = 2e-3  # Adam's peak learning rate, one-cycle schedule (15 % warm-up, cosine decay)
    seed: int = 0  # initialization and data order
    threads: int = 1  # CPU threads while training: fixed, so the float reductions are too

    def tag(self) -> str:
        return f"e{self.epochs}-b{self.batch_size}-lr{self.lr:g}-s{self.seed}-t{self.threads}"


class MnistClassifier(nn.Module):
    """A small CNN on (B, 1, 28, 28) inputs in [-1, 1]: two strided convolutions and two linear layers
    (1.46 M multiply-adds an image, 0.42 M parameters); returns logits (B, 10)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 5, stride=2, padding=2)  # (B, 32, 14, 14)
        self.conv2 = nn.Conv2d(32, 64, 3, stride=2, padding=1)  # (B, 64, 7, 7)
        self.fc1 = nn.Linear(64 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc2(F.relu(self.fc1(h.flatten(1))))  # (B, 10)


@dataclass
class ReferenceClassifier:
    """The trained classifier, its cache key and its measured MNIST test accuracy."""

    net: nn.Module
    key: str
    test_accuracy: float
    train_seconds: Optional[float] = None  # None when loaded from the cache
    test_images: int = 0

    def protocol(self) -> dict[str, Any]:
        """What every coverage measurement records about the classifier."""
        return {"key": self.key, "architecture": ARCHITECTURE, "test_accuracy": self.test_accuracy,
                "test_images": self.test_images, "min_accuracy": MIN_ACCURACY,
                "trained_seconds": self.train_seconds, "cached": self.train_seconds is None}

    @torch.inference_mode()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities (n, 10) of one-channel images (n, 1, H, W): uint8, or float in [-1, 1]
        (quantized to 8 bits first, as the data set's images are); resized to 28x28 where needed."""
        x = _as_uint8(images)
        if x.shape[1] != 1:
            raise TrilemmaError(f"reference classifier: one-channel images expected, got shape {tuple(x.shape)}")
        device = next(self.net.parameters(), torch.empty(0)).device
        out = []
        for chunk in x.split(BATCH):
            chunk = _resize(chunk, 28)
            out.append(self.net(to_signed(chunk.to(device))).softmax(1).cpu())
        return torch.cat(out) if out else torch.zeros(0, CLASSES)


def _as_uint8(images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4:
        raise TrilemmaError(f"coverage: images must be (n, C, H, W), got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images
    if not torch.isfinite(images).all():
        raise TrilemmaError("coverage: the samples hold non-finite values")
    return from_signed(images)


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 images to size x size (antialiased bilinear, as the data sets' ``resolution``)."""
    if images.shape[-2:] == (size, size):
        return images
    y = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return y.round().clamp(0, 255).to(torch.uint8)


# --- the reference classifier: trained once, cached, checked on every load ---------------------------

def data_hash(images: torch.Tensor, labels: torch.Tensor) -> str:
    """Short sha256 of uint8 images and their labels (bytes and shapes)."""
    h = hashlib.sha256(f"{tuple(images.shape)}-{tuple(labels.shape)}".encode())
    h.update(images.contiguous().cpu().numpy().tobytes())
    h.update(labels.to(torch.int64).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def classifier_key(train_images: torch.Tensor, train_labels: torch.Tensor,
                   settings: ClassifierSettings = ClassifierSettings()) -> str:
    """The cache key: architecture, settings, training data (count and hash), torch version."""
    version = torch.__version__.split("+")[0]
    return (f"mnist-classifier-{ARCHITECTURE}-{settings.tag()}-n{len(train_images)}-"
            f"{data_hash(train_images, train_labels)}-torch{version}")


def _check_mnist(images: torch.Tensor, labels: torch.Tensor, split: str) -> None:
    if not (images.dtype == torch.uint8 and images.ndim == 4 and tuple(images.shape[1:]) == (1, 28, 28)):
        raise TrilemmaError(f"reference classifier: MNIST {split} images must be uint8 (N, 1, 28, 28), got "
                            f"{images.dtype} {tuple(images.shape)}")
    if labels.shape != (len(images),) or len(images) == 0 or labels.min() < 0 or labels.max() >= CLASSES:
        raise TrilemmaError(f"reference classifier: MNIST {split} labels must be {len(images)} digits 0-9")


def accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """The share of ``images`` (uint8) whose argmax class is their label."""
    net.eval()
    with torch.inference_mode():
        right = sum(int((net(to_signed(x)).argmax(1) == y).sum()) for x, y in zip(images.split(BATCH),
                                                                              labels.split(BATCH)))
    return right / len(images)


def check_accuracy(value: float, key: str, minimum: float = MIN_ACCURACY) -> None:
    """A TrilemmaError when the classifier's test accuracy is below ``minimum``."""
    if not value >= minimum:
        raise TrilemmaError(f"reference classifier {key}: MNIST test accuracy {value:.2%} is below the required "
                            f"{minimum:.0%}; delete it from the cache or change its settings")


def train_classifier(images: torch.Tensor, labels: torch.Tensor,
                     settings: ClassifierSettings = ClassifierSettings()) -> MnistClassifier:
    """Train :class:`MnistClassifier` on uint8 images (N, 1, 28, 28), on the CPU, deterministically:
    initialization and each epoch's order come from ``settings.seed``, algorithms are deterministic and
    the thread count is fixed; the caller's RNG, thread count and determinism flag are left as found."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(settings.threads)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            net = MnistClassifier()
        order = torch.Generator().manual_seed(settings.seed)
        per_epoch = len(images) // settings.batch_size
        if per_epoch < 1:
            raise TrilemmaError(f"reference classifier: {len(images)} training images, fewer than one batch "
                                f"of {settings.batch_size}")
        opt = torch.optim.Adam(net.parameters(), lr=settings.lr)
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.lr, pct_start=0.15,
                                                       total_steps=settings.epochs * per_epoch)
        net.train()
        for _ in range(settings.epochs):
            perm = torch.randperm(len(images), generator=order)
            for i in range(per_epoch):
                index = perm[i * settings.batch_size:(i + 1) * settings.batch_size]
                loss = F.cross_entropy(net(to_signed(images[index])), labels[index])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                schedule.step()
        net.eval()
        return net
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def reference_classifier(train_images: torch.Tensor, train_labels: torch.Tensor, test_images: torch.Tensor,
                         test_labels: torch.Tensor, cache_dir: Path = DEFAULT_CACHE,
                         settings: ClassifierSettings = ClassifierSettings(),
                         min_accuracy: float = MIN_ACCURACY, device: str | torch.device = "cpu",
                         log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> ReferenceClassifier:
    """The reference classifier of MNIST's splits (uint8 (N, 1, 28, 28), labels 0-9): loaded from
    ``cache_dir/<key>.safetensors``, else trained and cached (atomically); an unreadable or foreign
    cache file is moved aside and the classifier retrained. Its accuracy on ``test_images`` is measured
    on every call and must reach ``min_accuracy`` (a one-line TrilemmaError otherwise)."""
    _check_mnist(train_images, train_labels, "train")
    _check_mnist(test_images, test_labels, "test")
    key = classifier_key(train_images, train_labels, settings)
    path = Path(cache_dir).expanduser() / f"{key}.safetensors"
    net, seconds = _load(path, key, log), None
    if net is None:
        log(f"  training the reference MNIST classifier ({settings.epochs} epochs on {len(train_images):,} "
            f"images, one CPU thread; cached as {path.name})")
        t0 = time.perf_counter()
        try:
            net = train_classifier(train_images, train_labels, settings)
        except TrilemmaError:
            raise
        except Exception as e:  # out of memory, a broken torch build
            raise TrilemmaError(f"reference classifier {key}: training failed ({type(e).__name__}: "
                                f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
        seconds = time.perf_counter() - t0
    test_accuracy = accuracy(net, test_images, test_labels)  # on the CPU, before any move
    check_accuracy(test_accuracy, key, min_accuracy)
    if seconds is not None:
        _save(path, net, key, settings, test_accuracy, seconds)
    return ReferenceClassifier(net.to(device).eval(), key, test_accuracy, seconds, len(test_images))


def _load(path: Path, key: str, log: Callable[[str], None]) -> Optional[MnistClassifier]:
    """The cached classifier, or None; an unreadable or foreign file is moved aside."""
    if not path.exists():
        return None
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("key") != key:
            raise ValueError(f"its metadata names {meta.get('key')!r}")
        net = MnistClassifier()
        net.load_state_dict(load_file(str(path)))  # strict: every tensor, the right shapes
        if not all(torch.isfinite(p).all() for p in net.parameters()):
            raise ValueError("non-finite weights")
        return net.eval()
    except Exception as e:  # torn, foreign or tampered: retrain rather than fail every run
        problem = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    aside = path.with_name(path.name + ".corrupt")
    path.replace(aside)
    log(f"  classifier cache entry {path} was unreadable ({problem}): moved to {aside.name}, retraining")
    return None


def _save(path: Path, net: nn.Module, key: str, settings: ClassifierSettings, test_accuracy: float,
          seconds: float) -> None:
    from safetensors.torch import save

    meta = {"key": key, "architecture": ARCHITECTURE, "settings": json.dumps(dataclasses.asdict(settings)),
            "test_accuracy": repr(test_accuracy), "train_seconds": f"{seconds:.1f}", "torch": torch.__version__}
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    atomic_write_bytes(path, save(state, metadata=meta))


# --- the statistics and their bootstrap intervals ------------------------------------------------------

def kl_from_uniform(counts: torch.Tensor) -> float:
    """``KL(p || uniform) = sum_k p_k log(K p_k)`` (nats) of a histogram of K bins, 0 log 0 = 0."""
    counts = counts.double()
    p = counts[counts > 0] / counts.sum()
    return float((p * (p * len(counts)).log()).sum())


def _bootstrap(statistics: Callable[[torch.Tensor], dict[str, float]], n: int, resamples: int, seed: int,
               estimates: dict[str, float]) -> dict[str, Any]:
    """The statistics of ``resamples`` draws of n of the n samples with replacement (drawn as
    :func:`trilemma.measure.stats.bootstrap` draws them), with normal intervals around ``estimates``."""
    rng = np.random.RandomState(seed)
    draws = [statistics(torch.from_numpy(rng.randint(0, n, n))) for _ in range(resamples)]
    boot: dict[str, Any] = {"resamples": resamples, "level": BOOTSTRAP_LEVEL,
                            "method": "percentile bootstrap over the generated samples"}
    alpha = (1 - BOOTSTRAP_LEVEL) / 2
    for name in estimates:
        values = np.array([draw[name] for draw in draws])
        boot[f"{name}_percentile"] = [float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))]
        boot[f"{name}_sd"], boot[f"{name}_mean"] = float(values.std(ddof=1)), float(values.mean())
    return normal_intervals(estimates, boot)


def class_statistics(probs: torch.Tensor, confidence: float = CONFIDENCE) -> dict[str, float]:
    """Class coverage of samples' class probabilities (n, 10): the share whose top class has at least
    ``confidence``; the classes that are some sample's argmax (all samples, and confident ones only); the
    KL from uniform of the histogram of every sample's argmax class."""
    top, pred = probs.max(1)
    sure = top >= confidence
    return {"class_confident_fraction": float(sure.double().mean()),
            "classes_hit": int(pred.unique().numel()), "classes_hit_confident": int(pred[sure].unique().numel()),
            "class_kl": kl_from_uniform(torch.bincount(pred, minlength=CLASSES))}


def mode_statistics(modes: torch.Tensor, bins: int = STACKED_MODES) -> dict[str, float]:
    """Modes covered (at least one sample) and KL(histogram || uniform over ``bins``) of mode labels."""
    counts = torch.bincount(modes, minlength=bins)
    return {"modes": int((counts > 0).sum()), "modes_kl": kl_from_uniform(counts)}


def class_coverage(samples: torch.Tensor, classifier: ReferenceClassifier, bootstrap: int = BOOTSTRAP_RESAMPLES,
                   confidence: float = CONFIDENCE, seed: int = 0) -> dict[str, Any]:
    """Class coverage of one-channel samples (n, 1, H, W), uint8 or float in [-1, 1]: the statistics of
    :func:`class_statistics` with bootstrap intervals, the protocol and the classifier's record."""
    probs = classifier.probabilities(samples).double()  # (n, 10)
    n = len(probs)
    if n < 2:
        raise TrilemmaError(f"class coverage needs at least 2 samples, got {n}")
    out: dict[str, Any] = class_statistics(probs, confidence)
    if bootstrap:
        out["bootstrap"] = _bootstrap(lambda idx: class_statistics(probs[idx], confidence), n, bootstrap, seed,
                                      {k: out[k] for k in CLASS_KEYS})
    return out | {"n": n, "confidence": confidence, "classifier": classifier.protocol(),
                  "protocol": f"argmax class of each sample by the reference MNIST classifier; confident: top "
                              f"class probability >= {confidence}; KL (nats) of the argmax histogram from "
                              f"uniform over {CLASSES}"}


def stacked_predictions(samples: torch.Tensor, classifier: ReferenceClassifier,
                        confidence: float = CONFIDENCE) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's mode ``100 d0 + 10 d1 + d2`` (n,), its channels' argmax digits, and whether all
    three digits were classified with at least ``confidence`` (n,), of samples (n, 3, H, W)."""
    x = _as_uint8(samples)
    n, c = x.shape[:2]
    if c != 3:
        raise TrilemmaError(f"Stacked MNIST modes need three-channel samples, got shape {tuple(x.shape)}")
    probs = classifier.probabilities(x.reshape(n * 3, 1, *x.shape[2:])).view(n, 3, CLASSES)
    top, digits = probs.max(2)  # (n, 3) each
    return (digits * torch.tensor([100, 10, 1])).sum(1), (top >= confidence).all(1)


def uniform_modes(n: int) -> float:
    """Modes a sampler drawing the 1,000 Stacked MNIST modes uniformly covers with ``n`` samples, in expectation."""
    return STACKED_MODES * (1 - (1 - 1 / STACKED_MODES) ** n)


def stacked_modes(samples: torch.Tensor, classifier: ReferenceClassifier, bootstrap: int = BOOTSTRAP_RESAMPLES,
                  confidence: float = CONFIDENCE, seed: int = 0) -> dict[str, Any]:
    """Modes covered of 1,000 and KL to uniform of three-channel Stacked MNIST samples (n, 3, H, W),
    uint8 or float in [-1, 1], by the literature's protocol (module docstring), with bootstrap intervals.
    ``modes_confident_fraction`` (not in the literature) is the share of samples whose three digits are
    all classified with at least ``confidence``."""
    modes, sure = stacked_predictions(samples, classifier, confidence)
    n = len(modes)
    if n < 2:
        raise TrilemmaError(f"Stacked MNIST modes need at least 2 samples, got {n}")
    sure = sure.double()

    def statistics(idx: torch.Tensor) -> dict[str, float]:
        return mode_statistics(modes[idx]) | {"modes_confident_fraction": float(sure[idx].mean())}

    out: dict[str, Any] = statistics(torch.arange(n))
    if bootstrap:
        out["bootstrap"] = _bootstrap(statistics, n, bootstrap, seed, {k: out[k] for k in STACKED_KEYS})
    expected = uniform_modes(n)
    return out | {"n": n, "confidence": confidence, "modes_uniform_expected": expected,
                  "classifier": classifier.protocol(),
                  "protocol": f"each channel's argmax digit by the reference MNIST classifier, mode = 100 d0 + "
                              f"10 d1 + d2; modes: those with at least one of the {n} samples; KL (nats) of "
                              f"the mode histogram from uniform over {STACKED_MODES} (Metz et al. 2017, "
                              f"VEEGAN, PacGAN)"}
