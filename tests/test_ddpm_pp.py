"""DDPM++ (continuous): the VP SDE's marginal is the closed form (against quadrature and a simulation of
the forward SDE), the probability-flow ODE's NLL of Gaussian data under its exact score is the Gaussian's
closed form, and both samplers draw from the Gaussian when given its exact score."""
import math

import pytest
import torch

from trilemma.contract.family import build_config
from trilemma.contract.likelihood import LOG_BINS
from trilemma.contract.update import plain_update
from trilemma.models.ddpm_pp import DDPMpp

SIGMA0 = 0.25  # the data: N(0, SIGMA0^2 I), well inside the samplers' clamp to [-1, 1]


def make(shape=(1, 2, 2), **overrides):
    torch.manual_seed(0)
    return DDPMpp(build_config(DDPMpp, "tiny", overrides), shape).eval()


def gaussian_model(**overrides):
    """The model with the exact noise prediction of N(0, SIGMA0^2 I) data: score = -x / var_t."""
    model = make(**overrides)

    def eps_model(x, t):
        m, s = (v[:, None, None, None] for v in model.marginal(t))
        return s * x / (m ** 2 * SIGMA0 ** 2 + s ** 2)  # eps = -s score

    model.eps_model = eps_model
    return model


def test_marginal_matches_quadrature_and_a_simulated_forward_sde():
    model = make()
    cfg = model.config
    t = torch.tensor([0.05, 0.3, 0.7, 1.0], dtype=torch.float64)
    m, s = model.marginal(t)
    # Closed form from the integral of beta: m = exp(-1/2 int_0^t beta), s^2 = 1 - m^2 (trapezoid rule).
    for i, ti in enumerate(t):
        grid = torch.linspace(0, float(ti), 20001, dtype=torch.float64)
        integral = torch.trapezoid(model.beta(grid), grid)
        assert float(m[i]) == pytest.approx(math.exp(-0.5 * integral), rel=1e-6)
        assert float(s[i]) == pytest.approx(math.sqrt(1 - math.exp(-integral)), rel=1e-6)
    # Euler-Maruyama on dx = -1/2 beta x dt + sqrt(beta) dw from x0 = 0.8: mean m x0, std s.
    g = torch.Generator().manual_seed(0)
    x, steps, t_end = torch.full((20000,), 0.8, dtype=torch.float64), 1000, 0.3
    dt = t_end / steps
    for k in range(steps):
        beta = cfg.beta_min + (k * dt) * (cfg.beta_max - cfg.beta_min)
        x = x - 0.5 * beta * x * dt + math.sqrt(beta * dt) * torch.randn(x.shape, generator=g, dtype=x.dtype)
    assert float(x.mean()) == pytest.approx(float(m[1]) * 0.8, abs=0.02)
    assert float(x.std()) == pytest.approx(float(s[1]), rel=0.03)


def test_ode_nll_of_a_gaussian_is_its_closed_form():
    model = gaussian_model(nll_rtol=1e-7, nll_atol=1e-7)
    assert model.nll_trace() == "exact"  # 4 dims
    z = torch.randn(16, 1, 2, 2) * SIGMA0
    eps = model.config.train_eps
    m, s = model.marginal(torch.tensor(eps))
    var = float(m ** 2 * SIGMA0 ** 2 + s ** 2)  # the marginal at t = eps, ~SIGMA0^2
    closed = -0.5 * (z ** 2 / var + math.log(2 * math.pi * var)).flatten(1).sum(1)
    torch.testing.assert_close(model.continuous_log_prob(z).detach(), closed, rtol=0, atol=2e-3)

    # nll() of uint8 images adds the dequantization and the [0, 1) -> [-1, 1] map, nothing else.
    x = torch.randint(96, 160, (8, 1, 2, 2), dtype=torch.uint8)
    torch.manual_seed(5)
    z = 2 * (x.float() + torch.rand(x.shape)) / 256 - 1
    gauss = 0.5 * (z ** 2 / var + math.log(2 * math.pi * var)).flatten(1).sum(1)
    expected = gauss - 4 * math.log(2) + 4 * LOG_BINS
    torch.manual_seed(5)
    torch.testing.assert_close(model.nll(x), expected, rtol=0, atol=2e-3)


@pytest.mark.parametrize("sampler", ["euler_maruyama", "predictor_corrector", "probability_flow"])
def test_samplers_draw_the_gaussian_under_its_exact_score(sampler):
    model = gaussian_model(sde_steps=200, ode_rtol=1e-4, ode_atol=1e-4)
    torch.manual_seed(1)
    x = model.sample(4000, sampler)  # (4000, 1, 2, 2): 16000 values, all well inside [-1, 1]
    assert float(x.mean()) == pytest.approx(0.0, abs=0.02)
    assert float(x.std()) == pytest.approx(SIGMA0, rel=0.04)
    if sampler == "probability_flow":
        assert model.samplers()["probability_flow"] > 1  # the measured NFE of the adaptive solve


def test_training_lowers_the_denoising_loss():
    torch.manual_seed(0)
    model = DDPMpp(build_config(DDPMpp, "tiny", {"lr": 3e-3}), (1, 8, 8))
    x = torch.zeros(32, 1, 8, 8, dtype=torch.uint8)
    x[:, :, 2:6, 2:6] = 255
    update = plain_update(model)
    losses = [float(model.train_step(x, update)["loss"]) for _ in range(30)]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_learning_rate_warms_up_linearly():
    model = DDPMpp(build_config(DDPMpp, "tiny", {"lr": 1e-3, "warmup": 4}), (1, 4, 4))
    assert [model.lr_factor("model", step) for step in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    update = plain_update(model)
    update.step = 1  # the harness's count of steps done
    model.train_step(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), update)
    assert update.optimizers["model"].param_groups[0]["lr"] == pytest.approx(5e-4)
