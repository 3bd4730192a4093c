"""The VAE's bound: -ELBO >= the IWAE bound, a closed-form KL that is >= 0 and matches Monte Carlo,
gradients that stay finite on saturated pixels, and an architecture that follows the resolution."""
import math

import pytest
import torch

from trilemma.contract.family import build_config
from trilemma.contract.likelihood import to_signed
from trilemma.contract.testing import structured_batch
from trilemma.contract.update import plain_update
from trilemma.models.blocks import halvings as num_stages
from trilemma.models.vae import VAE, gaussian_log_prob


def make(shape=(1, 28, 28), **overrides):
    torch.manual_seed(0)
    return VAE(build_config(VAE, "tiny", overrides), shape)


def train(model, x, steps):
    update = plain_update(model)
    model.train()
    return [model.train_step(x, update)["loss_bpd"] for _ in range(steps)]


def test_negative_elbo_is_above_the_iwae_bound():
    model = make()
    x = structured_batch(32, (1, 28, 28))
    train(model, x, 20)  # an informative encoder, so q(z|x) differs from the prior
    model.eval()
    torch.manual_seed(1)
    with torch.no_grad():
        elbo = torch.stack([model.negative_elbo(x)["loss"] for _ in range(16)]).mean(0)  # (B,)
        iwae = model.iwae_nll(x, k=16)  # (B,)
    assert torch.isfinite(elbo).all() and torch.isfinite(iwae).all()
    assert elbo.mean() >= iwae.mean()


def test_kl_is_nonnegative_and_matches_monte_carlo():
    model = make()
    x = structured_batch(8, (1, 28, 28))
    train(model, x, 5)
    with torch.no_grad():
        kl = model.negative_elbo(x)["kl"]  # (B,) closed form
        mu, log_var = model.encoder(to_signed(x))  # (B, latent)
        z = mu + torch.exp(0.5 * log_var) * torch.randn(20000, *mu.shape)  # (N, B, latent)
        mc = (gaussian_log_prob(z, mu, log_var)
              - gaussian_log_prob(z, torch.zeros_like(z), torch.zeros_like(z))).mean(0)  # (B,)
    assert (kl >= 0).all()
    torch.testing.assert_close(kl, mc, atol=0.05 + 0.02 * float(kl.abs().max()), rtol=0)


def test_kl_is_zero_when_the_posterior_is_the_prior():
    model = make()
    with torch.no_grad():  # make the encoder output mu = 0, log_var = 0 for every image
        model.encoder.head.weight.zero_()
        model.encoder.head.bias.zero_()
    kl = model.negative_elbo(structured_batch(4, (1, 28, 28)))["kl"]
    assert torch.equal(kl, torch.zeros(4))


def test_log_scale_gradient_is_finite_on_saturated_pixels():
    # Pixels at 0 and 255 fall in the outer bins, which extend to -+infinity.
    model = make()
    x = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    x[:, :, :10] = 255
    x[:, :, 10:14] = 100
    model.negative_elbo(x)["loss"].mean().backward()
    grad = model.decoder.log_scale.grad
    assert torch.isfinite(grad).all() and (grad != 0).all()
    for p in model.parameters():
        assert torch.isfinite(p.grad).all()


def test_training_lowers_the_negative_elbo():
    losses = train(make(), structured_batch(16, (1, 28, 28)), 30)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < losses[0] - 0.25  # bits/dim; mostly the scale coming down


@pytest.mark.parametrize("shape,stages", [((3, 16, 16), 2), ((1, 28, 28), 2), ((3, 32, 32), 3),
                                          ((1, 64, 64), 4), ((3, 8, 8), 1)])
def test_architecture_follows_the_resolution(shape, stages):
    assert num_stages(*shape[1:]) == stages
    model = make(shape)
    model.eval()
    with torch.no_grad():
        s = model.sample(2)
        nll = model.nll(structured_batch(2, shape))
    assert s.shape == (2, *shape) and nll.shape == (2,)
    strided = [m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2)]
    assert len(strided) == stages


def test_nll_averages_the_requested_number_of_draws():
    model = make(nll_samples=4)
    assert model.nll_protocol()["latent_draws"] == 4
    x = structured_batch(4, (1, 28, 28))
    torch.manual_seed(3)
    with torch.no_grad():
        nll = model.nll(x)
        torch.manual_seed(3)
        draws = torch.stack([model.negative_elbo(x)["loss"] for _ in range(4)]).mean(0)
    torch.testing.assert_close(nll, draws)
