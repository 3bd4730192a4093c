"""The options that give three families their papers' CIFAR-10 layouts: IGEBM's ``resnet32`` (the authors'
network, layer for layer), Real NVP's ``scales`` and ``widths``, and Residual Flow's fully connected end
blocks (contractive, invertible, with exact and estimated log-determinants that agree with brute force)."""
import math

import pytest
import torch
import torch.nn.functional as F

from trilemma.contract.errors import TrilemmaError
from trilemma.contract.family import build_config
from trilemma.contract.testing import check_contract, structured_batch
from trilemma.contract.update import plain_update
from trilemma.models.igebm import IGEBM, AuthorsBlock, CappedSpectralNorm, ResNet32
from trilemma.models.ode import standard_normal_log_prob
from trilemma.models.realnvp import RealNVP
from trilemma.models.resflow import ResidualFlow, SNConv2d

from test_resflow import block, flow_map  # z(y) through the whole flow, FC blocks included


def with_tiny(cls, **overrides):
    """``cls`` whose tiny preset (the one check_contract builds) has ``overrides``."""
    return type(cls.__name__, (cls,), {"presets": {**cls.presets, "tiny": {**cls.presets["tiny"], **overrides}}})


# --- IGEBM: the authors' ResNet32 ----------------------------------------------------------------

# openai/ebm_code_release models.py, ResNet32.construct_weights with num_filters 128 (3x3 kernels):
# (c_in, c_out) of each residual block in order; res_2 changes the width, so it has an adaptive 3x3 conv.
AUTHORS_BLOCKS = [(128, 128), (128, 128), (128, 256), (256, 256), (256, 256), (256, 256)]
AUTHORS_POOLING = [True, False, True, False, True, False]  # res_optim, res_2, res_4 pool (after the convs)


def test_resnet32_is_the_authors_cifar10_network():
    cfg = build_config(IGEBM, "cifar10_gpu", {})
    assert cfg.network == "resnet32" and cfg.conditional
    # the energy network alone (the model's 10,000-image replay buffer takes seconds to draw)
    net = ResNet32((3, 32, 32), cfg.channels, cfg.max_channels, cfg.blocks_per_level, cfg.activation,
                   cfg.spectral_norm, cfg.num_classes)
    assert net.stem.weight.shape == (128, 3, 3, 3) and net.stem.bias is None
    blocks = list(net.blocks)
    assert [(b.conv1.in_channels, b.conv1.out_channels) for b in blocks] == AUTHORS_BLOCKS
    assert [b.downsample for b in blocks] == AUTHORS_POOLING
    for b, (c_in, c_out) in zip(blocks, AUTHORS_BLOCKS):
        assert b.conv2.weight.shape == (c_out, c_out, 3, 3)
        assert (b.skip.weight.shape == (c_out, c_in, 3, 3)) if c_in != c_out else isinstance(b.skip, torch.nn.Identity)
        # the code's per-class tables: gb before each conv, g after the second, and its class bias cb
        assert b.bias1.shape == (10, c_in) and b.bias2.shape == (10, c_out) and b.gain.shape == (10, c_out)
        assert b.gain_offset.shape == (c_out,)
    assert net.head.weight.shape == (1, 256) and not hasattr(net.head, "parametrizations")  # fc5: no SN


def test_the_second_convolution_is_only_ever_scaled_down():
    torch.manual_seed(0)
    block = AuthorsBlock(4, 4, False, F.silu, True, 0).train()
    cap = block.conv2.parametrizations.weight[0]
    assert isinstance(cap, CappedSpectralNorm)
    raw = block.conv2.parametrizations.weight.original
    x = torch.randn(2, 4, 6, 6)
    for scale, expected in ((1e12, 1.0), (None, None)):  # from std 1e-10 to 100: sigma far above 1
        with torch.no_grad():
            if scale:
                raw.mul_(scale)
            else:  # a weight of norm 0.5 is left as it is
                raw.mul_(0.5 / torch.linalg.matrix_norm(raw.flatten(1), ord=2))
            for _ in range(50):
                block(x, None)  # one power iteration per training forward
        sigma = torch.linalg.matrix_norm(block.conv2.weight.detach().flatten(1), ord=2)
        if expected:
            assert sigma == pytest.approx(expected, rel=1e-4)
        else:
            torch.testing.assert_close(block.conv2.weight, raw.detach())
    # At initialisation the block is nearly its skip path (the code's zero-initialised conv2).
    fresh = AuthorsBlock(4, 4, False, F.silu, True, 0)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, None), F.silu(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("conditional", [True, False])
def test_resnet32_keeps_the_contract(conditional):
    check_contract(with_tiny(IGEBM, network="resnet32", conditional=conditional), (3, 8, 8))


def test_resnet32_energy_depends_on_the_class_after_training():
    torch.manual_seed(0)
    model = IGEBM(build_config(IGEBM, "tiny", {"network": "resnet32"}), (3, 8, 8)).eval()
    x, zeros = torch.rand(4, 3, 8, 8) * 2 - 1, torch.zeros(4, dtype=torch.long)
    with torch.no_grad():  # the tables start neutral
        torch.testing.assert_close(model.energy(x, zeros), model.energy(x, zeros + 1))
    update = plain_update(model)
    model.train()
    for _ in range(3):
        model.train_step(structured_batch(8, (3, 8, 8)), update, labels=torch.arange(8) % 10)
    model.eval()
    with torch.no_grad():
        assert (model.energy(x, zeros) - model.energy(x, zeros + 1)).abs().max() > 1e-6  # 4e-5 seen


# --- Real NVP: scales and per-scale widths -------------------------------------------------------

def realnvp(shape, **overrides):
    torch.manual_seed(0)
    model = RealNVP(build_config(RealNVP, "tiny", overrides), shape).double()
    with torch.no_grad():  # no coupling or actnorm the identity
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def test_scales_and_widths_set_the_layout():
    model = realnvp((3, 16, 16), scales=2, widths=(4, 6))  # the resolution alone would give 3 scales
    assert len(model.scales) == 2 and model.z_shapes == [(6, 8, 8), (6, 8, 8)]
    first, last = model.scales
    assert [c.net.inp.v.shape[0] for c, _ in first.checker] == [4] * 3  # the 16x16 grid's width
    assert [c.net.inp.v.shape[0] for c, _ in first.channel] == [6] * 3  # the squeezed grid's: the next
    assert [c.net.inp.v.shape[0] for c, _ in last.checker] == [6] * 4
    assert realnvp((3, 16, 16), scales=1).z_shapes == [(3, 16, 16)]  # one scale: checkerboards only


def test_a_two_scale_flow_with_two_widths_inverts_and_its_logdet_is_exact():
    shape = (3, 8, 8)
    model = realnvp(shape, scales=2, widths=(4, 6))
    y = torch.rand(2, *shape, dtype=torch.float64)
    z, logdet = model.encode(y)
    assert (model.decode(z) - y).abs().max() < 1e-6
    jac = torch.autograd.functional.jacobian(lambda v: model.encode(v.view(1, *shape))[0].view(-1), y[0].view(-1))
    torch.testing.assert_close(logdet[0], torch.linalg.slogdet(jac)[1], rtol=1e-8, atol=1e-8)


def test_a_layout_the_images_cannot_have_is_one_error_naming_the_key():
    with pytest.raises(TrilemmaError, match="'scales'"):
        RealNVP(build_config(RealNVP, "tiny", {"scales": 3}), (3, 8, 8))  # 8 -> 4 is the last squeeze
    with pytest.raises(TrilemmaError, match="'widths'"):
        RealNVP(build_config(RealNVP, "tiny", {"widths": (4, 4, 4)}), (3, 8, 8))  # 2 scales
    with pytest.raises(TrilemmaError, match="widths"):
        build_config(RealNVP, "tiny", {"scales": 2, "widths": (4,)})


# --- Residual Flow: the fully connected end blocks -----------------------------------------------

def fc_block(d=8, scale=3.0, **overrides):
    """A fully connected block on (d, 1, 1) inputs in float64, raw weights scaled so the bound is active."""
    return block(d, (1, 1), scale, fc=True, **{"fc_hidden": 6, **overrides})


def test_fc_block_is_fully_connected_and_contractive():
    b = fc_block(coeff=0.9)
    layers = [m for m in b.modules() if isinstance(m, SNConv2d)]
    assert [tuple(m.weight.shape) for m in layers] == [(6, 8, 1, 1), (6, 6, 1, 1), (8, 6, 1, 1)]
    for m in layers:  # each linear map's spectral norm is the coefficient (the raw ones were far above)
        sigma = torch.linalg.matrix_norm(m.normalized_weight().flatten(1), ord=2)
        assert abs(sigma - 0.9) < 1e-6, float(sigma)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):  # Lip(g) < coeff: the Jacobian at random points, and a secant
        x = 3 * torch.randn(1, 8, 1, 1, dtype=torch.float64, generator=g)
        jac = torch.autograd.functional.jacobian(lambda v: b.g(v.view_as(x)).flatten(), x.flatten())
        assert torch.linalg.matrix_norm(jac, ord=2) < 0.9
        y = x + torch.randn(x.shape, dtype=torch.float64, generator=g)
        assert (b.g(x) - b.g(y)).norm() < 0.9 * (x - y).norm()


def test_fc_block_inverts():
    b = fc_block(d=48, coeff=0.9).float().eval()
    x = torch.randn(4, 48, 1, 1)
    with torch.no_grad():
        y, _ = b(x)
        x_back, evals = b.inverse(y)
    assert (x_back - x).abs().max() < 1e-4 and evals > 1


def test_fc_block_logdet_estimate_is_unbiased_for_the_exact_one():
    # g near 0.45 I (identity weights plus noise, normalised to 0.8; biases of +4 keep each LipSwish near
    # its slope of 0.94), so that the log-det is far from 0 and its series' higher terms matter.
    b = fc_block(fc_hidden=8, coeff=0.8, nll_exact_terms=10)
    with torch.no_grad():
        for m in b.modules():
            if isinstance(m, SNConv2d):
                m.weight.copy_(torch.eye(8, dtype=m.weight.dtype)[:, :, None, None] + 0.05 * torch.randn_like(m.weight))
                m.bias.fill_(4.0)
                m.power_iteration(500)
    b = b.eval()
    x = torch.randn(1, 8, 1, 1, dtype=torch.float64)
    _, exact = b.exact_logdet(x)
    torch.manual_seed(2)
    with torch.no_grad():
        _, est = b(x.expand(4000, -1, -1, -1))  # 4000 Hutchinson probes
    se = est.std() / math.sqrt(len(est))
    assert abs(est.mean() - exact[0]) < 4 * se and se < 0.05 * exact.abs()[0]




def test_a_flow_with_fc_blocks_inverts_and_has_the_exact_change_of_variables():
    shape = (1, 8, 8)
    torch.manual_seed(0)
    model = ResidualFlow(build_config(ResidualFlow, "tiny", {"fc_blocks": 2, "coeff": 0.9,
                                                             "inverse_tol": 1e-10, "inverse_max_iters": 400}), shape)
    assert len(model.fc) == 2 and model.samplers()["fixed_point"] == (model.num_scales + 2) * 400
    weights = [m.weight for m in model.fc.modules() if isinstance(m, SNConv2d)]
    before = [w.detach().clone() for w in weights]
    model.train_step(structured_batch(8, shape), plain_update(model))  # actnorms' data init, and a step
    assert all(not torch.equal(w, b) for w, b in zip(weights, before))  # the FC blocks are trained
    model = model.double().eval()
    y = torch.rand(2, *shape, dtype=torch.float64) * 0.9 + 0.05
    with torch.no_grad():
        z, _ = model.encode(y)
        y_back, _ = model.decode(z)
    assert (y_back - y).abs().max() < 1e-8
    want = []
    for yi in y:
        jac = torch.autograd.functional.jacobian(lambda v: flow_map(model, v.view(1, *shape)).flatten(), yi)
        want.append(standard_normal_log_prob(flow_map(model, yi[None]))[0] + torch.linalg.slogdet(jac.view(64, 64))[1])
    torch.testing.assert_close(model.dequantized_log_prob(y), torch.stack(want).detach(), rtol=1e-9, atol=1e-8)


def test_fc_blocks_keep_the_contract():
    check_contract(with_tiny(ResidualFlow, fc_blocks=1), (3, 8, 8))
