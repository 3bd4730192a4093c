"""Variational GON invariants: the latent is the negative gradient at the origin; the ELBO is sound."""
import copy

import pytest
import torch

from trilemma.contract.family import build_config
from trilemma.contract.testing import structured_batch
from trilemma.contract.update import plain_update
from trilemma.models.blocks import halvings as num_stages
from trilemma.models.gon import GON


def make(shape=(1, 28, 28), **overrides):
    torch.manual_seed(0)
    return GON(build_config(GON, "tiny", overrides), shape)


def test_latent_is_negative_gradient_at_origin_per_image():
    model = make()
    x = structured_batch(4, (1, 28, 28))
    eps0 = torch.randn(4, model.config.latent_dim)
    h = model.latent(x, create_graph=False, eps0=eps0)  # (4, latent)
    # Independent computation: each image alone, its own zero vector, the loss of that image only.
    for i in range(4):
        z0 = torch.zeros(1, model.config.latent_dim, requires_grad=True)
        recon, kl = model.neg_elbo_terms(x[i:i + 1], z0, eps0[i:i + 1])
        (g,) = torch.autograd.grad(model.config.origin_loss_scale * (recon + kl).sum(), z0)
        torch.testing.assert_close(h[i:i + 1], -g, rtol=1e-4, atol=1e-5)
    assert h.abs().sum() > 0


def test_latent_matches_finite_differences_of_the_loss():
    # No autograd at all on the reference side: central differences in float64.
    model = make().double()
    x = structured_batch(2, (1, 28, 28))
    eps0 = torch.randn(2, model.config.latent_dim, dtype=torch.float64)
    h = model.latent(x, create_graph=False, eps0=eps0)
    delta = 1e-5
    with torch.no_grad():
        for k in range(model.config.latent_dim):
            e = torch.zeros(2, model.config.latent_dim, dtype=torch.float64)
            e[:, k] = delta
            up = sum(model.neg_elbo_terms(x, e, eps0))
            down = sum(model.neg_elbo_terms(x, -e, eps0))
            fd = model.config.origin_loss_scale * (up - down) / (2 * delta)  # (2,) d s*loss_i / d z0_k
            torch.testing.assert_close(h[:, k], -fd, rtol=1e-4, atol=1e-4)


def test_latent_does_not_depend_on_the_rest_of_the_batch():
    model = make()
    x = structured_batch(6, (1, 28, 28))
    eps0 = torch.randn(6, model.config.latent_dim)
    full = model.latent(x, create_graph=False, eps0=eps0)
    part = model.latent(x[:2], create_graph=False, eps0=eps0[:2])
    torch.testing.assert_close(full[:2], part)


def test_training_differentiates_through_the_origin_gradient():
    model = make()
    x = structured_batch(4, (1, 28, 28))
    h = model.latent(x, create_graph=True)
    assert h.requires_grad, "the latent must stay differentiable w.r.t. the parameters"
    # A loss on h alone reaches the decoder only through the second-order (gradient-of-gradient) path.
    h.pow(2).sum().backward()
    assert model.decoder.out.weight.grad is not None and model.decoder.out.weight.grad.abs().sum() > 0


def test_elbo_terms_finite_and_kl_nonnegative():
    model = make()
    update = plain_update(model)
    x = structured_batch(8, (1, 28, 28))
    for _ in range(3):
        losses = model.train_step(x, update)
    assert all(torch.isfinite(torch.as_tensor(v)) for v in losses.values())
    h = model.latent(x, create_graph=False)
    for scale in (0.0, 1.0, 3.0):  # the origin, the GON latent, and a farther one
        recon, kl = model.neg_elbo_terms(x, scale * h, torch.randn_like(h))
        assert torch.isfinite(recon).all() and torch.isfinite(kl).all()
        assert (kl >= 0).all(), f"negative KL {kl.min().item()} at scale {scale}"
        assert (recon > 0).all()  # -log of a probability of a discrete image
    # KL is zero exactly when q is the prior.
    model.fc_mu.weight.data.zero_(), model.fc_mu.bias.data.zero_()
    model.fc_logvar.weight.data.zero_(), model.fc_logvar.bias.data.zero_()
    _, kl = model.neg_elbo_terms(x, h, torch.randn_like(h))
    torch.testing.assert_close(kl, torch.zeros_like(kl))


def test_nll_runs_under_no_grad_and_is_the_negative_elbo():
    model = make()
    model.eval()
    x = structured_batch(4, (1, 28, 28))
    torch.manual_seed(3)
    with torch.no_grad():
        nll = model.nll(x)
    torch.manual_seed(3)
    eps0 = torch.randn(4, model.config.latent_dim)
    h = model.latent(x, create_graph=False, eps0=eps0)
    recon, kl = model.neg_elbo_terms(x, h, torch.randn_like(h))
    torch.testing.assert_close(nll, (recon + kl).detach())


@pytest.mark.parametrize("size,stages", [(28, 2), (32, 3), (16, 2), (64, 4), (8, 1)])
def test_decoder_adds_one_stage_per_doubling(size, stages):
    assert num_stages(size, size) == stages
    model = make((3, size, size))
    with torch.no_grad():
        assert model.sample(2).shape == (2, 3, size, size)


def test_nll_works_on_a_frozen_copy_like_the_harness_ema():
    # The harness evaluates a deep copy with requires_grad_(False): the origin gradient must still flow.
    model = make()
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    x = structured_batch(4, (1, 28, 28))
    eps0 = torch.randn(4, model.config.latent_dim)
    with torch.no_grad():
        h = frozen.latent(x, create_graph=False, eps0=eps0)
        nll = frozen.nll(x)
    torch.testing.assert_close(h, model.latent(x, create_graph=False, eps0=eps0))
    assert torch.isfinite(nll).all() and h.abs().sum() > 0
