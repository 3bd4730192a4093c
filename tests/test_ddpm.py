"""DDPM's own invariants: the forward process, the variational bound and its estimator, the samplers."""
import math

import pytest
import torch
from torch import nn

from trilemma.contract.errors import TrilemmaError
from trilemma.contract.family import build_config
from trilemma.contract.likelihood import to_signed
from trilemma.contract.testing import structured_batch
from trilemma.contract.update import plain_update
from trilemma.models.ddpm import DDPM


def make(shape=(1, 8, 8), **overrides) -> DDPM:
    torch.manual_seed(0)
    return DDPM(build_config(DDPM, "tiny", overrides), shape)


def perturbed(model: DDPM) -> DDPM:
    """The output convolution starts at zero (eps = 0); give the network a non-trivial output."""
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


class GaussianOracle(nn.Module):
    """The exact eps-prediction for data x_0 ~ N(mu, s^2 I): (x_t - sqrt(a) E[x_0 | x_t]) / sqrt(1 - a)."""

    def __init__(self, abar: torch.Tensor, mu: float, s: float):
        super().__init__()
        self.abar, self.mu, self.s = abar, mu, s
        self.dummy = nn.Parameter(torch.zeros(1))  # so that model.device still finds a parameter

    def forward(self, x, t):
        a = self.abar[t][:, None, None, None]
        x0 = self.mu + a.sqrt() * self.s ** 2 / (a * self.s ** 2 + 1 - a) * (x - a.sqrt() * self.mu)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()


# --- forward process ---------------------------------------------------------------------------------
def test_schedule_is_the_scaled_linear_one():
    m = make(timesteps=50)
    assert m.betas[1].item() == pytest.approx(1e-4 * 1000 / 50)
    assert m.betas[50].item() == pytest.approx(0.02 * 1000 / 50)
    assert m.abar[0].item() == 1.0 and m.abar[50].item() < 1e-4  # x_T is (almost) pure noise
    with pytest.raises(TrilemmaError, match="'config.timesteps' = 20 must be >= 2"):
        make(timesteps=20)  # beta_T would reach 1: a one-line error when the config is built


def test_forward_process_matches_closed_form():
    """Running the one-step chain q(x_s | x_{s-1}) from x_0 reproduces the closed form
    q(x_t | x_0) = N(sqrt(abar) x_0, 1 - abar), and q_sample draws from that closed form."""
    m = make(timesteps=30)
    g = torch.Generator().manual_seed(1)
    x0 = torch.tensor([-1.0, -0.3, 0.5, 1.0])[None].expand(20000, 4)  # (N, 4): 4 pixel values, N draws
    x = x0.clone()
    for t in range(1, 31):
        beta = m.betas[t]
        x = (1 - beta).sqrt() * x + beta.sqrt() * torch.randn(x.shape, generator=g)  # chain step
        if t in (1, 5, 15, 30):
            mean, var = m.abar[t].sqrt() * x0[0], 1 - m.abar[t]
            tt = torch.full((x0.shape[0],), t)
            eps = torch.randn(x0.shape, generator=g)[:, :, None, None]  # (N, 4, 1, 1)
            direct = m.q_sample(x0[:, :, None, None], tt, eps)
            for samples in (x, direct.flatten(1)):
                torch.testing.assert_close(samples.mean(0), mean, atol=0.03, rtol=0)
                tol = 0.03 * var.item() + 1e-4
                torch.testing.assert_close(samples.var(0), var.expand(4), atol=tol, rtol=0)


def test_posterior_is_the_gaussian_conditional():
    """q(x_{t-1} | x_t, x_0) from the joint Gaussian of (x_{t-1}, x_t) given x_0, for every t >= 2."""
    m = make(timesteps=30)
    x0, xt = torch.tensor(0.4), torch.tensor(-0.7)
    for t in range(2, 31):
        a_prev, a_t, alpha = m.abar[t - 1], m.abar[t], 1 - m.betas[t]
        cov = alpha.sqrt() * (1 - a_prev)  # Cov(x_{t-1}, x_t | x_0)
        mean = a_prev.sqrt() * x0 + cov / (1 - a_t) * (xt - a_t.sqrt() * x0)
        var = (1 - a_prev) - cov ** 2 / (1 - a_t)
        got = m.posterior_mean(x0.reshape(1, 1, 1, 1), xt.reshape(1, 1, 1, 1), torch.tensor([t]))
        assert got.item() == pytest.approx(mean.item(), abs=1e-5)
        assert m.post_var[t].item() == pytest.approx(var.item(), rel=1e-4)
    assert m.log_var[1] == m.log_var[2]  # beta~_1 = 0 is replaced by beta~_2 for the decoder


# --- the variational bound ---------------------------------------------------------------------------
def test_gaussian_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2, lv1, lv2 = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(4))
    normal = torch.distributions.Normal
    want = torch.distributions.kl_divergence(normal(m1, (0.5 * lv1).exp()), normal(m2, (0.5 * lv2).exp()))
    want = want.flatten(1).sum(1)
    torch.testing.assert_close(DDPM.gaussian_kl(m1, lv1, m2, lv2), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 8, 8)])
def test_bound_terms_add_up_and_are_nonnegative(shape):
    m = perturbed(make(shape))
    x = structured_batch(6, shape)
    with torch.no_grad():
        r = m.vlb_terms(x, k=4)
    torch.testing.assert_close(r["total"], r["prior"] + r["diffusion"] + r["decoder"])
    torch.testing.assert_close(r["diffusion"], (r["kl"] * r["weights"]).sum(1))
    assert (r["kl"] >= 0).all() and (r["prior"] >= 0).all() and (r["decoder"] > 0).all()
    assert r["weights"].sum().item() == m.config.timesteps - 1  # the strata cover t = 2..T
    assert (r["t"] >= 2).all() and (r["t"] <= m.config.timesteps).all()
    with torch.no_grad():
        torch.manual_seed(3)
        nll = m.nll(x)
    assert nll.shape == (6,) and torch.isfinite(nll).all()


@pytest.mark.parametrize("strata", ["log", "uniform"])
def test_all_timesteps_give_the_exact_sum(strata):
    """With K >= T - 1 every L_{t-1} is evaluated once with weight 1: the result is the exact sum, replayed
    here term by term with the same noise (drawn in the documented order: decoder, strata, one per term)."""
    m = perturbed(make(nll_strata=strata))
    T, x = m.config.timesteps, structured_batch(4, (1, 8, 8))
    with torch.no_grad():
        r = m.vlb_terms(x, k=T, generator=torch.Generator().manual_seed(7))
        assert torch.equal(r["t"], torch.arange(2, T + 1).expand(4, T - 1))
        assert torch.equal(r["weights"], torch.ones(T - 1))
        g = torch.Generator().manual_seed(7)
        x0 = to_signed(x)
        torch.randn(x0.shape, generator=g)  # the decoder's draw
        torch.rand(4, T - 1, generator=g)  # the strata's draw
        exact = sum(m.kl_term(x0, torch.full((4,), t), torch.randn(x0.shape, generator=g))
                    for t in range(2, T + 1))
    torch.testing.assert_close(r["diffusion"], exact, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("strata", ["log", "uniform"])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_stratified_estimate_is_unbiased(strata, k):
    """Each t in 2..T carries, on average over the draws, a total weight of exactly 1."""
    m = make(timesteps=40, nll_strata=strata)
    n = 200000  # the per-t average below then has a standard deviation <= 0.015
    ts, w = m.stratified_timesteps(n, k, generator=torch.Generator().manual_seed(0))  # (n, K), (K,)
    assert ts.shape == (n, k) and w.sum().item() == 39
    weight_per_t = torch.zeros(41).index_add_(0, ts.flatten(), w.expand(n, k).flatten()) / n
    torch.testing.assert_close(weight_per_t[2:], torch.ones(39), atol=0.08, rtol=0)
    # On terms that fall off like 1/t^2 (as the real ones do), the mean estimate is the exact sum.
    f = 1.0 / torch.arange(41).clamp_min(1).float() ** 2
    est = (f[ts] * w).sum(1)  # (n,)
    assert est.mean().item() == pytest.approx(f[2:].sum().item(), rel=0.02)


def test_log_strata_reduce_the_variance():
    f = 1.0 / torch.arange(101).clamp_min(1).float() ** 2
    spread = {}
    for strata in ("log", "uniform"):
        ts, w = make(timesteps=100, nll_strata=strata).stratified_timesteps(20000, 2)
        spread[strata] = (f[ts] * w).sum(1).std().item()
    assert spread["log"] < spread["uniform"] / 2


def test_nll_protocol_records_t_and_k():
    p = make(timesteps=30, nll_timesteps=4).nll_protocol()
    assert p["timesteps"] == 30 and p["kl_terms_per_image"] == 4 and "strata" in p["estimator"]
    p = make(timesteps=30, nll_timesteps=100).nll_protocol()
    assert p["kl_terms_per_image"] == 29 and p["estimator"] == "exact sum"


# --- samplers ---------------------------------------------------------------------------------------
def count_calls(model: DDPM, fn) -> int:
    calls = []
    handle = model.net.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        fn()
    handle.remove()
    return len(calls)


def test_samplers_report_their_network_evaluations():
    m = make(timesteps=30, ddim_steps=7).eval()
    assert m.samplers() == {"ancestral": 30, "ddim": 7}
    for name, nfe in m.samplers().items():
        assert count_calls(m, lambda: m.sample(2, name)) == nfe
    assert count_calls(m, lambda: m.nll(structured_batch(2, (1, 8, 8)))) == 4 + 1  # K terms + decoder
    m = make(timesteps=30, ddim_steps=100)
    assert m.samplers()["ddim"] == 30  # DDIM never takes more steps than T


@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_samplers_are_finite_and_repeatable(sampler):
    m = perturbed(make((3, 8, 8), timesteps=30, ddim_steps=30))  # DDIM with S = T
    out = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        with torch.no_grad():
            out.append(m.sample(4, sampler))
    assert out[0].shape == (4, 3, 8, 8) and torch.isfinite(out[0]).all()
    assert out[0].abs().max() <= 1
    assert torch.equal(out[0], out[1]) and not torch.equal(out[0], out[2])


@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_samplers_draw_from_the_data_distribution_with_an_exact_denoiser(sampler):
    """With the exact eps of Gaussian data N(mu, s^2), both samplers return samples of mean mu and std s.
    (T = 1000: with few steps both samplers shrink the spread of such narrow data, by ~12% at T = 100.)"""
    m = make((1, 4, 4), timesteps=1000, ddim_steps=1000, clip_denoised=False).eval()
    mu, s = 0.3, 0.2
    m.net = GaussianOracle(m.abar, mu, s)
    torch.manual_seed(0)
    with torch.no_grad():
        x = m.sample(2000, sampler)  # (2000, 1, 4, 4)
    assert x.mean().item() == pytest.approx(mu, abs=0.01)
    assert x.std().item() == pytest.approx(s, rel=0.05)


@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_samplers_end_exactly_on_a_single_data_point(sampler):
    """When the data is one point (s = 0), the predicted x_0 is that point at every step, and the last step
    adds no noise: both samplers return it exactly."""
    m = make((1, 4, 4), timesteps=30, ddim_steps=7).eval()
    m.net = GaussianOracle(m.abar, 0.3, 0.0)
    with torch.no_grad():
        x = m.sample(50, sampler)
    torch.testing.assert_close(x, torch.full_like(x, 0.3), atol=1e-5, rtol=0)


# --- architecture -------------------------------------------------------------------------------------
@pytest.mark.parametrize("size, levels", [(16, [16, 8, 4]), (28, [28, 14, 7]), (32, [32, 16, 8, 4]),
                                          (64, [64, 32, 16, 8, 4])])
def test_unet_adapts_to_the_resolution(size, levels):
    m = make((3, size, size))
    assert m.net.resolutions == levels
    x = torch.randn(2, 3, size, size)
    assert m.net(x, torch.tensor([1, m.config.timesteps])).shape == x.shape


def test_training_lowers_the_loss():
    torch.manual_seed(0)
    m = make((1, 8, 8), timesteps=30)
    update = plain_update(m)
    x = structured_batch(16, (1, 8, 8))
    losses = [m.train_step(x, update)["loss"] for _ in range(40)]
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:10]) / 10
    assert math.isfinite(losses[-1])
