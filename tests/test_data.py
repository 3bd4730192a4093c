"""Datasets, the npz format, errors for missing data, and the resumable batch stream."""
from pathlib import Path

import numpy as np
import pytest
import torch

from trilemma.run.data import BatchStream, DataConfig, load_labeled, load_split
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


def test_labels_stay_with_their_images_through_the_stream():
    cfg = DataConfig(name="synthetic", synthetic_size=8, synthetic_train=50, synthetic_test=10)
    images, labels = load_labeled(cfg, "train")
    assert labels.shape == (50,) and labels.dtype == torch.long and 0 <= labels.min() <= labels.max() <= 9
    stream = BatchStream(images, 16, seed=1, labels=labels)
    for _ in range(5):  # crosses an epoch
        x, y = stream.next_labeled()
        for image, label in zip(x, y):
            match = (images == image).flatten(1).all(1).nonzero().flatten()
            assert label in labels[match]


def test_a_conditional_family_trains_on_the_labels(tmp_path):
    from dataclasses import dataclass

    from trilemma.contract.family import Capabilities, GenerativeModel
    from trilemma.contract.testing import check_contract
    from trilemma.run.loop import train
    from trilemma.run.settings import TrainConfig

    @dataclass
    class MeansConfig:
        num_classes: int = 10

    class ClassMeans(GenerativeModel):
        """One learned mean image per class; records the labels it was given."""
        name, paper, family = "class_means", "a test model", "GAN"
        capabilities = Capabilities(density="none", free_form_jacobian=True, sampling="one_pass",
                                    conditional=True)
        Config, presets = MeansConfig, {"tiny": {}}

        def __init__(self, config, shape):
            super().__init__(config, shape)
            self.means = torch.nn.Parameter(torch.zeros(config.num_classes, *shape))
            self.seen = []

        def configure_optimizers(self):
            return {"model": torch.optim.SGD(self.parameters(), lr=0.5)}

        def loss(self, x, labels):
            self.seen.append(labels.clone())
            return {"model": ((self.means[labels] - (x.float() / 127.5 - 1)) ** 2).mean()}

        def samplers(self):
            return {"one_pass": 1}

        def generate(self, n, sampler):
            classes = torch.randint(0, self.config.num_classes, (n,))
            return self.means[classes].clamp(-1, 1)

    check_contract(ClassMeans, (1, 8, 8))
    cfg = DataConfig(name="synthetic", synthetic_size=8, synthetic_train=64, synthetic_test=8)
    images, labels = load_labeled(cfg, "train")
    model = ClassMeans(MeansConfig(), (1, 8, 8))
    train(model, images, TrainConfig(batch_size=16, max_images=64, ema_halflife_images=0, eval_points=0),
          tmp_path, seed=0, evaluate=lambda m, **kw: {}, labels=labels)
    assert sorted(torch.cat(model.seen).tolist()) == sorted(labels.tolist())  # one epoch, every label once
