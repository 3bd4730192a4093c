"""bits/dim, dequantization and the discretized likelihoods of trilemma.contract.likelihood."""
import math

import pytest
import torch

from trilemma.contract import likelihood as L
from trilemma.measure.nll import nll as measure_nll
from trilemma.contract.family import Capabilities, GenerativeModel


class UniformDensity(GenerativeModel):
    """A continuous density, uniform on the dequantized cube [0, 1)^D: exactly 8 bits/dim."""

    paper = "none (test model)"
    capabilities = Capabilities(density="exact", free_form_jacobian=False, sampling="one_pass")

    def __init__(self, shape):
        super().__init__(None, shape)
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    # Only the likelihood is measured here; the rest of the contract is not needed.
    configure_optimizers = train_step = samplers = generate = None

    def nll(self, x):
        y = L.dequantize(x)
        log_p_y = torch.zeros(len(x)) + 0 * y.sum()  # density 1 on the unit cube
        return L.discrete_nll_from_density(log_p_y, self.num_dims)


class UniformCategorical(UniformDensity):
    """A 256-way softmax with equal logits: also exactly 8 bits/dim."""

    def nll(self, x):
        return L.categorical_nll(torch.zeros(len(x), 256, *x.shape[1:]), x)


def test_uniform_models_score_exactly_8_bits_per_dim():
    x = torch.randint(0, 256, (37, 3, 5, 7), dtype=torch.uint8)
    for cls in (UniformDensity, UniformCategorical):
        result = measure_nll(cls((3, 5, 7)), x, batch=10)
        assert math.isclose(result["bpd"], 8.0, rel_tol=0, abs_tol=1e-6), (cls.__name__, result)
        assert result["n_images"] == 37 and result["bound"] is False


def test_bits_per_dim_conversion():
    assert math.isclose(L.bits_per_dim(100 * math.log(2), 100), 1.0)


def test_signed_round_trip():
    x = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(L.from_signed(L.to_signed(x)), x)
    assert L.to_signed(x).min() == -1 and L.to_signed(x).max() == 1


def test_dequantize_stays_in_the_cell():
    x = torch.randint(0, 256, (1000,), dtype=torch.uint8)
    y = L.dequantize(x)
    assert torch.all(y * 256 >= x.float()) and torch.all(y * 256 < x.float() + 1)


def test_discretized_likelihoods_sum_to_one_over_the_levels():
    levels = torch.arange(256, dtype=torch.uint8).view(256, 1, 1, 1)
    for nll in (L.discretized_gaussian_nll, L.discretized_logistic_nll):
        for mean, log_scale in ((0.3, -2.0), (-0.99, -5.0), (0.0, 1.0)):
            total = torch.exp(-nll(levels, torch.tensor(mean), torch.tensor(log_scale))).sum()
            assert abs(float(total) - 1) < 1e-4, (nll.__name__, mean, log_scale, float(total))


def test_logit_transform_log_det_matches_autograd():
    y = torch.rand(2, 1, 2, 2, dtype=torch.float64) * 0.98 + 0.01
    z, logdet = L.logit_transform(y)
    for i in range(2):
        jac = torch.autograd.functional.jacobian(lambda v: L.logit_transform(v)[0], y[i:i + 1])
        jac = jac.reshape(4, 4)
        assert torch.allclose(torch.logdet(jac), logdet[i])
    assert torch.allclose(L.logit_inverse(z), y * 2 - 1)


def test_discretized_likelihood_gradients_are_finite_at_the_extreme_levels():
    x = torch.tensor([[0, 1, 128, 254, 255]], dtype=torch.uint8)
    for nll in (L.discretized_gaussian_nll, L.discretized_logistic_nll):
        mean = torch.zeros(1, 5, requires_grad=True)
        log_scale = torch.full((1, 5), -2.0, requires_grad=True)
        nll(x, mean, log_scale).sum().backward()
        assert torch.isfinite(mean.grad).all() and torch.isfinite(log_scale.grad).all(), nll.__name__
        assert (log_scale.grad != 0).all()  # the outer levels still teach the scale


def test_signed_transform_log_determinant():
    y = torch.rand(3, 2, 4, 4)
    z, logdet = L.signed_transform(y)
    assert torch.allclose(z, 2 * y - 1) and torch.allclose(logdet, torch.full((3,), 32 * math.log(2)))


def random_mixture(k, shape, seed=0):
    """Mixture parameters (1, K, *shape): spread-out means, a range of scales, uneven weights."""
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(1, k, *shape, generator=g)
    means = 1.2 * torch.rand(1, k, *shape, generator=g) * 2 - 1.2
    log_scales = torch.rand(1, k, *shape, generator=g) * 5 - 5.0  # -5 .. 0
    return logits, means, log_scales


def test_mixture_of_logistics_sums_to_one_over_the_levels():
    levels = torch.arange(256, dtype=torch.uint8).view(256, 1, 1, 1)
    for k in (1, 3, 10):
        logits, means, log_scales = random_mixture(k, (1, 1, 4), seed=k)  # 4 subpixels' mixtures
        for i in range(4):  # each mixture scored on all 256 levels of one subpixel
            nll = L.discretized_mixture_logistic_nll(levels, logits[..., i:i + 1], means[..., i:i + 1],
                                                     log_scales[..., i:i + 1])  # (256,)
            assert abs(float(torch.exp(-nll).sum()) - 1) < 1e-4, (k, i, float(torch.exp(-nll).sum()))


def test_mixture_with_one_component_is_the_discretized_logistic():
    x = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    x[0, 0, 0] = 0  # both outer bins present
    x[0, 0, 1] = 255
    logits, means, log_scales = random_mixture(1, (3, 4, 4))
    mix = L.discretized_mixture_logistic_nll(x, logits.expand(5, -1, -1, -1, -1), means, log_scales)
    single = L.discretized_logistic_nll(x, means[:, 0], log_scales[:, 0])
    torch.testing.assert_close(mix, single, rtol=1e-6, atol=1e-4)


def test_mixture_is_the_weighted_sum_of_its_components():
    x = torch.tensor([[[[0, 3, 128, 200, 255]]]], dtype=torch.uint8)  # (1, 1, 1, 5)
    logits, means, log_scales = random_mixture(4, (1, 1, 5), seed=3)
    weights = torch.softmax(logits, dim=1)  # (1, 4, 1, 1, 5)
    total = 1.0
    for i in range(5):  # subpixels are independent: the image's P is the product of theirs
        p_i = sum(float(weights[0, k, 0, 0, i]) * math.exp(-float(L.discretized_logistic_nll(
            x[..., i:i + 1], means[:, k, ..., i:i + 1], log_scales[:, k, ..., i:i + 1]))) for k in range(4))
        total *= p_i
    nll = L.discretized_mixture_logistic_nll(x, logits, means, log_scales)
    assert math.isclose(float(nll), -math.log(total), rel_tol=1e-5)


def test_mixture_gradients_are_finite_at_the_extreme_levels():
    x = torch.tensor([[[[0, 1, 128, 254, 255]]]], dtype=torch.uint8)
    logits, means, log_scales = (t.requires_grad_() for t in random_mixture(3, (1, 1, 5)))
    L.discretized_mixture_logistic_nll(x, logits, means, log_scales).sum().backward()
    for t in (logits, means, log_scales):
        assert torch.isfinite(t.grad).all() and (t.grad != 0).any()


def test_an_exact_density_of_dequantized_data_is_reported_as_a_bound():
    """One uniform dequantization draw per image bounds -log P(x) from above: the figure says so."""

    class Dequantized(UniformDensity):
        def nll_protocol(self):
            return {"dequantization": "uniform", "dequantization_draws": 1}

    x = torch.randint(0, 256, (8, 1, 4, 4), dtype=torch.uint8)
    result = measure_nll(Dequantized((1, 4, 4)), x, batch=8)
    assert result["kind"] == "bound" and result["bound"] is True
    assert "upper bound" in result["protocol"]["kind_reason"]
    assert measure_nll(UniformDensity((1, 4, 4)), x, batch=8)["kind"] == UniformDensity.capabilities.density


class SlowUniformDensity(UniformDensity):
    """UniformDensity at a fixed cost of 20 ms an image (an ODE likelihood, in miniature)."""

    def nll(self, x):
        import time
        time.sleep(0.02 * len(x))
        return super().nll(x)


def test_capped_nll_pass_ends_near_the_cap_not_a_batch_after_it():
    # A batch of 100 images costs 2 s; with a 0.5 s cap the pass must stop after about 25 images.
    x = torch.randint(0, 256, (200, 1, 4, 4), dtype=torch.uint8)
    result = measure_nll(SlowUniformDensity((1, 4, 4)), x, batch=100, seconds_cap=0.5)
    assert result["capped"] and 8 <= result["n_images"] <= 40, result
    assert result["seconds"] < 0.5 + 0.2, result
    assert math.isclose(result["bpd"], 8.0, abs_tol=1e-6)
    uncapped = measure_nll(UniformDensity((1, 4, 4)), x, batch=100)
    assert uncapped["n_images"] == 200 and not uncapped["capped"]


def ramp_log_density(y):
    """log p(y) of the density 2u on each cell, u = 256 y - floor(256 y) the position in the cell:
    every cell holds mass 256^-D, so P(x) = 256^-D and the discrete NLL is exactly 8 bits/dim, while
    one draw's bound is E[-log 2u] = 1 - log 2 nats a subpixel above it."""
    u = (y * L.NUM_BINS).frac().clamp_min(1e-12)
    return torch.log(2 * u).flatten(1).sum(1)


def test_importance_weighting_closes_the_dequantization_gap_as_the_draws_grow():
    x = torch.randint(0, 256, (256, 1, 2, 2), dtype=torch.uint8)
    dims, gen = 4, torch.Generator().manual_seed(0)
    bpd = {k: float(L.bits_per_dim(L.importance_weighted_nll(ramp_log_density, x, k, gen).mean(), dims))
           for k in (1, 4, 64)}
    gap_one_draw = (1 - math.log(2)) / math.log(2)  # bits a subpixel
    assert math.isclose(bpd[1] - 8, gap_one_draw, rel_tol=0.1), bpd
    assert bpd[1] > bpd[4] > bpd[64] > 8 - 0.01, bpd
    assert bpd[64] - 8 < gap_one_draw / 4, bpd


def test_importance_weighting_is_exact_for_a_density_constant_on_each_cell():
    # p(y) = 2^D on [0, 1/2)^D: every draw agrees, and -log P(x) = D log 128 for x below 128.
    x = torch.randint(0, 128, (16, 1, 2, 2), dtype=torch.uint8)
    half = lambda y: torch.where(y < 0.5, math.log(2), -math.inf).flatten(1).sum(1)  # noqa: E731
    nll = L.importance_weighted_nll(half, x, 8)
    assert torch.allclose(nll, torch.full((16,), 4 * math.log(128), dtype=torch.float64))


class RampFlow(UniformDensity):
    """An exact density of dequantized data offering the importance-weighted NLL."""

    def dequantized_log_prob(self, y):
        return ramp_log_density(y)

    def nll(self, x):
        return L.discrete_nll_from_density(self.dequantized_log_prob(L.dequantize(x)), self.num_dims)

    def nll_protocol(self):
        return {"dequantization": "uniform", "dequantization_draws": 1}


def test_importance_weighted_nll_is_marked_an_estimate_with_its_draws():
    x = torch.randint(0, 256, (64, 1, 2, 2), dtype=torch.uint8)
    one = measure_nll(RampFlow((1, 2, 2)), x, batch=32)
    weighted = measure_nll(RampFlow((1, 2, 2)), x, batch=32, draws=16)
    assert one["kind"] == "bound" and one["protocol"]["dequantization_draws"] == 1
    assert weighted["kind"] == "estimate" and not weighted["bound"]
    assert weighted["protocol"]["dequantization_draws"] == 16 and weighted["protocol"]["importance_weighted"]
    assert "importance-weighted over 16 draws" in weighted["protocol"]["kind_reason"]
    assert 8 < weighted["bpd"] < one["bpd"]
    # A family without a dequantized log density keeps its one-draw bound, and says so.
    assert not UniformDensity.importance_weighted() and RampFlow.importance_weighted()
    plain = measure_nll(UniformDensity((1, 2, 2)), x, batch=32, draws=16)
    assert "importance_weighted" not in plain["protocol"]


class EstimatedRampFlow(RampFlow):
    """A density whose nll() estimates log p(y) (a Hutchinson trace) and whose weights use it exactly."""

    capabilities = Capabilities(density="bound", free_form_jacobian=True, sampling="one_pass")

    def nll_protocol(self):
        return {"dequantization": "uniform", "dequantization_draws": 1, "estimator": "hutchinson",
                "trace_draws": 1, "roulette": "poisson", "weighted_estimator": "exact",
                "weighted_trace_draws": 0, "weighted_roulette": None}


def test_a_bound_family_gives_a_bound_and_its_weighted_figure_records_its_exact_density():
    x = torch.randint(0, 256, (64, 1, 2, 2), dtype=torch.uint8)
    one = measure_nll(EstimatedRampFlow((1, 2, 2)), x, batch=32)
    assert one["kind"] == "bound" and "upper bound" in one["protocol"]["kind_reason"]
    assert one["protocol"]["estimator"] == "hutchinson" and one["protocol"]["trace_draws"] == 1
    assert not any(k.startswith("weighted_") for k in one["protocol"])
    weighted = measure_nll(EstimatedRampFlow((1, 2, 2)), x, batch=32, draws=8)
    assert weighted["kind"] == "estimate" and weighted["protocol"]["dequantization_draws"] == 8
    assert weighted["protocol"]["estimator"] == "exact" and weighted["protocol"]["trace_draws"] == 0
    assert "roulette" not in weighted["protocol"]  # a None replacement drops the key
    assert not any(k.startswith("weighted_") for k in weighted["protocol"])
    assert weighted["bpd"] < one["bpd"]


@pytest.mark.parametrize("name", ["realnvp", "glow"])  # every family: tests/test_nll_kinds.py
def test_flows_with_an_exact_log_determinant_offer_the_weighted_nll_below_the_draws_mean(name):
    """By Jensen, -log of the mean of K densities is at most the mean of their -logs, draw for draw."""
    from trilemma.contract.registry import get_model_class
    from trilemma.contract.family import build_config

    cls = get_model_class(name)
    assert cls.importance_weighted()
    torch.manual_seed(0)
    model = cls(build_config(cls, "tiny", {}), (1, 8, 8)).eval()
    x = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        weighted = L.importance_weighted_nll(model.dequantized_log_prob, x, 4, torch.Generator().manual_seed(1))
        gen = torch.Generator().manual_seed(1)
        single = torch.stack([L.discrete_nll_from_density(model.dequantized_log_prob(L.dequantize(x, gen)), 64)
                              for _ in range(4)]).double().mean(0)
    assert torch.isfinite(weighted).all()
    assert (weighted <= single + 1e-6).all() and (weighted < single).any()
