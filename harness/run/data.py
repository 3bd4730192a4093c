"""Datasets as uint8 tensors ``(N, C, H, W)``, and a resumable batch stream held on the device.

Sources (``DataConfig.name``):
    mnist      torchvision's MNIST under the data root (its own download and md5 checks where online)
    cifar10    torchvision's CIFAR-10 under the data root (likewise)
    npz        a folder with ``train.npz`` and ``test.npz``: key ``images`` uint8 (N, H, W, C) and an
               optional ``labels`` (N,); any image data set, e.g. the CIFAR-10 subset of this workplace
    synthetic  small procedurally drawn images (bright rectangles on noise) for tests; no files
    stacked_mnist  Stacked MNIST (3x28x28, 1,000 modes), three MNIST digits as colour channels, built
               deterministically from the MNIST files (see ``_stacked_mnist``)

Data sets of this size fit in memory: the training split is moved to the training device once as
uint8 (4 bytes per RGB pixel), and batches are indexed there, as in airbench.

A run names its data by content, not by path (:func:`data_inputs`): per split, a hash of the files it
is read from, computed once per version of a file and cached in ``~/.cache/trilemma/data-hashes.json``
(keyed by path, size and modification time). A changed file makes a finished run stale; the same files
under another data root do not.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F

from trilemma.contract.errors import TrilemmaError
from trilemma.contract.typed import SAFE_NAME, is_safe_name, require
from trilemma.results.io import atomic_write_json

DEFAULT_ROOT = Path("~/.cache/trilemma/data").expanduser()
HASH_CACHE = Path("~/.cache/trilemma/data-hashes.json").expanduser()  # "path|size|mtime_ns" -> sha256
SPLITS = ("train", "test")
SOURCES = ("mnist", "cifar10", "npz", "synthetic", "stacked_mnist")

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CIFAR10_FILES = ("cifar-10-batches-py/data_batch_1..5", "cifar-10-batches-py/test_batch")


@dataclass
class DataConfig:
    name: Literal["mnist", "cifar10", "npz", "synthetic", "stacked_mnist"] = "mnist"  # one of SOURCES
    root: Optional[str] = None  # data root; default: $TRILEMMA_DATA, else ~/.cache/trilemma/data
    path: Optional[str] = None  # npz only: folder holding train.npz/test.npz (relative paths: under root)
    label: Optional[str] = None  # name used in run names and reports; default: name, or the npz folder's
    resolution: Optional[int] = None  # resize to resolution x resolution (area/bilinear); None: native
    download: bool = True  # let torchvision download (with its checksum checks) when files are absent
    synthetic_channels: int = 1  # synthetic only: channels
    synthetic_size: int = 16  # synthetic only: height = width
    synthetic_train: int = 512  # synthetic only: training images
    synthetic_test: int = 128  # synthetic only: test images

    def __post_init__(self):
        require(self.label is None or is_safe_name(self.label), "label", SAFE_NAME, self.label)
        require(self.resolution is None or 4 <= self.resolution <= 4096, "resolution",
                "null or an integer from 4 to 4096", self.resolution)
        require(self.synthetic_channels in (1, 3), "synthetic_channels", "1 or 3", self.synthetic_channels)
        require(4 <= self.synthetic_size <= 1024, "synthetic_size", "from 4 to 1024", self.synthetic_size)
        require(self.synthetic_train >= 1, "synthetic_train", "at least 1", self.synthetic_train)
        require(self.synthetic_test >= 1, "synthetic_test", "at least 1", self.synthetic_test)
        if self.name == "npz":
            require(bool(self.path), "path", "the folder holding train.npz and test.npz (npz data sets)",
                    self.path)
            require(is_safe_name(dataset_label(self)), "label",
                    f"{SAFE_NAME} (the npz folder's name is the default label; give one)", dataset_label(self))


NATIVE_SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32), "stacked_mnist": (3, 28, 28)}


def data_shape(cfg: DataConfig) -> tuple[int, int, int]:
    """``(C, H, W)`` of a data set's images, without loading it where the source fixes it."""
    if cfg.name == "synthetic":
        c, h = cfg.synthetic_channels, cfg.synthetic_size
    elif cfg.name in NATIVE_SHAPES:
        c, h, _ = NATIVE_SHAPES[cfg.name]
    else:  # npz: read the training split's shape
        c, h = load_labeled(cfg, "train")[0].shape[1:3]
    h = cfg.resolution or h
    return int(c), int(h), int(h)


def dataset_label(cfg: DataConfig) -> str:
    if cfg.label:
        return cfg.label
    if cfg.name == "npz" and cfg.path:
        return Path(cfg.path).name
    return cfg.name


def data_root(cfg: DataConfig) -> Path:
    """The suite's root, else ``$TRILEMMA_DATA``, else the user's cache."""
    root = cfg.root or os.environ.get("TRILEMMA_DATA") or DEFAULT_ROOT
    return Path(root).expanduser()


# --- the data's identity: a hash of its files' contents ---------------------------------------------

def data_inputs(cfg: DataConfig, stored: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """What a run's hashed config records of its data: ``{"data": {split: content hash}}``.

    Legacy rule: results written before the data was named by content recorded ``{"data_root": the
    resolved root}`` instead. Compared with such a stored ``inputs`` (a "data_root", no "data"), this
    returns that form, computed with the current data root, so a finished result whose root is where it
    was stays done (its data's contents were never recorded; a run with a new result records them)."""
    if isinstance(stored, dict) and "data_root" in stored and "data" not in stored:
        return {"data_root": None if cfg.name == "synthetic" else str(data_root(cfg).resolve())}
    return {"data": data_identity(cfg)}


def data_identity(cfg: DataConfig) -> Optional[dict[str, str]]:
    """Per split, a hash of the contents of the files it is read from; None for synthetic data (drawn
    from its settings alone). A missing file is named instead ("missing: <path>"), so the identity
    changes when it appears (torchvision downloads it)."""
    if cfg.name == "synthetic":
        return None
    return {split: _files_hash(split_files(cfg, split)) for split in SPLITS}


def split_files(cfg: DataConfig, split: str) -> list[Path]:
    """The files one split of a data set is read from (Stacked MNIST: MNIST's, which fix it)."""
    if split not in SPLITS:
        raise TrilemmaError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")
    root = data_root(cfg)
    if cfg.name in ("mnist", "stacked_mnist"):
        prefix = "train" if split == "train" else "t10k"
        return [root / "MNIST" / "raw" / f"{prefix}-{kind}-ubyte" for kind in ("images-idx3", "labels-idx1")]
    if cfg.name == "cifar10":
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        return [root / "cifar-10-batches-py" / name for name in names]
    if cfg.name == "npz":
        return [_npz_folder(cfg) / f"{split}.npz"]
    return []


def _files_hash(files: list[Path]) -> str:
    """A hash of the files' names (not their folder) and contents."""
    digest = hashlib.sha256()
    for file in files:
        if not file.is_file():
            return f"missing: {file}"
        digest.update(f"{file.name}:{file_sha256(file)}\n".encode())
    return digest.hexdigest()[:16]


_SEEN: dict[str, str] = {}  # this process's hashes, by the cache's key


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read once per version of the file: cached in :data:`HASH_CACHE`
    under its resolved path, size and modification time."""
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    if key not in _SEEN:
        cache = _read_hash_cache()
        if key not in cache:
            cache = {k: v for k, v in cache.items() if not k.startswith(f"{path}|")}  # its older versions
            cache[key] = _sha256(path)
            try:
                atomic_write_json(HASH_CACHE, cache)
            except OSError:  # a read-only cache: hashed again next time
                pass
        _SEEN[key] = cache[key]
    return _SEEN[key]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _read_hash_cache() -> dict[str, str]:
    try:
        cache = json.loads(HASH_CACHE.read_text())
    except (OSError, ValueError):  # absent, or torn by a writer killed mid-write before the rename
        return {}
    return cache if isinstance(cache, dict) else {}


def load_split(cfg: DataConfig, split: str) -> torch.Tensor:
    """All images of one split as a uint8 tensor ``(N, C, H, W)`` on the CPU."""
    return load_labeled(cfg, split)[0]


def load_labeled(cfg: DataConfig, split: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """All images of one split, uint8 ``(N, C, H, W)``, and their class labels, int64 ``(N,)`` (None
    for a data set without labels), on the CPU."""
    if split not in SPLITS:
        raise TrilemmaError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")
    if cfg.name not in SOURCES:
        raise TrilemmaError(f"unknown dataset {cfg.name!r}; datasets: {', '.join(SOURCES)}")
    loader = {"mnist": _mnist, "cifar10": _cifar10, "npz": _npz, "synthetic": _synthetic,
              "stacked_mnist": _stacked_mnist}[cfg.name]
    images, labels = loader(cfg, split)
    if cfg.resolution and images.shape[-1] != cfg.resolution:
        images = resize(images, cfg.resolution)
    return images, labels


def check_splits(cfg: DataConfig, train: torch.Tensor, test: torch.Tensor) -> None:
    """Both splits hold images of one shape, and enough of them; a TrilemmaError naming the data set."""
    label = dataset_label(cfg)
    if tuple(train.shape[1:]) != tuple(test.shape[1:]):
        raise TrilemmaError(f"data set {label!r}: the train split's images are {tuple(train.shape[1:])} and "
                            f"the test split's {tuple(test.shape[1:])}; both must have one shape (set "
                            f"'resolution' to resize both)")
    if len(train) < 1 or len(test) < 1:
        raise TrilemmaError(f"data set {label!r}: a split is empty ({len(train)} train, {len(test)} test images)")
    c, h, w = train.shape[1:]
    if c not in (1, 3) or min(h, w) < 4:
        raise TrilemmaError(f"data set {label!r}: images of {c} channels at {h}x{w}; trilemma needs 1 or 3 "
                            f"channels and at least 4x4")


def resize(images: torch.Tensor, resolution: int, batch: int = 4096) -> torch.Tensor:
    """Resize uint8 images to ``resolution`` (antialiased bilinear), back to uint8."""
    out = []
    for chunk in images.split(batch):
        y = F.interpolate(chunk.float(), size=(resolution, resolution), mode="bilinear",
                          antialias=True, align_corners=False)
        out.append(y.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


def _torchvision(cfg: DataConfig, split: str, cls_name: str, expected: tuple[str, ...], folder: str):
    import torchvision

    root = data_root(cfg)
    cls = getattr(torchvision.datasets, cls_name)
    try:
        return cls(root=str(root), train=split == "train", download=cfg.download)
    except Exception as e:  # torchvision raises RuntimeError/URLError/OSError variously
        how = "and could not be downloaded" if cfg.download else "and download is off"
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TrilemmaError(
            f"{cls_name} not found or corrupt in {root / folder} (expected {', '.join(expected)}) {how}: "
            f"{reason}; set TRILEMMA_DATA or the suite's data root") from None


def check_idx(path: Path, magic: int, item_shape: tuple[int, ...]) -> None:
    """An IDX file (MNIST's format) whose header and size agree, or a TrilemmaError naming it."""
    size = path.stat().st_size
    header_bytes = 4 + 4 * (1 + len(item_shape))
    with open(path, "rb") as f:
        header = f.read(header_bytes)
    if len(header) < header_bytes:
        raise TrilemmaError(f"{path}: truncated or not an IDX file ({size} bytes)")
    numbers = [int.from_bytes(header[i:i + 4], "big") for i in range(0, header_bytes, 4)]
    if numbers[0] != magic or tuple(numbers[2:]) != item_shape:
        raise TrilemmaError(f"{path}: not an MNIST IDX file (magic {numbers[0]:#x}, shape {numbers[1:]}; "
                            f"expected {magic:#x} with items {item_shape})")
    expected = header_bytes + numbers[1] * math.prod(item_shape)
    if size != expected:
        raise TrilemmaError(f"{path}: truncated or corrupt ({size} bytes; its header promises {expected})")


def _mnist(cfg: DataConfig, split: str):
    raw = data_root(cfg) / "MNIST" / "raw"
    prefix = "train" if split == "train" else "t10k"
    for name, magic, shape in ((f"{prefix}-images-idx3-ubyte", 0x803, (28, 28)),
                               (f"{prefix}-labels-idx1-ubyte", 0x801, ())):
        if (raw / name).is_file():  # present: checked before torchvision reads it (absent: it downloads)
            check_idx(raw / name, magic, shape)
    ds = _torchvision(cfg, split, "MNIST", MNIST_FILES, "MNIST/raw")
    return ds.data.unsqueeze(1).contiguous(), ds.targets.long()  # (N, 1, 28, 28), (N,)


STACKED_MNIST_SIZES = {"train": 128_000, "test": 26_000}  # VEEGAN's training set; PacGAN's test samples
STACKED_MNIST_SEEDS = {"train": 0, "test": 1}


def _stacked_mnist(cfg: DataConfig, split: str):
    """Stacked MNIST (Metz et al. 2017; Srivastava et al. 2017): image i of a split stacks three MNIST
    digits of the same split as its three channels, ``x[i, k] = mnist[j[i, k]]``, the indices ``j``
    (N, 3) drawn uniformly with replacement by ``np.random.RandomState(seed).randint`` (NumPy's frozen
    legacy stream, so every machine builds the same images), seed 0 for train and 1 for test. The label
    is the mode ``100 d0 + 10 d1 + d2`` (0-999) of the digits' labels. Sizes: 128,000 training images
    from MNIST's 60,000 training digits (VEEGAN's training-set size; PacGAN's code for that experiment
    drew from train and test digits together, here the test digits stay held out) and 26,000 test
    images from the 10,000 test digits (the literature's 26,000 samples: the real-data floor at its n)."""
    digits, labels = _mnist(cfg, split)  # (M, 1, 28, 28), (M,)
    rng = np.random.RandomState(STACKED_MNIST_SEEDS[split])
    index = torch.from_numpy(rng.randint(0, len(digits), size=(STACKED_MNIST_SIZES[split], 3)))  # (N, 3)
    images = digits[:, 0][index]  # (N, 3, 28, 28)
    modes = (labels[index] * torch.tensor([100, 10, 1])).sum(1)  # (N,)
    return images.contiguous(), modes


def _cifar10(cfg: DataConfig, split: str):
    ds = _torchvision(cfg, split, "CIFAR10", CIFAR10_FILES, "cifar-10-batches-py")
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32)
    return images, torch.tensor(ds.targets, dtype=torch.long)


def _npz_folder(cfg: DataConfig) -> Path:
    """The folder of an npz data set: ``path``, under the data root where it is relative."""
    if not cfg.path:
        raise TrilemmaError("npz dataset needs 'path': a folder holding train.npz and test.npz")
    folder = Path(cfg.path).expanduser()
    return folder if folder.is_absolute() else data_root(cfg) / folder


def _npz(cfg: DataConfig, split: str):
    folder = _npz_folder(cfg)
    file = folder / f"{split}.npz"
    if not file.exists():
        raise TrilemmaError(f"npz dataset: {file} not found (expected train.npz and test.npz in {folder})")
    try:  # allow_pickle stays off: an object array is refused, never unpickled
        with np.load(file, allow_pickle=False) as npz:
            if not hasattr(npz, "files"):
                raise ValueError("a single array, not an npz archive")
            if "images" not in npz:
                raise TrilemmaError(f"{file}: no 'images' array (found: {', '.join(npz.files) or 'none'})")
            images = npz["images"]
            labels = npz["labels"] if "labels" in npz else None
    except TrilemmaError:
        raise
    except Exception as e:  # not a zip, truncated, pickled objects
        raise TrilemmaError(f"{file}: not a readable npz archive ({type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise TrilemmaError(f"{file}: 'images' must be uint8 (N, H, W, C) with C in (1, 3), "
                            f"got {images.dtype} {images.shape}")
    if labels is not None and (labels.shape != (len(images),) or labels.dtype.kind not in "iu"):
        raise TrilemmaError(f"{file}: 'labels' must be integers of shape ({len(images)},), "
                            f"got {labels.dtype} {labels.shape}")
    labels = torch.from_numpy(labels.astype(np.int64)) if labels is not None else None
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels


def _synthetic(cfg: DataConfig, split: str):
    """Rectangles of random size, place and colour on a noisy dark field; fixed per split. The label
    is the rectangle's brightness (first channel) in 10 bins, so class-conditional models have one."""
    n = cfg.synthetic_train if split == "train" else cfg.synthetic_test
    c, s = cfg.synthetic_channels, cfg.synthetic_size
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    x = torch.randint(0, 32, (n, c, s, s), generator=g)
    sizes = torch.randint(s // 4, s // 2 + 1, (n, 2), generator=g)
    corners = torch.randint(0, s // 2, (n, 2), generator=g)
    colours = torch.randint(128, 256, (n, c), generator=g)
    for i in range(n):
        (top, left), (h, w) = corners[i].tolist(), sizes[i].tolist()
        x[i, :, top:top + h, left:left + w] = colours[i].view(c, 1, 1)
    return x.to(torch.uint8), (colours[:, 0] - 128) * 10 // 128


class BatchStream:
    """An endless, seeded stream of training batches, resumable from a position in images.

    Epoch ``e`` visits the data in the order ``randperm(N)`` seeded by ``(seed, e)``; a batch may span
    two epochs. The stream is determined by ``(seed, position)`` alone, so a resumed run draws
    exactly the batches the uninterrupted run would have.
    """

    def __init__(self, images: torch.Tensor, batch_size: int, seed: int, position: int = 0,
                 labels: Optional[torch.Tensor] = None):
        if batch_size < 1:
            raise TrilemmaError(f"batch_size must be positive, got {batch_size}")
        self.images = images  # (N, C, H, W) uint8, on the training device
        self.labels = labels  # (N,) int64 on the same device, or None
        self.batch_size = batch_size
        self.seed = seed
        self.position = position  # images drawn so far
        self._epoch, self._perm = -1, None

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(len(self.images), generator=g).to(self.images.device)
            self._epoch = epoch
        return self._perm

    def next_indices(self) -> torch.Tensor:
        n, parts, need = len(self.images), [], self.batch_size
        while need:
            epoch, offset = divmod(self.position, n)
            take = min(need, n - offset)
            parts.append(self._order(epoch)[offset:offset + take])
            self.position += take
            need -= take
        return torch.cat(parts)

    def next(self) -> torch.Tensor:
        """The next batch of images ``(B, C, H, W)``."""
        return self.images[self.next_indices()]

    def next_labeled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch of images and their labels ``(B,)``."""
        index = self.next_indices()
        return self.images[index], self.labels[index]
