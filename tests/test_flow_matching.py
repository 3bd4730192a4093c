"""Flow matching's own invariants: the straight path and its velocity, the OT coupling, and the ODE
likelihood and samplers with the exact velocity field of Gaussian data (a closed form)."""
import itertools
import math

import pytest
import torch
from torch import nn

from trilemma.contract.family import build_config
from trilemma.contract.likelihood import LOG_BINS, dequantize, signed_transform
from trilemma.contract.testing import structured_batch
from trilemma.contract.update import plain_update
from trilemma.models.flow_matching import FlowMatching, exact_ot_pairing, sinkhorn_pairing


def make(shape=(1, 4, 4), **overrides) -> FlowMatching:
    torch.manual_seed(0)
    return FlowMatching(build_config(FlowMatching, "tiny", overrides), shape)


class GaussianVelocity(nn.Module):
    """The marginal velocity E[u_t | x_t] of the path when the data is N(mu, s^2 I): p_t is N(t mu,
    sigma_t^2 I) with sigma_t^2 = t^2 s^2 + a_t^2, a_t = 1 - (1 - sigma_min) t, and the flow that keeps
    it Gaussian is v = mu + (t s^2 + a_t a_t') / sigma_t^2 (x - t mu)."""

    def __init__(self, mu: float, s: float, sigma_min: float):
        super().__init__()
        self.mu, self.s, self.k = mu, s, 1 - sigma_min
        self.dummy = nn.Parameter(torch.zeros(1))  # so that model.device finds a parameter

    def forward(self, x, c_noise):
        t = (c_noise / 1000).to(x.dtype).reshape(-1, 1, 1, 1)  # the model embeds 1000 t
        a = 1 - self.k * t
        var = t ** 2 * self.s ** 2 + a ** 2
        return self.mu + (t * self.s ** 2 - a * self.k) / var * (x - t * self.mu)


def gaussian_log_prob(z, mu, var):
    return (-0.5 * (z - mu) ** 2 / var - 0.5 * math.log(2 * math.pi * var)).flatten(1).sum(1)


@pytest.mark.parametrize("sigma_min", [0.0, 0.1])
def test_target_velocity_is_the_derivative_of_the_straight_path(sigma_min):
    m = make(sigma_min=sigma_min)
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(5, 1, 4, 4, generator=g), torch.randn(5, 1, 4, 4, generator=g)
    t = torch.rand(5, generator=g)
    _, dxdt = torch.func.jvp(lambda tt: m.interpolate(x0, x1, tt), (t,), (torch.ones(5),))
    torch.testing.assert_close(dxdt, m.target_velocity(x0, x1))
    torch.testing.assert_close(m.interpolate(x0, x1, torch.zeros(5)), x0)  # noise at t = 0
    torch.testing.assert_close(m.interpolate(x0, x1, torch.ones(5)), x1 + sigma_min * x0)  # data at t = 1
    # straight: the midpoint is the average of the ends
    mid = m.interpolate(x0, x1, torch.full((5,), 0.5))
    ends = m.interpolate(x0, x1, torch.zeros(5)) + m.interpolate(x0, x1, torch.ones(5))
    torch.testing.assert_close(mid, ends / 2)


def test_exact_ot_pairing_is_the_optimal_assignment():
    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(6, 1, 2, 2, generator=g), torch.randn(6, 1, 2, 2, generator=g)
    cost = lambda perm: sum(((x0[j] - x1[i]) ** 2).sum().item() for i, j in enumerate(perm))  # noqa: E731
    best = min(cost(p) for p in itertools.permutations(range(6)))
    perm = exact_ot_pairing(x0, x1)
    assert sorted(perm.tolist()) == list(range(6))  # a permutation: every noise draw used once
    assert cost(perm.tolist()) == pytest.approx(best)
    assert cost(range(6)) > best  # (the independent pairing is not already optimal here)


def test_sinkhorn_pairing_approaches_the_assignment_at_small_blur():
    g = torch.Generator().manual_seed(2)
    x0, x1 = torch.randn(8, 1, 2, 2, generator=g), torch.randn(8, 1, 2, 2, generator=g)
    torch.manual_seed(0)
    assert torch.equal(sinkhorn_pairing(x0, x1, blur=0.01), exact_ot_pairing(x0, x1))


@pytest.mark.parametrize("sigma_min", [0.0, 0.05])
def test_ode_likelihood_of_a_gaussian_model_is_the_closed_form(sigma_min):
    mu, s = 0.3, 0.5
    m = make(sigma_min=sigma_min, nll_solver="dopri5", nll_rtol=1e-7, nll_atol=1e-7).double().eval()
    m.net = GaussianVelocity(mu, s, sigma_min).double()
    var = s ** 2 + sigma_min ** 2  # p_1 = N(mu, (s^2 + sigma_min^2) I)
    z = torch.randn(6, 1, 4, 4, dtype=torch.float64)
    for trace in ("exact", "hutchinson"):  # the Jacobian is a multiple of I: Rademacher is exact too
        torch.testing.assert_close(m.log_prob(z, trace), gaussian_log_prob(z, mu, var), rtol=1e-6, atol=1e-5)
    # nll(): dequantize, z = 2y - 1, D log 2 for the transform, D log 256 for the bins
    x = structured_batch(4, (1, 4, 4))
    torch.manual_seed(5)
    got = m.nll(x)
    torch.manual_seed(5)
    z, logdet = signed_transform(dequantize(x).double())
    want = -(gaussian_log_prob(z, mu, var) + logdet) + 16 * LOG_BINS
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("sampler", ["euler", "adaptive"])
def test_samplers_draw_the_data_distribution_with_the_exact_velocity(sampler):
    mu, s = 0.3, 0.2
    m = make(euler_steps=100, rtol=1e-6, atol=1e-6).eval()
    m.net = GaussianVelocity(mu, s, 0.0)
    torch.manual_seed(0)
    with torch.no_grad():
        x = m.sample(2000, sampler)
    assert x.mean().item() == pytest.approx(mu, abs=0.01)
    assert x.std().item() == pytest.approx(s, rel=0.03)


def test_sampler_nfe_is_counted():
    m = make(euler_steps=7).eval()
    with torch.no_grad():
        for p in m.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    calls = []
    m.net.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        m.sample(2, "euler")
        assert len(calls) == 7 == m.samplers()["euler"]
        calls.clear()
        m.sample(2, "adaptive")
    assert len(calls) == m.samplers()["adaptive"] > 2  # measured from the solve


def test_training_lowers_the_loss():
    m = make((1, 8, 8))
    update = plain_update(m)
    x = structured_batch(16, (1, 8, 8))
    losses = [m.train_step(x, update)["loss"].item() for _ in range(30)]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
