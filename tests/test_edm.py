"""EDM's own invariants: the preconditioning's unit variances, the loss weighting, the sigma schedule,
and the samplers (their NFE, and the data distribution from the exact denoiser of Gaussian data)."""
import math

import pytest
import torch

from trilemma.contract.family import build_config
from trilemma.contract.testing import structured_batch
from trilemma.contract.update import plain_update
from trilemma.models.edm import EDM, karras_sigmas

SIGMAS = torch.logspace(math.log10(0.002), math.log10(80.0), 12)  # the sampler's whole range


def make(shape=(1, 4, 4), **overrides) -> EDM:
    torch.manual_seed(0)
    return EDM(build_config(EDM, "tiny", overrides), shape)


def perturbed(model: EDM) -> EDM:
    with torch.no_grad():  # the output convolution starts at zero: give the network an output
        for p in model.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("sigma_data", [0.5, 0.8])
def test_network_inputs_and_targets_have_unit_variance_at_every_sigma(sigma_data):
    m = make(sigma_data=sigma_data)
    g = torch.Generator().manual_seed(0)
    for sigma in SIGMAS:
        y = sigma_data * torch.randn(20000, 1, 1, 1, generator=g)  # data of std sigma_data
        n = sigma * torch.randn(20000, 1, 1, 1, generator=g)
        net_in, target = m.network_io(y, n, sigma.expand(20000))
        assert net_in.var().item() == pytest.approx(1.0, rel=0.04), f"input at sigma {sigma:.3g}"
        assert target.var().item() == pytest.approx(1.0, rel=0.04), f"target at sigma {sigma:.3g}"


def test_loss_is_the_weighted_denoising_error():
    """lambda(sigma) ||D(y + n; sigma) - y||^2 with lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2
    equals the MSE of F against its effective target, which train_step minimises."""
    m = perturbed(make())
    y = torch.rand(5, 1, 4, 4) * 2 - 1
    sigma = torch.tensor([0.002, 0.1, 0.5, 3.0, 80.0])
    n = torch.randn_like(y) * sigma[:, None, None, None]
    sd = m.config.sigma_data
    lam = ((sigma ** 2 + sd ** 2) / (sigma * sd) ** 2)[:, None, None, None]
    with torch.no_grad():
        weighted = lam * (m.denoise(y + n, sigma) - y) ** 2
        net_in, target = m.network_io(y, n, sigma)
        in_f_units = (m.net(net_in, sigma.log() / 4) - target) ** 2
    torch.testing.assert_close(weighted, in_f_units, rtol=1e-3, atol=1e-4)


def test_training_draws_log_normal_sigmas():
    m = make()
    seen = []
    m.network_io = lambda y, n, sigma: seen.append(sigma) or (y, y)  # record the levels train_step draws
    torch.manual_seed(0)
    for _ in range(50):
        m.denoising_loss(torch.zeros(100, 1, 4, 4))
    log_sigma = torch.cat(seen).log()
    assert log_sigma.mean().item() == pytest.approx(m.config.p_mean, abs=0.06)
    assert log_sigma.std().item() == pytest.approx(m.config.p_std, abs=0.06)


def test_schedule_is_the_papers_rho_schedule():
    s = karras_sigmas(18, 0.002, 80.0, 7.0)
    assert len(s) == 19 and s[-1] == 0
    assert s[0].item() == pytest.approx(80.0) and s[17].item() == pytest.approx(0.002)
    assert (s[1:] < s[:-1]).all()
    i = 9  # eq. 5 at an inner step
    want = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert s[i].item() == pytest.approx(want)


@pytest.mark.parametrize("sampler", ["heun", "stochastic"])
def test_sampler_makes_2n_minus_1_network_evaluations(sampler):
    m = perturbed(make(steps=6))
    calls = []
    m.net.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        m.sample(2, sampler)
    assert len(calls) == m.samplers()[sampler] == 11


@pytest.mark.parametrize("sampler", ["heun", "stochastic"])
def test_samplers_draw_the_data_distribution_with_the_exact_denoiser(sampler):
    """(100 steps, and no S_noise inflation, which exists to offset a learned denoiser's errors: on data
    this narrow, 18 Heun steps overshoot the std by ~7%, converging as the steps grow.)"""
    mu, s = 0.3, 0.2
    m = make(steps=100, s_noise=1.0).eval()
    m.denoise = lambda x, sigma: mu + s ** 2 / (s ** 2 + sigma ** 2) * (x - mu)  # E[y | x] for y ~ N(mu, s^2)
    torch.manual_seed(0)
    with torch.no_grad():
        x = m.sample(2000, sampler)
    assert x.mean().item() == pytest.approx(mu, abs=0.01)
    assert x.std().item() == pytest.approx(s, rel=0.03)


def test_training_lowers_the_loss():
    m = make((1, 8, 8))
    update = plain_update(m)
    x = structured_batch(16, (1, 8, 8))
    torch.manual_seed(0)
    losses = [m.train_step(x, update)["loss"].item() for _ in range(40)]
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10
