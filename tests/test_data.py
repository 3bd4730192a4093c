"""Datasets, the npz format, errors for missing data, and the resumable batch stream."""
from pathlib import Path

import numpy as np
import pytest
import torch

from trilemma.run.data import BatchStream, DataConfig, load_split
from trilemma.contract.errors import TrilemmaError


def test_synthetic_is_deterministic_uint8():
    cfg = DataConfig(name="synthetic", synthetic_channels=3, synthetic_size=8, synthetic_train=20)
    a, b = load_split(cfg, "train"), load_split(cfg, "train")
    assert a.dtype == torch.uint8 and a.shape == (20, 3, 8, 8) and torch.equal(a, b)
    assert not torch.equal(a[:5], load_split(cfg, "test")[:5])


def test_npz_round_trip_and_resize(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (10, 12, 12, 3), dtype=np.uint8)
    for split in ("train", "test"):
        np.savez(tmp_path / f"{split}.npz", images=images, labels=np.arange(10))
    x = load_split(DataConfig(name="npz", path=str(tmp_path)), "train")
    assert torch.equal(x, torch.from_numpy(images).permute(0, 3, 1, 2))
    small = load_split(DataConfig(name="npz", path=str(tmp_path), resolution=4), "test")
    assert small.shape == (10, 3, 4, 4) and small.dtype == torch.uint8


def test_npz_errors_name_the_problem(tmp_path):
    with pytest.raises(TrilemmaError, match="train.npz"):
        load_split(DataConfig(name="npz", path=str(tmp_path)), "train")
    np.savez(tmp_path / "train.npz", images=np.zeros((2, 4, 4, 3), dtype=np.float32))
    with pytest.raises(TrilemmaError, match="uint8"):
        load_split(DataConfig(name="npz", path=str(tmp_path)), "train")


def test_missing_mnist_names_files_and_folder(tmp_path):
    with pytest.raises(TrilemmaError) as e:
        load_split(DataConfig(name="mnist", root=str(tmp_path), download=False), "train")
    message = str(e.value)
    assert "train-images-idx3-ubyte" in message and str(tmp_path) in message and "\n" not in message


def test_cifar10_subset_through_npz(data_root):
    folder = Path(data_root) / "cifar10-subset"
    if not folder.is_dir():
        pytest.skip("no cifar10-subset")
    train = load_split(DataConfig(name="npz", path="cifar10-subset", root=data_root), "train")
    test = load_split(DataConfig(name="npz", path="cifar10-subset", root=data_root), "test")
    assert train.shape == (5085, 3, 32, 32) and test.shape == (1017, 3, 32, 32)


def test_mnist_from_the_data_root(data_root):
    test = load_split(DataConfig(name="mnist", root=data_root, download=False), "test")
    assert test.shape == (10000, 1, 28, 28) and test.dtype == torch.uint8


def test_batch_stream_resumes_exactly():
    images = torch.arange(50, dtype=torch.uint8).view(50, 1, 1, 1)
    full = BatchStream(images, 16, seed=3)
    batches = [full.next() for _ in range(10)]  # crosses three epochs
    resumed = BatchStream(images, 16, seed=3, position=16 * 6)
    assert all(torch.equal(resumed.next(), b) for b in batches[6:])
    # Each epoch visits every image once.
    seen = torch.cat(batches).flatten()[:50]
    assert sorted(seen.tolist()) == list(range(50))
