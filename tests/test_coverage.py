"""Coverage by a reference MNIST classifier: the arithmetic of modes and KL, the classifier's cache and
accuracy check, Stacked MNIST as a data set, and real and collapsed samples scored by the protocol."""
import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from trilemma.contract.errors import TrilemmaError
from trilemma.contract.likelihood import to_signed
from trilemma.measure import coverage as cov
from trilemma.run.data import DataConfig, load_labeled

LEVELS = torch.arange(10) * 24 + 12  # the stub's digit k: a constant image of this grey level


class Stub(nn.Module):
    """Reads the digit off an image's mean grey level (the nearest of ``LEVELS``), with a softmax whose
    confidence falls off between two levels."""

    def forward(self, x):  # (B, 1, H, W) in [-1, 1]
        return -((x.mean((1, 2, 3))[:, None] - to_signed(LEVELS)[None]) / 0.02) ** 2  # (B, 10)


def stub() -> cov.ReferenceClassifier:
    return cov.ReferenceClassifier(Stub(), "stub", 1.0)


def digit_images(digits: torch.Tensor, size: int = 28) -> torch.Tensor:
    """uint8 (n, C, size, size) images whose channel k shows the stub's digit ``digits[:, k]``."""
    return LEVELS[digits].to(torch.uint8)[..., None, None].expand(*digits.shape, size, size).contiguous()


# --- the arithmetic -----------------------------------------------------------------------------------

def test_modes_and_kl_are_exact_on_constructed_labels():
    every = cov.mode_statistics(torch.arange(1000).repeat(26))  # 1,000 equal modes
    assert every["modes"] == 1000 and abs(every["modes_kl"]) < 1e-12
    one = cov.mode_statistics(torch.full((26_000,), 417))
    assert one["modes"] == 1 and one["modes_kl"] == pytest.approx(math.log(1000), abs=1e-12)
    half = cov.mode_statistics(torch.tensor([3, 990] * 50))
    assert half["modes"] == 2 and half["modes_kl"] == pytest.approx(math.log(500), abs=1e-12)
    assert cov.kl_from_uniform(torch.tensor([3, 1, 0, 0])) == pytest.approx(
        0.75 * math.log(3) + 0.25 * math.log(1))


def test_stacked_modes_read_each_channel_as_one_digit():
    g = torch.Generator().manual_seed(0)
    digits = torch.randint(0, 10, (600, 3), generator=g)
    truth = (digits * torch.tensor([100, 10, 1])).sum(1)
    out = cov.stacked_modes(digit_images(digits), stub(), bootstrap=20)
    assert out["modes"] == truth.unique().numel() and out["modes_kl"] == pytest.approx(
        cov.mode_statistics(truth)["modes_kl"], abs=1e-12)
    assert out["modes_confident_fraction"] == 1.0 and out["n"] == 600
    # channel order: (1, 2, 3) is mode 123, not 321
    modes, sure = cov.stacked_predictions(digit_images(digits), stub())
    assert torch.equal(modes, truth) and bool(sure.all())
    single = cov.stacked_modes(digit_images(torch.tensor([[1, 2, 3]] * 4)), stub(), bootstrap=0)
    assert single["modes"] == 1 and single["modes_kl"] == pytest.approx(math.log(1000))
    # float samples in [-1, 1] and other resolutions read as their uint8, 28x28 selves
    floats = to_signed(digit_images(digits, size=32))
    again = cov.stacked_modes(floats, stub(), bootstrap=0)
    assert (again["modes"], again["modes_kl"]) == (out["modes"], out["modes_kl"])
    with pytest.raises(TrilemmaError, match="three-channel"):
        cov.stacked_modes(digit_images(digits[:, :1]), stub())


def test_class_coverage_counts_classes_confidence_and_kl():
    even = cov.class_coverage(digit_images(torch.arange(10).repeat(30)[:, None]), stub(), bootstrap=20)
    assert even["classes_hit"] == 10 and abs(even["class_kl"]) < 1e-12 and even["class_confident_fraction"] == 1.0
    collapsed = cov.class_coverage(digit_images(torch.full((300, 1), 7)), stub(), bootstrap=20)
    assert collapsed["classes_hit"] == 1 and collapsed["class_kl"] == pytest.approx(math.log(10))
    # grey levels halfway between two digits: classified, but not with confidence 0.9
    between = torch.full((100, 1, 28, 28), int(LEVELS[4] + 12), dtype=torch.uint8)
    mixed = cov.class_coverage(torch.cat([digit_images(torch.full((100, 1), 2)), between]), stub(), bootstrap=20)
    assert mixed["class_confident_fraction"] == 0.5 and mixed["classes_hit_confident"] == 1
    assert mixed["classes_hit"] == 2  # 2, and 4 or 5 for the ambiguous ones
    boot = mixed["bootstrap"]
    lo, hi = boot["class_confident_fraction_ci"]
    assert lo < 0.5 < hi and boot["class_confident_fraction_sd"] > 0 and boot["resamples"] == 20
    assert mixed["classifier"]["key"] == "stub" and mixed["classifier"]["test_accuracy"] == 1.0


# --- the classifier: training, cache, accuracy --------------------------------------------------------

@pytest.fixture(scope="module")
def root():
    """The data root holding MNIST, or skip (conftest's ``data_root``, for module-scoped fixtures)."""
    path = os.environ.get("TRILEMMA_DATA")
    if not path or not (Path(path) / "MNIST" / "raw").is_dir():
        pytest.skip("TRILEMMA_DATA does not hold MNIST")
    return path


@pytest.fixture(scope="module")
def mnist(root):
    cfg = DataConfig(name="mnist", root=root, download=False)
    return load_labeled(cfg, "train"), load_labeled(cfg, "test")


SMALL = cov.ClassifierSettings(epochs=2)  # on 6,000 images: about 96 % test accuracy, seconds


@pytest.fixture(scope="module")
def small_classifier(mnist, tmp_path_factory):
    """A classifier trained on 6,000 MNIST images, below the reference's 99 % but fine for the tests."""
    (x, y), (xt, yt) = mnist
    cache = tmp_path_factory.mktemp("classifier")
    return cov.reference_classifier(x[:6000], y[:6000], xt, yt, cache, SMALL, min_accuracy=0.9), cache


def test_classifier_below_99_percent_is_refused(mnist, small_classifier):
    (x, y), (xt, yt) = mnist
    clf, cache = small_classifier
    assert 0.9 <= clf.test_accuracy < 0.99 and clf.protocol()["cached"] is False
    with pytest.raises(TrilemmaError, match=r"test accuracy 9\d\.\d\d% is below the required 99%"):
        cov.reference_classifier(x[:6000], y[:6000], xt, yt, cache, SMALL)
    cov.check_accuracy(0.99, "k")
    with pytest.raises(TrilemmaError, match="below"):
        cov.check_accuracy(0.9899, "k")
    with pytest.raises(TrilemmaError, match="train images must be uint8"):
        cov.reference_classifier(x[:10].float(), y[:10], xt, yt, cache, SMALL)


def test_classifier_is_cached_under_a_key_naming_its_inputs(mnist, small_classifier):
    (x, y), (xt, yt) = mnist
    clf, cache = small_classifier
    again = cov.reference_classifier(x[:6000], y[:6000], xt, yt, cache, SMALL, min_accuracy=0.9)
    assert again.protocol()["cached"] is True and again.key == clf.key
    assert again.test_accuracy == clf.test_accuracy
    assert all(torch.equal(a, b) for a, b in zip(again.net.state_dict().values(), clf.net.state_dict().values()))
    key = clf.key
    assert f"torch{torch.__version__.split('+')[0]}" in key and "e2-b128" in key and "n6000" in key
    assert cov.classifier_key(x[:6000], y[:6000], cov.ClassifierSettings(epochs=3)) != key
    assert cov.classifier_key(x[1:6001], y[1:6001], SMALL) != key
    relabelled = y[:6000].clone()
    relabelled[0] = (relabelled[0] + 1) % 10
    assert cov.classifier_key(x[:6000], relabelled, SMALL) != key


def test_classifier_training_is_deterministic_and_leaves_global_state(mnist, tmp_path):
    (x, y), (xt, yt) = mnist
    tiny = cov.ClassifierSettings(epochs=1, seed=3)
    rng, threads = torch.random.get_rng_state(), torch.get_num_threads()
    one = cov.train_classifier(x[:1024], y[:1024], tiny)
    two = cov.train_classifier(x[:1024], y[:1024], tiny)
    assert all(torch.equal(a, b) for a, b in zip(one.state_dict().values(), two.state_dict().values()))
    assert torch.equal(torch.random.get_rng_state(), rng) and torch.get_num_threads() == threads
    other = cov.train_classifier(x[:1024], y[:1024], cov.ClassifierSettings(epochs=1, seed=4))
    assert not torch.equal(one.fc2.weight, other.fc2.weight)


def test_corrupt_cache_entry_is_set_aside_and_retrained(mnist, tmp_path):
    (x, y), (xt, yt) = mnist
    tiny = cov.ClassifierSettings(epochs=1)
    key = cov.classifier_key(x[:512], y[:512], tiny)
    (tmp_path / f"{key}.safetensors").write_bytes(b"not a safetensors file")
    messages = []
    clf = cov.reference_classifier(x[:512], y[:512], xt[:500], yt[:500], tmp_path, tiny, min_accuracy=0.0,
                                   log=messages.append)
    assert (tmp_path / f"{key}.safetensors.corrupt").exists() and clf.protocol()["cached"] is False
    assert any("unreadable" in m for m in messages)
    # a valid file under another key's name (its metadata names its own key) is foreign: set aside too
    other = cov.classifier_key(x[:256], y[:256], tiny)
    (tmp_path / f"{other}.safetensors").write_bytes((tmp_path / f"{key}.safetensors").read_bytes())
    cov.reference_classifier(x[:256], y[:256], xt[:500], yt[:500], tmp_path, tiny, min_accuracy=0.0,
                             log=messages.append)
    assert (tmp_path / f"{other}.safetensors.corrupt").exists()
    assert any("metadata names" in m for m in messages)


# --- Stacked MNIST: the data set, and real and collapsed samples ---------------------------------------

@pytest.fixture(scope="module")
def stacked_test(root):
    return load_labeled(DataConfig(name="stacked_mnist", root=root, download=False), "test")


def test_stacked_mnist_data_set_is_three_labelled_digits(mnist, stacked_test, root):
    (_, _), (digits, labels) = mnist
    images, modes = stacked_test
    assert images.shape == (26_000, 3, 28, 28) and images.dtype == torch.uint8 and modes.unique().numel() == 1000
    again = load_labeled(DataConfig(name="stacked_mnist", root=root, download=False), "test")
    assert torch.equal(again[0], images) and torch.equal(again[1], modes)  # built deterministically
    for i in (0, 1, 12_345, 25_999):  # each channel is a test digit of the label's digit
        for k, d in enumerate((int(modes[i]) // 100, int(modes[i]) // 10 % 10, int(modes[i]) % 10)):
            same = (digits[labels == d, 0] == images[i, k]).flatten(1).all(1)
            assert same.any(), (i, k, d)


def test_real_stacked_mnist_covers_every_mode_and_collapse_is_caught(small_classifier, stacked_test):
    """Fast version of the protocol: 5,000 real samples (a perfect sampler covers 993 modes on average,
    KL about 0.1), scored by the small classifier; the slow test runs the literature's n."""
    clf, _ = small_classifier
    images, modes = stacked_test
    real = cov.stacked_modes(images[:5000], clf, bootstrap=20)
    assert real["modes"] >= 980 and real["modes_kl"] < 0.2, real
    lo, hi = real["bootstrap"]["modes_kl_ci"]
    assert lo < real["modes_kl"] < hi
    read, _ = cov.stacked_predictions(images[:5000], clf)  # the data set's labels and the protocol's modes agree
    assert (read == modes[:5000]).double().mean() > 0.8
    few = torch.isin(modes, torch.tensor([0, 111, 222, 333, 444, 555, 666, 777, 888, 999]))
    collapsed = cov.stacked_modes(images[few][:300].repeat(10, 1, 1, 1), clf, bootstrap=20)
    assert collapsed["modes"] < 100 and collapsed["modes_kl"] > 3.0, collapsed  # log(1000/10) = 4.6


def test_mnist_class_coverage_of_real_and_collapsed_digits(small_classifier, mnist):
    clf, _ = small_classifier
    (_, _), (xt, yt) = mnist
    real = cov.class_coverage(xt[:2000], clf, bootstrap=20)
    assert real["classes_hit"] == 10 and real["class_kl"] < 0.02 and real["class_confident_fraction"] > 0.5
    ones = cov.class_coverage(xt[yt == 1][:500], clf, bootstrap=20)
    assert ones["classes_hit_confident"] <= 2 and ones["class_kl"] > 1.8


@pytest.mark.slow
def test_reference_classifier_and_the_literature_protocol(mnist, stacked_test):
    """The reference classifier (trained here if not cached: about two minutes on one CPU thread) reaches
    99 %, and 26,000 real Stacked MNIST images cover all 1,000 modes with KL below 0.05."""
    (x, y), (xt, yt) = mnist
    clf = cov.reference_classifier(x, y, xt, yt)
    assert clf.test_accuracy >= 0.99
    images, modes = stacked_test
    real = cov.stacked_modes(images[:cov.LITERATURE_SAMPLES], clf)
    assert real["modes"] == 1000 and real["modes_kl"] < 0.05, real
    few = torch.isin(modes, torch.arange(0, 1000, 111))
    collapsed = cov.stacked_modes(images[few].repeat(30, 1, 1, 1)[:cov.LITERATURE_SAMPLES], clf)
    assert collapsed["modes"] < 50 and collapsed["modes_kl"] > 4.0


def test_literature_table_parses():
    import csv
    from importlib import resources

    text = resources.files("trilemma.contract").joinpath("stacked_mnist_literature.csv").read_text("utf-8")
    rows = list(csv.DictReader(text.splitlines()))
    assert rows and tuple(rows[0]) == ("model", "modes", "kl", "samples", "architecture", "source")
    for row in rows:
        assert 0 < float(row["modes"]) <= 1000 and 0 <= float(row["kl"]) <= math.log(1000)
        assert int(row["samples"]) in (25_600, 26_000) and row["architecture"] and "Table" in row["source"]
    assert {"DCGAN", "ALI", "Unrolled GAN", "VEEGAN", "PacDCGAN2"} <= {row["model"] for row in rows}


def test_an_mnist_run_records_class_coverage_of_its_fid_samples(tmp_path, monkeypatch):
    """The runner scores the FID's first samples with the reference classifier (stubbed here by an
    untrained one: the test is about the plumbing) and records them under `coverage`; a synthetic
    data set gets none."""
    import os

    from trilemma.measure import coverage as coverage_module
    from trilemma.results.io import read_result
    from trilemma.run.runner import Context, execute, run_dir_for
    from trilemma.run.settings import expand, load_suite

    from conftest import REPO

    data = os.environ.get("TRILEMMA_DATA")
    if not data or not (Path(data) / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        pytest.skip("TRILEMMA_DATA does not hold MNIST")
    if not os.environ.get("TRILEMMA_FID_WEIGHTS"):
        pytest.skip("TRILEMMA_FID_WEIGHTS is not set to a weights file")
    scored = []

    def stub(*args, **kwargs):
        torch.manual_seed(0)
        return coverage_module.ReferenceClassifier(coverage_module.MnistClassifier(), "stub", 0.5, None, 0)

    monkeypatch.setattr(coverage_module, "reference_classifier", stub)
    real = coverage_module.class_coverage
    monkeypatch.setattr(coverage_module, "class_coverage",
                        lambda samples, *a, **k: scored.append(samples.clone()) or real(samples, *a, **k))
    suite = load_suite(REPO / "suites" / "smoke.yaml",
                       ["datasets.0.name=mnist", "eval.fid=true", "eval.fid_samples=24", "eval.fid_ref_images=32",
                        "eval.kid=false", "eval.precision_recall=false", "eval.curve_fid_samples=0",
                        "eval.nll=false", "eval.grid_images=4", "eval.coverage_samples=20"])
    run = expand(suite, ["dcgan"])[0]
    assert execute(run, run_dir_for(tmp_path, run), Context(torch.device("cpu"))) == "done"
    cov = read_result(run_dir_for(tmp_path, run))["measurements"]["coverage"]
    assert cov["kind"] == "classes" and cov["n"] == 20 and cov["classifier"]["key"] == "stub"
    assert 0 <= cov["class_confident_fraction"] <= 1 and 1 <= cov["classes_hit"] <= 10
    assert len(scored) == 1 and scored[0].dtype == torch.uint8 and scored[0].shape == (20, 1, 28, 28)

    # `trilemma eval --coverage-samples`: more samples by the same seed stream, the FID's first among them
    from trilemma.results.schema import apply_evaluations, summarize
    from trilemma.run.saved import evaluate_saved

    record = evaluate_saved(run_dir_for(tmp_path, run), coverage_samples=40)
    assert "fid" not in record and record["coverage"]["n"] == 40 and record["coverage"]["kind"] == "classes"
    assert len(scored) == 2 and torch.equal(scored[1][:20], scored[0])
    result = read_result(run_dir_for(tmp_path, run))
    assert summarize(apply_evaluations(result, "latest")).digits == record["coverage"]["class_confident_fraction"]
    assert apply_evaluations(result, "latest")["measured_by"].keys() == {"coverage"}
    with pytest.raises(TrilemmaError, match="at least 2"):
        evaluate_saved(run_dir_for(tmp_path, run), coverage_samples=1)


def test_the_report_shows_coverage_and_the_trilemma_figure_colours_by_it():
    from trilemma.report.figures import coverage_axis, coverage_value
    from trilemma.report.table import format_coverage

    mnist = {"digits": 0.62, "digits_pm": 0.04, "class_kl": 0.051, "class_kl_pm": 0.02, "recall": 0.3}
    stacked = {"modes": 812.0, "modes_pm": 11.0, "modes_kl": 0.43, "modes_kl_pm": 0.05, "recall": 0.2}
    assert format_coverage(mnist) == "0.62 ± 0.04, KL 0.05 ± 0.02"
    assert format_coverage(stacked).startswith("812 ± 11 modes, KL 0.43")
    assert format_coverage({"recall": 0.5}) == "—"
    assert coverage_axis([stacked, stacked])[0] == "modes" and coverage_value(stacked, "modes") == 0.812
    assert coverage_axis([mnist])[0] == "class_kl"
    assert coverage_value(mnist, "class_kl") == pytest.approx(1 - 0.051 / math.log(10))
    assert coverage_axis([mnist, {"recall": 0.5}])[0] == "recall"  # one scale per figure
