"""VD-VAE invariants: the -ELBO is the reconstruction term plus one closed-form KL per stochastic
layer (each matching Monte Carlo); an update whose gradient norm is too large or not finite is
skipped, and the training log says so; the scaled initialisation; the temperature sampler; the
paper's layout of layers over the resolutions."""
import json
import math

import pytest
import torch

from trilemma.contract.family import build_config
from trilemma.contract.likelihood import discretized_mixture_logistic_nll
from trilemma.contract.testing import structured_batch
from trilemma.contract.update import plain_update
from trilemma.results.schema import LOG_FILE
from trilemma.run.loop import train
from trilemma.run.settings import TrainConfig
from trilemma.models.parts.vdvae import DecBlock, blocks_at
from trilemma.models.vdvae import VDVAE

SHAPE = (1, 8, 8)


def make(shape=SHAPE, **overrides):
    torch.manual_seed(0)
    return VDVAE(build_config(VDVAE, "tiny", overrides), shape)


def log_normal(z, mean, logstd):  # log N(z; mean, exp(logstd)^2) per element
    return -0.5 * math.log(2 * math.pi) - logstd - 0.5 * ((z - mean) * torch.exp(-logstd)) ** 2


def test_elbo_is_the_reconstruction_plus_the_kl_of_every_layer():
    model = make(dec_blocks=2)
    x = structured_batch(4, SHAPE)
    layers = [m for m in model.modules() if isinstance(m, DecBlock)]
    with torch.no_grad():  # a posterior far from the prior at every layer: KLs of tens of nats
        for layer in layers:
            for conv in (layer.prior.convs[-1], layer.posterior.convs[-1]):
                torch.nn.init.normal_(conv.weight, std=0.3)
                torch.nn.init.normal_(conv.bias, std=0.3)
    assert len(layers) == model.stochastic_layers == 2 + 1 + 1  # 8x8: 2, 4x4: 1, 1x1: 1
    params, mixture = [], []  # each layer's (q_mean, q_logstd, p_mean, p_logstd); the output's
    for layer in layers:
        layer.prior.register_forward_hook(
            lambda m, i, out, d=layer.zdim: params.append(list(out[:, :2 * d].chunk(2, 1))))
        layer.posterior.register_forward_hook(lambda m, i, out: params[-1].extend(out.chunk(2, 1)))
    model.output.register_forward_hook(lambda m, i, out: mixture.extend(out))
    with torch.no_grad():
        terms = model.negative_elbo(x)
    kls = terms["kl_layers"]
    assert len(kls) == len(params) == len(layers)
    torch.testing.assert_close(terms["loss"], terms["rec"] + torch.stack(kls).sum(0))
    torch.testing.assert_close(terms["rec"], discretized_mixture_logistic_nll(x, *mixture))
    # Each closed-form KL(q || p) against Monte Carlo: E_q[log q(z) - log p(z)] over 20000 draws.
    for kl, (p_mean, p_logstd, q_mean, q_logstd) in zip(kls, params):
        mc = 0
        for _ in range(10):
            z = q_mean + torch.exp(q_logstd) * torch.randn(2000, *q_mean.shape)
            log_ratio = log_normal(z, q_mean, q_logstd) - log_normal(z, p_mean, p_logstd)  # (N, B, z, h, w)
            mc = mc + log_ratio.flatten(2).sum(2).mean(0) / 10
        assert (kl > 5).all()
        # A std read as a variance would be off by 10 times this tolerance or more.
        torch.testing.assert_close(kl, mc, atol=0.03 * float(kl.max()), rtol=0)


def test_an_update_whose_gradient_norm_is_too_large_is_skipped():
    x = structured_batch(8, SHAPE)
    for threshold, skipped in ((1e-6, True), (1e6, False)):
        model = make(skip_threshold=threshold)
        update = plain_update(model)
        before = [p.detach().clone() for p in model.parameters()]
        losses = model.train_step(x, update)
        assert bool(losses["skipped"]) == skipped and (losses["grad_norm"] > threshold) == skipped
        unchanged = all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
        assert unchanged == skipped
        steps = {float(s["step"]) for s in update.optimizers["model"].state.values()}
        assert steps == ({0.0} if skipped else {1.0})  # the optimizer's state did not move either
        if skipped:
            assert all(not s["exp_avg"].any() for s in update.optimizers["model"].state.values())


def test_an_update_with_a_non_finite_gradient_is_skipped():
    model = make()
    update = plain_update(model)
    with torch.no_grad():
        model.output.gain[0, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    losses = model.train_step(structured_batch(8, SHAPE), update)
    assert float(losses["skipped"]) == 1.0
    assert all(torch.equal(a, p) or torch.isnan(a).any() for a, p in zip(before, model.parameters()))


def test_the_training_log_reports_skipped_updates(tmp_path):
    images = structured_batch(16, SHAPE)
    for threshold, expected in ((1e-6, 1.0), (1e6, 0.0)):
        model = make(skip_threshold=threshold)
        cfg = TrainConfig(batch_size=4, max_images=12, ema_halflife_images=0, eval_points=0,
                          log_every_steps=1)
        train(model, images, cfg, tmp_path / str(threshold), seed=0, evaluate=lambda m: {})
        lines = [json.loads(line) for line in (tmp_path / str(threshold) / LOG_FILE).read_text().splitlines()]
        logged = [line["skipped"] for line in lines if line["kind"] == "train"]
        assert logged == [expected] * 3


def test_residual_blocks_start_scaled_by_one_over_the_square_root_of_the_depth():
    model = make(dec_blocks=4)  # 8x8: 4 layers, 4x4: 2, 1x1: 1
    depth = model.stochastic_layers
    assert depth == 7
    for layer in (m for m in model.modules() if isinstance(m, DecBlock)):
        for conv in (layer.resnet.convs[-1], layer.z_proj):
            bound = 1 / math.sqrt(conv.weight[0].numel())  # PyTorch's default uniform init
            assert conv.weight.abs().max() <= bound / math.sqrt(depth)
            assert conv.weight.abs().max() > 0.5 * bound / math.sqrt(depth)
        assert not layer.prior.convs[-1].weight.any()  # the prior starts as N(0, I), adding nothing


@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_temperature_scales_the_prior_std(temperature):
    model = make(temperature=temperature).eval()
    top = next(m for m in model.modules() if isinstance(m, DecBlock))  # its prior is the same every draw
    latents = []
    top.z_proj.register_forward_hook(lambda m, inp, out: latents.append(inp[0]))
    with torch.no_grad():
        p_mean = top.prior(model.biases[0].expand(2, -1, -1, -1))[:, :top.zdim]
        for sampler in ("one_pass", "temperature"):
            torch.manual_seed(1)
            model.sample(2, sampler)
    z_one, z_t = latents
    torch.testing.assert_close(z_t - p_mean, temperature * (z_one - p_mean))
    assert next(iter(model.samplers())) == "one_pass"  # the default samples the model itself


def test_the_layers_follow_the_papers_layout_and_the_resolution():
    # The paper's CIFAR-10 decoder has 22, 11, 6, 3 and 1 stochastic layers at 32, 16, 8, 4 and 1.
    assert [blocks_at(22, side, 32) for side in (32, 16, 8, 4, 1)] == [22, 11, 6, 3, 1]
    for shape, sizes in (((1, 16, 16), [16, 8, 4, 1]), ((1, 28, 28), [28, 14, 7, 1]),
                         ((3, 32, 32), [32, 16, 8, 4, 1]), ((3, 64, 64), [64, 32, 16, 8, 4, 1])):
        model = make(shape)
        assert [s[0] for s in model.sizes] == sizes
        with torch.no_grad():
            assert model.sample(2).shape == (2, *shape)
            assert model.nll(structured_batch(2, shape)).shape == (2,)


def test_training_lowers_the_negative_elbo():
    model = make(lr=1e-2)
    update = plain_update(model)
    x = structured_batch(16, SHAPE)
    with torch.no_grad():
        before = model.nll(x).mean()
    for _ in range(30):
        model.train_step(x, update)
    with torch.no_grad():
        after = model.nll(x).mean()
    assert after < 0.8 * before
