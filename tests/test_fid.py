"""The harness's FID, KID and precision/recall equal torch-fidelity's own on the same image sets."""
import pytest
import torch

from trilemma.measure import fid as fidlib
from trilemma.run.data import DataConfig, load_split


class Images(torch.utils.data.Dataset):
    """uint8 (N, 3, H, W) images as torch-fidelity's input dataset."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


@pytest.fixture(autouse=True, scope="module")
def inception_threads():
    """Inception is one large network: it gains from both cores, unlike the tiny test models."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _two_sets(n: int):
    cfg = DataConfig(name="synthetic", synthetic_channels=3, synthetic_size=16, synthetic_train=n,
                     synthetic_test=n)
    return load_split(cfg, "train"), load_split(cfg, "test")


@pytest.fixture(scope="module")
def sets_and_features():
    """Two sets of 24 images and their features, extracted once for the module (Inception is slow)."""
    import os

    weights = os.environ.get("TRILEMMA_FID_WEIGHTS")
    if not weights:
        pytest.skip("TRILEMMA_FID_WEIGHTS is not set to a weights file")
    a, b = _two_sets(24)
    extractor = fidlib.FeatureExtractor(weights, torch.device("cpu"))
    return a, b, extractor(iter([a])), extractor(iter([b]))


def test_fid_kid_prc_match_torch_fidelity(fid_weights, sets_and_features):
    import torch_fidelity

    a, b, feats_a, feats_b = sets_and_features
    ours = fidlib.metrics_from_features(feats_a, feats_b)
    theirs = torch_fidelity.calculate_metrics(
        input1=Images(a), input2=Images(b), fid=True, kid=True, prc=True, kid_subset_size=24,
        feature_extractor="inception-v3-compat", feature_extractor_weights_path=fid_weights, cuda=False, verbose=False, cache=False,
        batch_size=25, save_cpu_ram=False)
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-3)
    assert ours["kid_mean"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-3, abs=1e-5)
    assert ours["precision"] == pytest.approx(theirs["precision"], abs=1e-6)
    assert ours["recall"] == pytest.approx(theirs["recall"], abs=1e-6)
    assert ours["fid"] > 1.0  # two different sets are far apart


def test_a_set_against_itself_is_about_zero(sets_and_features):
    feats = sets_and_features[2]
    values = fidlib.metrics_from_features(feats, feats)
    assert abs(values["fid"]) < 1e-2 and values["precision"] == 1.0 and values["recall"] == 1.0


def test_one_channel_images_are_repeated_to_three(fid_weights):
    a, _ = _two_sets(4)
    extractor = fidlib.FeatureExtractor(fid_weights, torch.device("cpu"))
    gray = a[:, :1]
    assert torch.allclose(extractor(iter([gray])), extractor(iter([gray.expand(-1, 3, -1, -1)])))


def test_reference_cache_key_names_every_input(tmp_path):
    key = fidlib.reference_key("mnist", "train", 28, 5000, "abc123")
    for part in ("mnist", "train", "28px", "n5000", fidlib.EXTRACTOR, fidlib.FEATURE_LAYER, "abc123"):
        assert part in key
    assert key != fidlib.reference_key("mnist", "train", 32, 5000, "abc123")

    class Counting:
        calls = 0

        def __call__(self, batches, **progress):
            Counting.calls += 1
            return torch.cat([b.float().flatten(1) for b in batches])

    images = torch.zeros(3, 1, 2, 2, dtype=torch.uint8)
    first = fidlib.reference_features(Counting(), images, key, tmp_path)
    again = fidlib.reference_features(Counting(), images, key, tmp_path)
    assert Counting.calls == 1 and torch.equal(first, again)


def test_samples_are_drawn_outside_inference_mode():
    """Samplers that need autograd (Langevin dynamics) must work while features are extracted."""
    extractor = object.__new__(fidlib.FeatureExtractor)
    extractor.net, extractor.device, extractor.batch_size = (lambda x: [x.float().flatten(1)]), torch.device("cpu"), 4

    def langevin_like(n):
        x = torch.zeros(n, 1, 2, 2, requires_grad=True)
        grad, = torch.autograd.grad((x ** 2).sum(), x)  # fails inside inference mode
        return (x - grad).detach().to(torch.uint8)

    feats = extractor(fidlib.generated_batches(langevin_like, 6, 4))
    assert feats.shape == (6, 12)
