"""Glow invariants: the flow inverts, its log-determinant equals a brute-force log|det J|, actnorm's
data-dependent initialisation happens once and is saved, levels follow the resolution."""
import pytest
import torch

from trilemma.contract.likelihood import LOG_BINS, centre_transform, logit_transform
from trilemma.contract.family import build_config
from trilemma.contract.testing import structured_batch
from trilemma.contract.update import plain_update
from trilemma.models.glow import Glow, auto_levels, squeeze


def make(shape, perturb=0.1, **overrides):
    """A tiny Glow after its data init, in float64; ``perturb`` moves the zero-initialised layers
    (couplings, priors) off the identity so that every term of the log-determinant is exercised."""
    torch.manual_seed(0)
    model = Glow(build_config(Glow, "tiny", overrides), shape)
    model.data_init(structured_batch(16, shape))
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(perturb * torch.randn_like(p))
    return model.double()


def flat_latents(model, y):  # (1, C, H, W) -> (D,)
    return torch.cat([e.flatten(1) for e in model.encode(y)[0]], 1)[0]


@pytest.mark.parametrize("shape,levels,transform", [
    ((1, 4, 4), 2, "logit"), ((3, 4, 4), 1, "logit"), ((3, 4, 4), 2, "logit"), ((3, 4, 4), 2, "centre")])
def test_log_determinant_matches_brute_force_jacobian(shape, levels, transform):
    model = make(shape, levels=levels, transform=transform)
    y = torch.rand(1, *shape, dtype=torch.double)
    jac = torch.autograd.functional.jacobian(lambda v: flat_latents(model, v.view(1, *shape)), y)
    jac = jac.reshape(model.num_dims, model.num_dims)
    _, logdet = model.encode(y)
    sign, brute = torch.linalg.slogdet(jac)
    assert sign != 0
    torch.testing.assert_close(logdet[0], brute, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("shape,levels,transform", [
    ((1, 28, 28), 0, "logit"), ((3, 8, 8), 2, "logit"), ((3, 16, 16), 0, "centre")])
def test_decode_inverts_encode(shape, levels, transform):
    model = make(shape, levels=levels, transform=transform)
    y = torch.rand(3, *shape, dtype=torch.double)
    eps, _ = model.encode(y)
    assert sum(e[0].numel() for e in eps) == model.num_dims  # a bijection onto R^D
    torch.testing.assert_close(model.decode(eps), y, rtol=0, atol=1e-10)
    # and the other way round, from latents drawn from the prior (with milder weights: a random
    # network's inverse may expand a random latent far beyond the data, where rounding errors grow)
    model = make(shape, perturb=0.01, levels=levels, transform=transform)
    eps = [torch.randn_like(e) for e in eps]
    for a, b in zip(model.encode(model.decode(eps))[0], eps):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-8)


def test_nll_is_the_dequantized_density_bound():
    shape = (1, 8, 8)
    model = make(shape).float()
    x = structured_batch(4, shape)
    torch.manual_seed(3)
    nll = model.nll(x)
    torch.manual_seed(3)
    y = (x.float() + torch.rand(x.shape)) / 256  # the same draw of u as dequantize
    torch.testing.assert_close(nll, -model.log_prob(y) + model.num_dims * LOG_BINS)
    # a different draw of u gives a different (but close) bound: one draw per image
    assert not torch.equal(model.nll(x), nll)


def test_actnorm_data_init_runs_once_and_is_saved():
    shape = (1, 8, 8)
    torch.manual_seed(0)
    model = Glow(build_config(Glow, "tiny", {}), shape)
    assert not model.initialized
    x = structured_batch(32, shape)
    update = plain_update(model)
    model.train_step(x, update)
    assert model.initialized and "initialized" in model.state_dict()
    # The first actnorm was set so that the squeezed first batch has zero mean and unit variance.
    first = model.levels[0][0].layers[0]
    assert first.logs.abs().sum() > 0 and first.bias.abs().sum() > 0
    # A fresh model loading that state does not initialise again on a different batch.
    clone = Glow(build_config(Glow, "tiny", {}), shape)
    clone.load_state_dict(model.state_dict())
    clone.data_init = lambda x: pytest.fail("data init ran again after loading an initialised state")
    clone.train_step(255 - x, plain_update(clone))


@pytest.mark.parametrize("transform", ["logit", "centre"])
def test_actnorm_init_normalizes_the_first_batch(transform):
    shape = (3, 8, 8)
    torch.manual_seed(0)
    model = Glow(build_config(Glow, "tiny", {"transform": transform}), shape)
    x = structured_batch(64, shape)
    torch.manual_seed(1)
    model.data_init(x)
    torch.manual_seed(1)  # the same dequantization draw
    y = (x.float() + torch.rand(x.shape)) / 256
    z0 = logit_transform(y)[0] if transform == "logit" else centre_transform(y)[0]
    out, _ = model.levels[0][0].layers[0](squeeze(z0))  # the first actnorm's output
    torch.testing.assert_close(out.mean((0, 2, 3)), torch.zeros(12), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.std((0, 2, 3)), torch.ones(12), atol=1e-3, rtol=0)


def test_levels_follow_the_resolution():
    assert [auto_levels(s) for s in (8, 16, 28, 32, 64)] == [1, 2, 2, 3, 4]
    assert Glow(build_config(Glow, "tiny", {}), (3, 32, 32)).num_levels == 3


def test_temperature_zero_gives_one_sample():
    shape = (1, 8, 8)
    model = make(shape, temperature=0.0).float().eval()
    with torch.no_grad():
        s = model.sample(3)
    torch.testing.assert_close(s[0], s[1])
    model.config.temperature = 1.0
    with torch.no_grad():
        s = model.sample(3)
    assert not torch.allclose(s[0], s[1])


def test_bounded_coupling_scales_keep_tail_samples_finite():
    # Far from the identity, and latents far in the tail: the inverse must not overflow.
    shape = (1, 8, 8)
    model = make(shape, perturb=0.5, levels=2, steps=4).float()
    eps = [8 * torch.randn(16, *e.shape[1:]) for e in model.encode(torch.rand(1, *shape))[0]]
    with torch.no_grad():
        assert torch.isfinite(model.decode(eps)).all()
    # and every scale respects its bound, however large the input
    coupling = model.levels[0][0].layers[2]
    _, scale = coupling.params(1e4 * torch.randn(4, 2, 4, 4))
    assert scale.min() >= torch.sigmoid(torch.tensor(2.0 - coupling.bound)) * (1 - 1e-6)
