"""FFJORD's own assembly around the shared ODE density (tests/test_ode.py tests that module): with a
linear drift its NLL and bits/dim are the closed form (dequantization, logit transform, multiscale
squeezes and factoring out), Hutchinson's estimate is unbiased for the exact trace, sampling inverts
the encoding, and the NFE reported is the one measured."""
import math

import pytest
import torch
import torch.nn.functional as F

from trilemma.contract.family import build_config
from trilemma.contract.likelihood import LOG_BINS, bits_per_dim, logit_transform
from trilemma.contract.testing import structured_batch
from trilemma.contract.update import plain_update
from trilemma.models.ffjord import FFJORD
from trilemma.models.ode import standard_normal_log_prob

TIGHT = dict(rtol=1e-7, atol=1e-7, test_rtol=1e-7, test_atol=1e-7)


def make(shape, **overrides):
    torch.manual_seed(0)
    return FFJORD(build_config(FFJORD, "tiny", overrides), shape)


def linear_drifts(model, a):
    """Replace every drift by f(z, t) = -a z, a a parameter: z(1) = e^-a z(0), log-det -a per dim."""
    model.a = torch.nn.Parameter(torch.tensor(a))
    for pre, post in model.stages:
        for drift in [*pre, *post]:
            drift.forward = lambda t, z: -model.a * z


@pytest.mark.parametrize("scales", [1, 2])
def test_linear_drift_gives_the_closed_form_nll_and_bits_per_dim(scales):
    shape, a = (1, 4, 4), 0.3
    model = make(shape, scales=scales, blocks=1 if scales == 2 else 2, **TIGHT)
    linear_drifts(model, a)
    x = structured_batch(4, shape)
    assert model.nll_trace() == "exact"  # 16 dims: nll() takes the exact trace

    torch.manual_seed(3)
    y = (x.float() + torch.rand(x.shape)) / 256  # dequantize's draw of u
    h, logdet = logit_transform(y, model.config.alpha)
    if scales == 1:  # two blocks: z = e^-2a h
        log_p = standard_normal_log_prob(h * math.exp(-2 * a)) - 2 * a * 16 + logdet
    else:  # a block at 4x4, squeeze, a block at 4x2x2, factor out 2 channels, a block on the other 2
        u = F.pixel_unshuffle(h, 2)
        log_p = (standard_normal_log_prob(u[:, :2] * math.exp(-2 * a))
                 + standard_normal_log_prob(u[:, 2:] * math.exp(-3 * a)) - a * (16 + 16 + 8) + logdet)
    closed_form = -log_p + 16 * LOG_BINS

    model.eval()
    torch.manual_seed(3)
    with torch.no_grad():
        torch.testing.assert_close(model.nll(x), closed_form, rtol=1e-5, atol=1e-4)
    # train_step's loss is the bits/dim of the same estimate: for a linear drift Hutchinson's
    # eps^T (-a I) eps = -a D is exact, as eps is Rademacher
    model.train()
    torch.manual_seed(3)
    losses = model.train_step(x, plain_update(model))
    torch.testing.assert_close(losses["loss"], bits_per_dim(closed_form.mean(), 16), rtol=1e-5, atol=1e-5)
    assert model.a.item() != a  # and it trained the drift


def test_hutchinson_estimate_is_unbiased_for_the_exact_trace():
    shape = (1, 4, 4)
    model = make(shape, rtol=1e-6, atol=1e-6, test_rtol=1e-6, test_atol=1e-6).eval()
    y = torch.rand(1, *shape) * 0.9 + 0.05
    with torch.no_grad():
        exact, _ = model.log_prob(y, trace="exact")
        torch.manual_seed(1)
        draws, _ = model.log_prob(y.expand(2000, -1, -1, -1), trace="hutchinson")  # one eps per copy
    se = draws.std() / math.sqrt(len(draws))
    assert draws.std() > 0.05  # each draw is noisy...
    assert abs(draws.mean() - exact[0]) < 4 * se  # ...their mean is not biased


def test_decode_inverts_encode():
    shape = (1, 8, 8)
    model = make(shape, **TIGHT).double().eval()
    y = torch.rand(3, *shape, dtype=torch.float64) * 0.9 + 0.05
    with torch.no_grad():
        latents, _, _ = model.encode(y)
        assert [z.shape[1:] for z in latents] == [torch.Size(s) for s in model.latent_shapes]
        assert sum(z[0].numel() for z in latents) == model.num_dims
        y_back, _ = model.decode(latents)
    assert (y_back - y).abs().max() < 1e-5


def test_nfe_is_measured_from_the_solves():
    shape = (1, 8, 8)
    model = make(shape)
    losses = model.train_step(structured_batch(8, shape), plain_update(model))
    blocks = sum(len(pre) + len(post) for pre, post in model.stages)
    assert losses["nfe"] >= 2 * blocks  # dopri5 evaluates at least twice per solve
    assert model.samplers()["ode"] == int(losses["nfe"])  # nothing sampled yet: the density solve's
    model.eval()
    with torch.no_grad():
        model.sample(4)
        loose = model.samplers()["ode"]
        model.config.test_rtol = model.config.test_atol = 1e-6
        model.sample(4)
        tight = model.samplers()["ode"]
    assert isinstance(loose, int) and 2 * blocks <= loose < tight


def test_scales_follow_the_resolution():
    assert [make((1, s, s), scales=0).num_scales for s in (8, 16, 28, 32)] == [2, 3, 3, 4]
    assert make((1, 28, 28), scales=1).latent_shapes == [(1, 28, 28)]
