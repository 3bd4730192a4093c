"""VD-VAE: a very deep hierarchical VAE with a top-down path shared by inference and generation.

Child (2021), "Very Deep VAEs Generalize Autoregressive Models and Can Outperform Them on Images",
ICLR. The official code (github.com/openai/vdvae) fixes the details the paper leaves open; this file
follows it. The network is ``trilemma.models.parts.vdvae.HierarchicalVAE`` (VAEBM's VAE too).

    p(z) = prod_l p(z_l | z_<l),   q(z|x) = prod_l q(z_l | z_<l, x),   p(x|z) a discretized mixture
    -log P(x) <= -log p(x|z) + sum_l KL(q(z_l | z_<l, x) || p(z_l | z_<l))       (the negative ELBO)

A bottom-up encoder of residual blocks keeps its activations at every resolution (full, halved
while ``halvings`` allows, then 1x1). The decoder runs top-down from 1x1 to full resolution; its
state starts at each resolution as a learned bias plus the coarser state upsampled. Each of its
*stochastic layers* (DecBlock) reads the state x:

    prior      (p_mean, p_logstd, dx) = Block(x)           the last conv zero-initialised
    posterior  (q_mean, q_logstd)     = Block([x, encoder activations at this resolution])
    x <- x + dx;  z = mean + exp(logstd) * eps from q (training, NLL) or p (sampling)
    x <- Block_res(x + proj(z))                          KL_l in closed form, per latent element

so generation and inference share the whole top-down path, and the latents z_l of a layer are a
spatial map (zdim channels at that resolution). Every Block is the paper's residual bottleneck:
GELU, 1x1 to a quarter of the width, 3x3, 3x3 (1x1 at the 1x1 and 2x2 resolutions), 1x1 back. The
paper's stabilisers are kept: the last 1x1 of every residual block and the latent projection are
initialised scaled by 1/sqrt(number of blocks); gradients are clipped at ``grad_clip`` and an update
whose gradient norm exceeds ``skip_threshold`` (or is not finite) is skipped (``gradient_rule``; the
harness's update carries it out, on the device: docs/families.md); ``skipped`` in the log is the
fraction of steps skipped. AdamW with beta2 = 0.9 and weight decay 0.01, as the paper's.

Sampling: one top-down pass (NFE 1), z_l ~ p(z_l | z_<l), then a draw from the output mixture. The
``temperature`` sampler multiplies every prior std by ``Config.temperature`` (the paper's figures use
0.8-0.9); the default sampler is temperature 1, the model itself, which FID measures.

The likelihood's RGB simplification and what the presets change from the paper: docs/families.md (vdvae).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trilemma.contract.family import Capabilities, GenerativeModel
from trilemma.contract.likelihood import bits_per_dim
from trilemma.contract.update import GradientRule
from trilemma.models.parts.vdvae import HierarchicalVAE, sample_mixture


@dataclass
class Config:
    width: int = 64  # channels of the encoder and of the top-down state, at every resolution
    bottleneck: float = 0.25  # a block's middle width, as a fraction of the width
    zdim: int = 8  # latent channels of each stochastic layer
    dec_blocks: int = 4  # stochastic layers at full resolution (fewer at coarser ones, see above)
    enc_blocks: int = 2  # encoder residual blocks at full resolution (the same rule)
    mixtures: int = 10  # K: logistic components per subpixel
    lr: float = 1e-3  # AdamW learning rate (paper: 2e-4)
    weight_decay: float = 0.01  # AdamW weight decay (paper: 0.01)
    grad_clip: float = 200.0  # max gradient norm of the loss in nats per subpixel (paper: 200)
    skip_threshold: float = 400.0  # skip an update whose gradient norm is above this (paper: 400)
    temperature: float = 0.9  # prior std multiplier of the `temperature` sampler
    min_log_scale: float = -7.0  # floor of the logistics' log-scales on the [-1, 1] scale (as PixelCNN++)
    nll_samples: int = 1  # posterior draws averaged in nll(); each is an unbiased estimate of -ELBO

    def __post_init__(self):
        if min(self.width, self.zdim, self.dec_blocks, self.enc_blocks, self.mixtures, self.nll_samples) < 1:
            raise ValueError("'width', 'zdim', 'dec_blocks', 'enc_blocks', 'mixtures' and "
                             "'nll_samples' must be >= 1")
        if not 0 < self.bottleneck <= 1 or self.width * self.bottleneck < 1:
            raise ValueError("'bottleneck' must be in (0, 1] and leave a middle width of at least 1")
        if self.lr <= 0 or self.weight_decay < 0 or self.grad_clip <= 0 or self.temperature <= 0:
            raise ValueError("'lr', 'grad_clip' and 'temperature' must be > 0, 'weight_decay' >= 0")
        if self.skip_threshold <= 0:
            raise ValueError("'skip_threshold' must be > 0")


class VDVAE(GenerativeModel):
    name = "vdvae"
    paper = ("Child (2021), Very Deep VAEs Generalize Autoregressive Models and Can Outperform Them "
             "on Images, ICLR")
    family = "VAE"
    literature = "VD-VAE"
    capabilities = Capabilities(density="bound", free_form_jacobian=True, sampling="one_pass")
    Config = Config
    presets = {
        "tiny": dict(width=16, zdim=4, dec_blocks=1, enc_blocks=1, mixtures=3),
        # CPU: 4 stochastic layers (28, 14, 7, 1). 100 MNIST steps reach 1.67 test bits/dim at lr 3e-3
        # against 1.90 at 1e-3; gradient norms stay below 1, so clip at 5 and skip above 20.
        "mnist": dict(width=32, zdim=8, dec_blocks=1, enc_blocks=1, mixtures=5, lr=3e-3, grad_clip=5.0,
                      skip_threshold=20.0),
        "cifar10": dict(width=32, zdim=8, dec_blocks=1, enc_blocks=1, mixtures=10, grad_clip=5.0,
                        skip_threshold=20.0),
        "mnist_gpu": dict(width=128, zdim=16, dec_blocks=12, enc_blocks=6, mixtures=10, lr=5e-4),
        "cifar10_gpu": dict(width=384, zdim=16, dec_blocks=22, enc_blocks=12, mixtures=10, lr=2e-4),
    }

    def __init__(self, config: Config, data_shape):
        super().__init__(config, data_shape)
        cfg = config
        net = HierarchicalVAE(self.data_shape, cfg.width, cfg.bottleneck, cfg.zdim, cfg.dec_blocks,
                              cfg.enc_blocks, cfg.mixtures, cfg.min_log_scale)
        # The network's modules sit at this level (in_conv, encoder, biases, decoder, output: the
        # checkpoints' keys), and its methods below run on them.
        self.sizes = net.sizes
        for name, module in net.named_children():
            self.add_module(name, module)

    # --- the networks (trilemma.models.parts.vdvae) -------------------------------------------------
    stochastic_layers = HierarchicalVAE.stochastic_layers
    encode = HierarchicalVAE.encode  # [-1, 1] images -> activations at every resolution, coarsest first
    top_down = HierarchicalVAE.top_down  # -> mixture parameters and the KL of every stochastic layer
    negative_elbo = HierarchicalVAE.negative_elbo  # -> the one-sample -ELBO (B,) and its terms

    # --- the contract -----------------------------------------------------------------------------
    def configure_optimizers(self):
        # Fused, for its found_inf input: the harness then decides a skipped update on the device.
        return {"model": torch.optim.AdamW(self.parameters(), lr=self.config.lr, betas=(0.9, 0.9),
                                           weight_decay=self.config.weight_decay, fused=True)}

    def gradient_rule(self, role):
        # Clip at grad_clip; skip the update when the norm (before clipping) is at or above
        # skip_threshold, or not finite.
        return GradientRule(clip=self.config.grad_clip, skip_above=self.config.skip_threshold)

    def loss(self, x):
        terms = self.negative_elbo(x)
        logs = {f"{k}_bpd": bits_per_dim(terms[k].mean().detach(), self.num_dims)
                for k in ("loss", "rec", "kl")}
        return {"model": terms["loss"].mean() / self.num_dims, **logs}  # nats per subpixel, as the paper's

    def samplers(self):
        return {"one_pass": 1, "temperature": 1}  # one top-down pass each

    @torch.no_grad()
    def generate(self, n, sampler):
        t = self.config.temperature if sampler == "temperature" else 1.0
        mixture, _ = self.top_down(n, temperature=t)
        return sample_mixture(*mixture)  # (n, C, H, W)

    def sampling_modules(self):
        return [self.biases, self.decoder, self.output]

    def nll(self, x):
        draws = [self.negative_elbo(x)["loss"] for _ in range(self.config.nll_samples)]
        return torch.stack(draws).mean(0)  # (B,)

    def nll_protocol(self):
        return {"bound": "negative ELBO, closed-form KL per stochastic layer",
                "stochastic_layers": self.stochastic_layers, "latent_draws": self.config.nll_samples}
