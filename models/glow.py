"""Glow: a multi-scale normalizing flow of actnorm, invertible 1x1 convolutions and affine couplings.

Kingma & Dhariwal (2018), "Glow: Generative Flow with Invertible 1x1 Convolutions", NeurIPS.

The flow (``trilemma.models.parts.glow.GlowFlow``, Flow CE's flow too) maps the dequantized image y to
standard-normal latents with an exact log-determinant: L levels, each a squeeze, K flow steps (actnorm
with data-dependent initialisation, an LU-decomposed invertible 1x1 convolution, an affine coupling
with scale sigmoid(h + 2)) and a split whose half is standardised by its learned prior; levels follow
the resolution (28 -> 2, 32 -> 3 as the paper's CIFAR-10 model). As the official code: Adamax, and the
log-scales of actnorm and of the zero-initialised convolutions multiplied by 3. Samples at temperature
``Config.temperature`` = 1 (the paper shows T < 1, which is not the model whose NLL is reported).

What the small version changes from the paper: far fewer and narrower steps on the CPU presets (the GPU
presets have the paper's K = 32 and 512 channels, ~44M parameters at 32x32), no actnorm inside the
coupling networks; RealNVP's logit transform instead of z = y - 1/2 (``transform="centre"`` is the
paper's), which learns far faster in a short budget; the couplings' pre-sigmoid log-scale kept above
-4 and the priors' log-std below 4 (``scale_bound``), as an unbounded briefly trained flow overflows in
its inverse; a higher learning rate with a 20-step warm-up; no class conditioning.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from trilemma.contract.likelihood import bits_per_dim
from trilemma.contract.family import Capabilities, GenerativeModel
from trilemma.models.blocks import at_least, positive
from trilemma.models.parts.glow import GlowFlow


@dataclass
class Config:
    hidden: int = 512  # channels of each coupling network
    steps: int = 32  # K: flow steps per level
    levels: int = 0  # L: levels of the multi-scale architecture; 0 picks them from the resolution
    scale_bound: float = 4.0  # b: coupling scales >= sigmoid(2-b), prior stds <= e^b; 0: unbounded
    temperature: float = 1.0  # std of the latents when sampling; 1.0 samples the model itself, 0: its mode
    transform: Literal["logit", "centre"] = "logit"  # data transform after dequantization: "logit" or "centre" (the paper's)
    lr: float = 1e-3  # Adamax learning rate
    warmup: int = 20  # steps of linear learning-rate warm-up; 0: none
    grad_clip: float = 50.0  # max gradient norm; 0 disables clipping

    def __post_init__(self):
        at_least(self, 1, "hidden", "steps")
        at_least(self, 0, "levels", "warmup", "scale_bound", "grad_clip", "temperature")  # temperature 0: the mode
        positive(self, "lr")


class Glow(GenerativeModel):
    name = "glow"
    paper = ("Kingma & Dhariwal (2018), Glow: Generative Flow with Invertible 1x1 Convolutions, "
             "NeurIPS")
    family = "Flow"
    literature = "GLOW"
    capabilities = Capabilities(density="exact", free_form_jacobian=False, sampling="one_pass")
    Config = Config
    presets = {
        "tiny": dict(hidden=16, steps=2),
        "mnist": dict(hidden=48, steps=8, lr=5e-3),
        "cifar10": dict(hidden=48, steps=8, lr=5e-3),
        # The paper's CIFAR-10 size: K = 32 steps per level, 512 channels (3 levels at 32x32).
        "mnist_gpu": dict(hidden=512, steps=32, lr=1e-3),
        "cifar10_gpu": dict(hidden=512, steps=32, lr=1e-3),
    }

    def __init__(self, config: Config, data_shape):
        super().__init__(config, data_shape)
        self.flow = GlowFlow(self.data_shape, config.hidden, config.steps, config.levels, config.scale_bound,
                             config.transform)  # y <-> standard-normal latents, exact log-determinant

    # --- training and likelihood ----------------------------------------------------------------
    def configure_optimizers(self):
        # Adamax, the official code's default: its infinity-norm scaling damps the loss spikes a
        # small flow has on MNIST's constant background.
        return {"model": torch.optim.Adamax(self.parameters(), lr=self.config.lr)}

    def lr_factor(self, role, step):
        return min(1.0, (step + 1) / max(1, self.config.warmup))  # linear warm-up from lr / warmup

    def loss(self, x):
        if not self.flow.initialized:
            self.flow.data_init(x)
        # Bits per dim (gradients clipped to Config.grad_clip by the harness's default rule).
        return {"model": bits_per_dim(self.nll(x).mean(), self.num_dims)}

    def nll(self, x):  # upper bound on -log P(x) in nats (B,), one dequantization draw per image
        return self.flow.nll(x)

    def nll_protocol(self):
        return {"dequantization": "uniform", "dequantization_draws": 1}

    def dequantized_log_prob(self, y):  # exact log-determinant: offers the importance-weighted NLL
        return self.flow.log_prob(y)

    # --- sampling -------------------------------------------------------------------------------
    def samplers(self):
        return {"one_pass": 1}  # one pass through the inverse flow

    def generate(self, n, sampler):
        return self.flow.sample(n, self.config.temperature)  # (n, C, H, W) on [-1, 1]
