"""Residual Flow invariants: each block is contractive (its convolutions' operator norms and its Jacobian
stay below the coefficient, in the evaluated EMA too), its fixed-point inverse inverts, the Russian-roulette
log-determinant and its Neumann-series gradient are unbiased for the brute-force ones, the importance
weights' log density is the exact change of variables, and the NFE is the iteration count."""
import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from trilemma.contract.errors import TrilemmaError
from trilemma.contract.family import build_config
from trilemma.contract.likelihood import LOG_BINS, logit_transform
from trilemma.contract.testing import structured_batch
from trilemma.contract.update import plain_update
from trilemma.models.ode import standard_normal_log_prob
from trilemma.models.resflow import ResidualBlock, ResidualFlow, SNConv2d
from trilemma.run.loop import update_ema


def config(**overrides):
    return build_config(ResidualFlow, "tiny", overrides)


def block(c=2, size=(2, 2), scale=3.0, fc=False, **overrides):
    """A tiny block in float64 whose raw weights are scaled up, so spectral normalisation is active
    (``fc``: a fully connected end block, on (c, 1, 1) inputs)."""
    torch.manual_seed(0)
    b = ResidualBlock(c, size, config(**overrides), first=False, fc=fc).double()
    with torch.no_grad():
        for m in b.modules():
            if isinstance(m, SNConv2d):
                m.weight.mul_(scale)
                m.power_iteration(500)
    return b


def conv_matrix(conv, size):
    """The (C_out HW, C_in HW) matrix of a conv with its normalised weight, column by column."""
    c_in = conv.in_channels
    basis = torch.eye(c_in * size[0] * size[1], dtype=conv.weight.dtype).view(-1, c_in, *size)
    out = F.conv2d(basis, conv.normalized_weight(), padding=conv.padding)  # (C_in HW, C_out, H, W)
    return out.flatten(1).T


def jacobian_of_g(b, x):  # x (1, C, H, W) -> dg/dx (D, D)
    d = x.numel()
    return torch.autograd.functional.jacobian(lambda v: b.g(v.view_as(x)).flatten(), x.flatten()).view(d, d)


def test_spectral_norm_bounds_each_convolution_operator():
    b = block(c=2, size=(4, 4), hidden=6)
    for conv in (m for m in b.modules() if isinstance(m, SNConv2d)):
        sigma = torch.linalg.matrix_norm(conv_matrix(conv, (4, 4)), ord=2)
        # the raw weights were scaled far above the bound, so it is met with equality
        assert abs(sigma - conv.coeff) < 1e-6 * conv.coeff, float(sigma)


def test_block_lipschitz_constant_is_below_its_coefficient():
    b = block(c=2, size=(4, 4), hidden=6, coeff=0.9)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):  # the Jacobian's spectral norm at random points, and a secant
        x = 3 * torch.randn(1, 2, 4, 4, dtype=torch.float64, generator=g)
        assert torch.linalg.matrix_norm(jacobian_of_g(b, x), ord=2) < 0.9
        y = x + torch.randn(x.shape, dtype=torch.float64, generator=g)
        assert (b.g(x) - b.g(y)).norm() < 0.9 * (x - y).norm()


def test_fixed_point_inverse_inverts_a_block_and_the_flow():
    b = block(c=2, size=(4, 4), hidden=6, coeff=0.9, inverse_tol=1e-12, inverse_max_iters=500).eval()
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        y, _ = b(x)
        x_back, evals = b.inverse(y)
    assert (x_back - x).abs().max() < 1e-10 and 1 < evals < 500
    # the whole flow, logit transform, actnorms and squeezes included
    shape = (1, 8, 8)
    torch.manual_seed(0)
    model = ResidualFlow(config(coeff=0.9, inverse_tol=1e-10, inverse_max_iters=400), shape)
    model.train_step(structured_batch(8, shape), plain_update(model))  # actnorm's data init
    model = model.double().eval()
    y = torch.rand(2, *shape, dtype=torch.float64) * 0.9 + 0.05
    with torch.no_grad():
        z, _ = model.encode(y)
        y_back, evals = model.decode(z)
    assert (y_back - y).abs().max() < 1e-8 and evals > model.num_scales


def near_identity_block(roulette):
    """A block on (2, 2, 2) inputs whose g is close to 0.45 I: every conv a centre-tap identity plus a
    little noise (normalised to coeff 0.8), biases of +4 so that each LipSwish works near its slope of
    0.94. Then the series' higher terms matter (log det = 8 log 1.45 + noise, its first term 8 * 0.45)."""
    torch.manual_seed(0)
    b = ResidualBlock(2, (2, 2), config(hidden=4, coeff=0.8, exact_terms=1, roulette=roulette), first=True)
    with torch.no_grad():
        for conv in (m for m in b.modules() if isinstance(m, SNConv2d)):
            centre = conv.weight.shape[-1] // 2
            conv.weight.mul_(0.05)
            for i in range(min(conv.in_channels, conv.out_channels)):
                conv.weight[i, i, centre, centre] += 1.0
            conv.bias.fill_(4.0)
    b = b.double()
    for conv in (m for m in b.modules() if isinstance(m, SNConv2d)):
        conv.power_iteration(500)
    return b.train()


def roulette_draws(b, x, draws):
    """Per draw of N (shared by the batch of probes): the batch means of the training-mode log-det
    estimate and of its gradient (Neumann series, through the memory-efficient backward)."""
    params = list(b.g.parameters())
    values, grads = [], []
    for _ in range(draws):
        xr = x.clone().requires_grad_(True)
        _, logdet = b(xr)
        logdet.mean().backward()  # a mean, as the training loss
        values.append(logdet.mean().detach())
        grads.append(torch.cat([xr.grad.sum(0).flatten()] + [p.grad.flatten() for p in params]))
        for p in params:
            p.grad = None
    return torch.stack(values), torch.stack(grads)


@pytest.mark.parametrize("roulette", ["poisson", "geometric"])
def test_russian_roulette_logdet_and_neumann_gradient_are_unbiased(roulette):
    # exact_terms=1: every term after the first is kept at random, so an error in the roulette's
    # weights shows; 32 Hutchinson probes per draw of N.
    b = near_identity_block(roulette)
    x = torch.randn(1, 2, 2, 2, dtype=torch.float64)
    params = list(b.g.parameters())

    # The brute force: log det(I + J) and its gradient, through the same normalised weights.
    xe = x.clone().requires_grad_(True)
    jac = torch.autograd.functional.jacobian(lambda v: b.g(v).flatten(), xe, create_graph=True).view(8, 8)
    exact = torch.linalg.slogdet(torch.eye(8, dtype=x.dtype) + jac)[1]
    exact_grads = torch.autograd.grad(exact, [xe] + params, allow_unused=True)  # the last bias: unused
    exact_grad = torch.cat([(torch.zeros_like(p) if g is None else g).flatten()
                            for g, p in zip(exact_grads, [xe] + params)])
    exact = exact.detach()

    torch.manual_seed(2)
    values, grads = roulette_draws(b, x.expand(32, -1, -1, -1), 200)
    se = values.std() / math.sqrt(len(values))
    assert abs(values.mean() - exact) < 4 * se and se < 0.02 * abs(exact)
    # the first term alone (the truncation that the roulette corrects) is far off: the test has power
    assert abs(torch.trace(jac) - exact) > 10 * se

    # The Neumann-series gradient, along the exact gradient and across it.
    unit = exact_grad / exact_grad.norm()
    across = torch.randn(len(unit), dtype=x.dtype)
    across = across - (across @ unit) * unit
    for direction, target in ((unit, exact_grad.norm()), (across / across.norm(), 0.0)):
        proj = grads @ direction
        se = proj.std() / math.sqrt(len(proj))
        assert abs(proj.mean() - target) < 4 * se and se < 0.05 * exact_grad.norm()


def test_memory_efficient_backward_of_g_matches_autograd():
    # Through y alone (the log-det unused) the gradients equal plain autograd's of x + g(x).
    b = block(c=2, size=(4, 4), hidden=6).train()
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    y, _ = b(x)
    got = torch.autograd.grad((y * w).sum(), [x] + list(b.g.parameters()))
    b.eval()  # no power iteration, the same normalised weights
    want = torch.autograd.grad(((x + b.g(x)) * w).sum(), [x] + list(b.g.parameters()))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)


def test_nll_is_the_dequantized_bound_of_the_estimated_density():
    shape = (1, 8, 8)
    torch.manual_seed(0)
    model = ResidualFlow(config(), shape)
    x = structured_batch(4, shape)
    model.train_step(x, plain_update(model))
    model.eval()
    with torch.no_grad():
        torch.manual_seed(3)
        nll = model.nll(x)
        torch.manual_seed(3)  # the same u, then the same probes and roulette draws
        y = (x.float() + torch.rand(x.shape)) / 256
        torch.testing.assert_close(nll, -model.log_prob(y) + model.num_dims * LOG_BINS)


@pytest.mark.parametrize("old", [0.3, 0.5])
def test_the_evaluated_ema_keeps_every_convolution_within_its_coefficient(old):
    # Five large steps move the live weights far; the harness's EMA then averages the weights (a share
    # `old` of the initial ones left) but copies the live power-iteration vectors, which belong to other
    # weights. Evaluating it must bring every convolution's operator norm back within its bound.
    shape = (1, 8, 8)
    torch.manual_seed(0)
    model = ResidualFlow(config(lr=0.05), shape)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    update = plain_update(model)
    for _ in range(5):
        model.train_step(structured_batch(16, shape), update)
    update_ema(ema, model, 0, 64, SimpleNamespace(ema_halflife_images=64 / math.log2(1 / old), ema_rampup=0))
    pairs = [(a, b) for a, b in zip(ema.modules(), model.modules()) if isinstance(a, SNConv2d)]
    with torch.no_grad():
        moved = torch.cat([(a.weight - b.weight).flatten() for a, b in pairs]).norm()
        distance = float(moved / torch.cat([b.weight.flatten() for _, b in pairs]).norm())
        assert 0.2 <= distance <= 0.5, distance  # the EMA is 20-50 % away from the live weights
        assert torch.isfinite(ema.nll(structured_batch(4, shape))).all()  # evaluated, as the harness does
        for conv, _ in pairs:
            sigma = torch.linalg.matrix_norm(conv_matrix(conv, conv.u.shape[-2:]), ord=2)
            assert sigma <= conv.coeff * (1 + 1e-5), float(sigma)


def flow_map(model, y):
    """z(y) of the flow, fully connected end blocks included, every step differentiable (encode
    detaches g's output in evaluation)."""
    h, _ = model.first_norm(logit_transform(y, model.config.alpha)[0])
    for scale, pairs in enumerate(model.scales):
        h = F.pixel_unshuffle(h, 2) if scale else h
        for block, norm in pairs:
            h, _ = norm(h + block.g(h))
    shape, h = h.shape, h.reshape(len(h), -1, 1, 1)
    for block, norm in model.fc:
        h, _ = norm(h + block.g(h))
    return h.reshape(shape)


def test_dequantized_log_prob_is_the_exact_change_of_variables():
    # log N(z(y)) + log |det dz/dy| by brute force through the whole flow (logit, actnorms, blocks,
    # squeeze), against the blocks' exact log-determinants that the importance-weighted NLL uses.
    shape = (1, 8, 8)
    torch.manual_seed(0)
    model = ResidualFlow(config(coeff=0.9), shape)
    model.train_step(structured_batch(8, shape), plain_update(model))  # actnorm's data init
    model = model.double().eval()
    y = torch.rand(3, *shape, dtype=torch.float64) * 0.9 + 0.05
    want = []
    for yi in y:
        jac = torch.autograd.functional.jacobian(lambda v: flow_map(model, v.view(1, *shape)).flatten(), yi)
        z = flow_map(model, yi[None])
        want.append(standard_normal_log_prob(z)[0] + torch.linalg.slogdet(jac.view(64, 64))[1])
    got = model.dequantized_log_prob(y)
    torch.testing.assert_close(got, torch.stack(want).detach(), rtol=1e-9, atol=1e-8)
    torch.testing.assert_close(model.dequantized_log_prob(y), got)  # no Monte-Carlo draw in it


def test_nfe_is_the_fixed_point_iteration_count():
    shape = (1, 8, 8)
    torch.manual_seed(0)
    model = ResidualFlow(config(inverse_tol=1e-3), shape)
    assert model.samplers() == {"fixed_point": model.num_scales * 100}  # before sampling: the bound
    model.train_step(structured_batch(8, shape), plain_update(model))
    model.eval()
    with torch.no_grad():
        model.sample(4)
        loose = model.samplers()["fixed_point"]
        model.config.inverse_tol = 1e-8
        model.sample(4)
        tight = model.samplers()["fixed_point"]
    # At 1e-8, below float32's resolution, the iteration may run to its cap: the bound, at most.
    assert model.num_scales <= loose < tight <= model.num_scales * 100


def test_config_rejects_a_non_contractive_coefficient():
    with pytest.raises(TrilemmaError, match="'config.coeff' must be in"):
        config(coeff=1.0)
