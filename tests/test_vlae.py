"""VLAE invariants: the decoder is causal with exactly the small receptive field it is configured
for and depends on z; the AF prior's log-determinant matches a brute-force Jacobian and it inverts;
the cached sampler reads the full decoder's conditionals; the KL estimate vanishes when q is p."""
import pytest
import torch

from trilemma.contract.family import build_config
from trilemma.contract.likelihood import from_signed
from trilemma.contract.testing import structured_batch
from trilemma.contract.update import plain_update
from trilemma.models.vlae import VLAE, AFPrior


def make(shape, **overrides):
    torch.manual_seed(0)
    return VLAE(build_config(VLAE, "tiny", overrides), shape)


def dependencies(model, shape):
    """dep[c, i, j] = (C, H, W) bool map of the input subpixels that logits[:, c, i, j] depend on, and
    whether every output depends on z. Gradients at 16 random inputs at once (a path switched off by
    chance at one input is not off at all of them)."""
    model = model.double()
    x = torch.randn(16, *shape, dtype=torch.double, requires_grad=True)
    z = torch.randn(16, model.config.latent_dim, dtype=torch.double, requires_grad=True)
    logits = model.logits(x, z)  # (16, 256, C, H, W)
    c, h, w = shape
    dep = torch.zeros(c, h, w, c, h, w, dtype=torch.bool)
    sees_z = True
    for ch in range(c):
        for i in range(h):
            for j in range(w):
                gx, gz = torch.autograd.grad(logits[:, :, ch, i, j].sum(), (x, z), retain_graph=True)
                dep[ch, i, j] = gx.abs().sum(0) != 0  # images are independent: per-image grads
                sees_z &= bool(gz.abs().sum() != 0)
    return dep, sees_z


@pytest.mark.parametrize("shape,layers", [((1, 9, 9), 2), ((3, 7, 7), 2), ((1, 10, 10), 3)])
def test_decoder_is_causal_with_the_configured_receptive_field(shape, layers):
    model = make(shape, layers=layers)
    up, side = model.receptive_field()
    assert (up, side) == (1 + layers, layers)  # 3x3 kernels: one row and one column per layer
    dep, sees_z = dependencies(model, shape)
    assert sees_z  # p(x_i | x_<i, z) depends on z at every subpixel
    c, h, w = shape
    ch, row, col = torch.meshgrid(torch.arange(c), torch.arange(h), torch.arange(w), indexing="ij")
    order = (row * w + col) * c + ch  # (C, H, W): position of each subpixel in the sequence
    for k in range(c):
        for i in range(h):
            for j in range(w):
                earlier = order < order[k, i, j]
                window = (row >= i - up) & (row <= i) & (col >= j - side) & (col <= j + side)
                assert not (dep[k, i, j] & ~(earlier & window)).any(), (k, i, j)
    # The field is as large as configured, not smaller: at a pixel far from the borders it reaches
    # the top row of its window and both side columns of the row above.
    i, j = h - 1, w // 2
    seen = dep[0, i, j].any(0)  # (H, W): pixels any channel of which is seen
    assert seen[i - up].any() and seen[i - 1, j - side] and seen[i - 1, j + side]
    assert seen[i, j - side] and not seen[i, j + 1:].any()


def test_prior_log_determinant_matches_a_brute_force_jacobian():
    torch.manual_seed(1)
    prior = AFPrior(d=4, steps=3, hidden=12).double()
    for made in prior.steps:  # away from the zero (identity) initialisation
        torch.nn.init.normal_(made.out.weight, std=0.5)
        torch.nn.init.normal_(made.out.bias, std=0.5)
    z = torch.randn(5, 4, dtype=torch.double)
    eps, logdet = prior(z)
    for b in range(5):
        jac = torch.autograd.functional.jacobian(lambda v: prior(v[None])[0][0], z[b])  # (4, 4)
        torch.testing.assert_close(torch.linalg.slogdet(jac).logabsdet, logdet[b])
        assert not torch.allclose(jac, torch.diag(torch.diagonal(jac)))  # not a trivial flow
    torch.testing.assert_close(prior.inverse(eps), z)


def test_prior_starts_as_the_standard_normal():
    prior = make((1, 8, 8)).prior
    z = torch.randn(6, 4)
    eps, logdet = prior(z)
    assert torch.equal(eps, z) and torch.equal(logdet, torch.zeros(6))


def test_kl_estimate_is_zero_when_the_posterior_is_the_prior():
    model = make((1, 8, 8))
    with torch.no_grad():  # encoder outputs mu = 0, log_var = 0; the prior starts as N(0, I)
        model.encoder.head.weight.zero_()
        model.encoder.head.bias.zero_()
        terms = model.negative_elbo(structured_batch(4, (1, 8, 8)))
    torch.testing.assert_close(terms["kl"], torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(terms["loss"], terms["rec"] + terms["kl"])


@pytest.mark.parametrize("shape", [(1, 7, 7), (3, 5, 5)])
def test_cached_sampler_uses_the_full_decoders_conditionals(shape):
    model = make(shape).eval()
    up, side = model.receptive_field()
    assert up < shape[1] - 1 and side < shape[2] - 1  # larger than the field: the crops are exercised
    seen, latents = [], []
    hooks = [model.decoder.head2.register_forward_hook(lambda m, i, out: seen.append(out[:, :, 0, -1])),
             model.condition.register_forward_hook(lambda m, inp, out: latents.append(inp[0]))]
    torch.manual_seed(1)
    with torch.no_grad():
        s = model.sample(4)
        for hook in hooks:
            hook.remove()
        full = model.logits(s, latents[0])  # (4, 256, C, H, W)
    c, h, w = shape
    assert len(seen) + model.config.latent_dim * model.config.flow_steps == model.samplers()["ancestral"]
    assert len(seen) == c * h * w
    k = 0
    for i in range(h):
        for j in range(w):
            for ch in range(c):
                step = seen[k].view(4, c, 256)[:, ch]  # (4, 256)
                torch.testing.assert_close(step, full[:, :, ch, i, j], atol=1e-4, rtol=1e-4)
                k += 1
    assert torch.equal(from_signed(s).float() / 127.5 - 1, s)  # samples lie on the 256 levels


def test_training_lowers_the_negative_elbo():
    shape = (1, 8, 8)
    model = make(shape, lr=1e-2)
    update = plain_update(model)
    x = structured_batch(16, shape)
    with torch.no_grad():
        before = model.nll(x).mean()
    for _ in range(30):
        model.train_step(x, update)
    with torch.no_grad():
        after = model.nll(x).mean()
    assert after < 0.8 * before
