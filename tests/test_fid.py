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
    extractor = fidlib.FeatureExtractor(weights, torch.device("cpu"), batch_size=25)
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


def test_one_channel_images_give_the_features_of_their_three_channel_copies(fid_weights):
    """Grey images take the summed-weight first convolution; their three copies the network's own."""
    a, _ = _two_sets(4)
    extractor = fidlib.FeatureExtractor(fid_weights, torch.device("cpu"), batch_size=8)
    gray = a[:, :1]
    got, want = extractor(iter([gray])), extractor(iter([gray.expand(-1, 3, -1, -1)]))
    assert (got - want).abs().max() <= 2e-6 * want.abs().max()


def test_reference_cache_key_names_every_input(tmp_path):
    images = torch.zeros(50, 1, 28, 28, dtype=torch.uint8)
    key = fidlib.reference_key("mnist", "train", images, "abc123")
    for part in ("mnist", "train", "1ch", "28px", "n50", fidlib.EXTRACTOR, fidlib.FEATURE_LAYER, "abc123"):
        assert part in key
    assert key != fidlib.reference_key("mnist", "train", torch.zeros(50, 1, 32, 32, dtype=torch.uint8), "abc123")

    class Counting:
        calls = 0
        device = torch.device("cpu")

        def __call__(self, batches, **progress):
            Counting.calls += 1
            return torch.cat([b.float().flatten(1) for b in batches])

    images = torch.zeros(3, 1, 2, 2, dtype=torch.uint8)
    first = fidlib.reference_features(Counting(), images, key, tmp_path)
    again = fidlib.reference_features(Counting(), images, key, tmp_path)
    assert Counting.calls == 1 and torch.equal(first, again)


def test_two_image_sets_under_one_label_get_different_cache_keys():
    """The same label, shape and count, but other pixels (another data root) or other channels."""
    one = torch.zeros(50, 1, 16, 16, dtype=torch.uint8)
    other = one.clone()
    other[7, 0, 3, 3] = 1  # one pixel of one image differs
    three = one.repeat(1, 3, 1, 1)
    keys = {fidlib.reference_key("synthetic", "train", x, "w") for x in (one, other, three)}
    assert len(keys) == 3
    assert fidlib.reference_key("synthetic", "train", one.clone(), "w") in keys  # same bytes, same key


def test_samples_are_drawn_outside_inference_mode():
    """Samplers that need autograd (Langevin dynamics) must work while features are extracted."""
    class Flatten(torch.nn.Module):
        def forward(self, x):
            return x.float().flatten(1)

    extractor = object.__new__(fidlib.FeatureExtractor)
    extractor.net, extractor.device, extractor.batch_size, extractor.threads = Flatten(), torch.device("cpu"), 4, 1

    def langevin_like(n):
        x = torch.zeros(n, 1, 2, 2, requires_grad=True)
        grad, = torch.autograd.grad((x ** 2).sum(), x)  # fails inside inference mode
        return (x - grad).detach().to(torch.uint8)

    feats = extractor(fidlib.generated_batches(langevin_like, 6, 4))
    assert feats.shape == (6, 4)  # the extractor repeats one channel to three inside its network


def test_features_equal_torch_fidelity_s_network(fid_weights):
    """Folded batch norms, one resize per channel, channels-last: the same features to ~1e-6."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    reference = FeatureExtractorInceptionV3(fidlib.EXTRACTOR, [fidlib.FEATURE_LAYER],
                                            feature_extractor_weights_path=fid_weights).eval()
    fast = fidlib.FeatureExtractor(fid_weights, torch.device("cpu"), batch_size=4)
    g = torch.Generator().manual_seed(0)
    for shape in ((4, 1, 28, 28), (4, 3, 32, 32)):
        x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
        with torch.inference_mode():
            want = reference(x.expand(-1, 3, -1, -1))[0]
        got = fast(iter([x]))
        assert (got - want).abs().max() <= 2e-6 * want.abs().max(), shape


def test_every_batch_norm_of_inception_is_folded(fid_weights):
    """The stem's convolutions are BasicConv2d blocks themselves, not inside a Mixed block: they fold too."""
    fast = fidlib.FeatureExtractor(fid_weights, torch.device("cpu"), batch_size=4)
    modules = list(fast.net.trunk.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.net.modules())
    convs = [m for m in modules if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 94 and all(c.bias is not None for c in convs)  # Inception-v3's 94 convolutions


def test_fid_and_kid_equal_torch_fidelity_s_formulas():
    """The small-Gram FID (n < 2048) and the indexed KID give torch-fidelity's numbers."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric

    from trilemma.measure.stats import fid_stats, frechet_distance, kid

    g = torch.Generator().manual_seed(1)
    mix = torch.randn(2048, 2048, generator=g) / 40
    ref = torch.relu(torch.randn(300, 2048, generator=g) @ mix)
    for gen in (torch.relu(torch.randn(200, 2048, generator=g) @ mix + 0.05), ref[:150] + 0.01):
        want = fid_statistics_to_metric(fid_features_to_statistics(gen), fid_features_to_statistics(ref),
                                        verbose=False)["frechet_inception_distance"]
        assert frechet_distance(gen, fid_stats(ref)) == pytest.approx(want, rel=1e-6, abs=1e-6)
        theirs = kid_features_to_metric(gen, ref, kid_subset_size=100, kid_subsets=20, rng_seed=3, verbose=False)
        ours = kid(gen, ref, subset_size=100, subsets=20, seed=3)
        assert ours["kid_mean"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-4)
        assert ours["kid_std"] == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-3)


@pytest.mark.slow
def test_profile_of_the_evaluation_path_runs(fid_weights, tmp_path):
    from trilemma.measure.profile_eval import profile_eval, render

    record = profile_eval(fid_weights, torch.device("cpu"), n=8, repeats=1)
    assert record["feature_max_relative_difference"] < 2e-6 and record["gflop_per_image"] > 10
    exact = record["feature_error_against_float64"]  # fp32 error of the order of torch-fidelity's own
    assert exact["ours_vs_float64"] < 2 * exact["torch_fidelity_vs_float64"] + 1e-7 < 1e-5
    for key in ("after", "before", "torch_fidelity"):
        assert record[key]["images_per_second"] > 0
    assert len(record["rounds"]) == 1 and record["speedup_over_before"]["median"] > 0
    assert "speed-up" in render(record)


def _features(n: int, seed: int, d: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(0)) / d ** 0.5
    return torch.relu(torch.randn(n, d, generator=g) @ mix)


def test_the_bootstrap_interval_of_a_fid_shrinks_with_n():
    """On fixture features, 4x the generated samples give a clearly narrower interval (about 1/2 the
    width); n = 100 < d takes the small-Gram path, n = 800 > d the D x D one."""
    from trilemma.measure.stats import bootstrap, fid_stats, frechet_distance, normal_intervals

    ref = _features(1000, 1)
    stats = fid_stats(ref)
    widths = {}
    for n in (100, 800):
        gen = _features(n, 2) + 0.02
        point = frechet_distance(gen, stats)
        b = normal_intervals({"fid": point}, bootstrap(gen, ref, stats, resamples=40, seed=0, prc=False))
        lo, hi = b["fid_ci"]
        # FID is biased upward in n, so resamples (with repeats) sit at or above the point estimate.
        assert lo < point < hi and b["fid_mean"] >= point * 0.99
        assert b["kid_percentile"][0] < b["kid_percentile"][1] and b["kid_sd"] > 0
        widths[n] = hi - lo
    assert widths[800] < 0.7 * widths[100]


def test_bootstrap_precision_recall_on_the_full_set_equal_torch_fidelity_s():
    from torch_fidelity.metric_prc import prc_features_to_metric

    from trilemma.measure.stats import bootstrap, fid_stats

    ref, gen = _features(300, 1, 64), _features(200, 3, 64) * 1.1
    b = bootstrap(gen, ref, fid_stats(ref), resamples=20, kid=False)
    theirs = prc_features_to_metric(gen, ref, verbose=False)
    assert b["precision_full"] == pytest.approx(theirs["precision"], abs=1e-6)
    assert b["recall_full"] == pytest.approx(theirs["recall"], abs=1e-6)
    assert b["precision_percentile"][0] <= theirs["precision"] <= b["precision_percentile"][1] + 1e-9


def test_subset_fid_of_every_sample_is_the_fid_on_both_paths():
    from trilemma.measure.stats import SubsetFID, fid_stats, frechet_distance

    stats = fid_stats(_features(600, 1))
    for n in (100, 400):  # n - 1 < d: the small Gram; n - 1 >= d: the D x D root (d = 256)
        gen = _features(n, 2).double()
        assert SubsetFID(gen, stats)(torch.arange(n)) == pytest.approx(frechet_distance(gen, stats), rel=1e-9)


@pytest.mark.parametrize("shift", [0.0, 0.1])
def test_fid_infinity_removes_most_of_the_small_n_bias(shift):
    """Generated and reference features of one distribution (shifted by ``shift``): the FID of
    50,000 samples is the truth; FID@500 sits well above it, FID∞ of the same 500 close to it."""
    from trilemma.measure.stats import fid_infinity, fid_stats, frechet_distance

    def feats(n, seed, d=64):
        return _features(n, seed, d) + shift

    stats = fid_stats(_features(50_000, 1, 64))
    truth = frechet_distance(feats(50_000, 7), stats)
    for seed in (2, 3, 4):
        gen = feats(500, seed)
        at_n, inf = frechet_distance(gen, stats), fid_infinity(gen, stats)
        assert at_n - truth > 0.5
        assert abs(inf["fid_inf"] - truth) < 0.35 * (at_n - truth), (truth, at_n, inf["fid_inf"])
        assert inf["fid_inf_se"] > 0 and len(inf["fid_inf_sizes"]) == 15 and inf["fid_inf_sizes"][-1] == 500


def test_the_final_metrics_carry_fid_infinity_only_from_its_minimum_n():
    from trilemma.measure.fid import metrics_from_features
    from trilemma.measure.stats import FID_INF_MIN_SAMPLES

    ref = _features(600, 1, 64)
    small, large = (metrics_from_features(_features(n, 2, 64), ref, kid=False, prc=False, bootstrap=10)
                    for n in (FID_INF_MIN_SAMPLES - 1, FID_INF_MIN_SAMPLES))
    assert "fid_inf" not in small and large["fid_inf"] < large["fid"]
    assert "fid_inf" not in metrics_from_features(_features(600, 2, 64), ref, kid=False, prc=False)  # a curve point
