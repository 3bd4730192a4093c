"""Real NVP is a bijection whose log-determinant is exact: it inverts, its log |det J| equals the
brute-force Jacobian's (logit transform included), the density of an image does not depend on its
batch, and each coupling starts as the identity."""
import math

import pytest
import torch

from trilemma.contract.likelihood import logit_transform
from trilemma.contract.family import build_config
from trilemma.contract.testing import structured_batch
from trilemma.contract.update import plain_update
from trilemma.models.blocks import halvings as num_squeezes
from trilemma.models.realnvp import RealNVP


def make(shape, perturb=0.1, dtype=torch.float64):
    """A tiny Real NVP with randomised weights, so that no coupling or actnorm is the identity."""
    torch.manual_seed(0)
    model = RealNVP(build_config(RealNVP, "tiny", {}), shape).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(perturb * torch.randn_like(p))
    return model.eval()  # eval: no actnorm data-dependent initialisation overwrites the weights


@pytest.mark.parametrize("shape", [(1, 4, 4), (3, 8, 8), (1, 28, 28)])
def test_flow_inverts(shape):
    model = make(shape)
    y = torch.rand(4, *shape, dtype=torch.float64)  # dequantized images in [0, 1)
    z, _ = model.encode(y)
    assert z.shape == (4, math.prod(shape))
    assert (model.decode(z) - y).abs().max() < 1e-5
    # ... and the other way round, from latents drawn from the prior.
    z = torch.randn(4, math.prod(shape), dtype=torch.float64)
    assert (model.encode(model.decode(z))[0] - z).abs().max() < 1e-5


@pytest.mark.parametrize("shape", [(1, 4, 4), (3, 8, 8)])
def test_logdet_matches_the_brute_force_jacobian(shape):
    model = make(shape)
    y = torch.rand(1, *shape, dtype=torch.float64)
    _, logdet = model.encode(y)
    jac = torch.autograd.functional.jacobian(lambda v: model.encode(v.view(1, *shape))[0].view(-1),
                                             y.view(-1))  # (D, D): dz/dy, logit transform included
    sign, brute = torch.linalg.slogdet(jac)
    assert sign != 0
    torch.testing.assert_close(logdet[0], brute, rtol=1e-8, atol=1e-8)


def test_couplings_start_as_the_identity():
    # Zero-initialised output layers: at init the flow is the logit transform followed only by
    # squeezes and factor-outs, i.e. a permutation of the logit values.
    shape = (3, 8, 8)
    torch.manual_seed(0)
    model = RealNVP(build_config(RealNVP, "tiny", {}), shape).double().eval()
    y = torch.rand(2, *shape, dtype=torch.float64)
    z, logdet = model.encode(y)
    h, logit_logdet = logit_transform(y, model.config.alpha)
    torch.testing.assert_close(z.sort(dim=1).values, h.flatten(1).sort(dim=1).values)
    torch.testing.assert_close(logdet, logit_logdet)


def test_actnorm_initialises_once_from_the_first_training_batch():
    torch.manual_seed(0)
    model = RealNVP(build_config(RealNVP, "tiny", {}), (1, 28, 28))
    coupling, norm = model.scales[0].checker[0]
    seen = []
    norm.register_forward_hook(lambda mod, inp, out: seen.append(out[0].detach()))
    update = plain_update(model)
    model.train_step(structured_batch(16, (1, 28, 28)), update)
    out = seen[0]  # (B, C, H, W): the first batch, after the actnorm it initialised
    torch.testing.assert_close(out.mean(dim=(0, 2, 3)), torch.zeros(1), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.std(dim=(0, 2, 3), unbiased=False), torch.ones(1), atol=1e-3, rtol=0)
    assert bool(norm.initialized) and "scales.0.checker.0.1.initialized" in model.state_dict()
    before = norm.log_scale().detach().clone()
    model.train_step(structured_batch(16, (1, 28, 28), seed=1) // 2, update)  # different statistics
    assert (norm.log_scale() - before).abs().max() < 0.01  # one Adam step, not a second initialisation


def test_density_does_not_depend_on_the_batch():
    # No batch normalisation: an image's log p(y) is the same alone and among others.
    shape = (3, 8, 8)
    model = make(shape, dtype=torch.float32)
    model.train()  # even in training mode
    y = torch.rand(6, *shape)
    together = model.log_prob(y)
    alone = torch.cat([model.log_prob(y[i:i + 1]) for i in range(6)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-3)


def test_nll_is_the_dequantized_density_plus_the_bin_volume():
    shape = (1, 8, 8)
    model = make(shape, dtype=torch.float32)
    x = structured_batch(4, shape)
    torch.manual_seed(5)
    nll = model.nll(x)
    torch.manual_seed(5)
    y = (x.float() + torch.rand(x.shape)) / 256  # the same uniform dequantization draw
    expected = -model.log_prob(y) + 64 * math.log(256)
    torch.testing.assert_close(nll, expected)


@pytest.mark.parametrize("size,squeezes", [(4, 0), (8, 1), (16, 2), (28, 2), (32, 3), (64, 4)])
def test_scales_follow_the_resolution(size, squeezes):
    assert num_squeezes(size, size) == squeezes
    model = RealNVP(build_config(RealNVP, "tiny", {}), (3, size, size))
    assert len(model.scales) == squeezes + 1
    assert sum(math.prod(s) for s in model.z_shapes) == 3 * size * size  # every dimension has a latent
    assert model.z_shapes[-1][1:] == (size >> squeezes, size >> squeezes)  # the last scale's grid


def test_training_lowers_bits_per_dim():
    torch.manual_seed(0)
    model = RealNVP(build_config(RealNVP, "tiny", {}), (1, 28, 28))
    update = plain_update(model)
    x = structured_batch(16, (1, 28, 28))
    losses = [model.train_step(x, update)["loss"] for _ in range(25)]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3  # bits/dim (about 0.5 seen)
