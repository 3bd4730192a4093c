"""Glow: a multi-scale normalizing flow of actnorm, invertible 1x1 convolutions and affine couplings.

Kingma & Dhariwal (2018), "Glow: Generative Flow with Invertible 1x1 Convolutions", NeurIPS.

    y = (x + u) / 256,  u ~ U[0,1)^D      (uniform dequantization, trilemma.contract.likelihood)
    z0 = logit(a + (1 - 2a) y)            (trilemma.contract.likelihood.logit_transform, with its log-det)
    eps = f(z0),  log p(y) = log N(eps; 0, I) + log |det df/dz0| + log |det dz0/dy|

f has L levels; each squeezes (C, H, W) -> (4C, H/2, W/2), applies K flow steps (actnorm ->
invertible 1x1 conv -> affine coupling), and every level but the last splits off half of its
channels. Glow gives each split-off half z a learned prior N(mean(h), exp(logs(h))^2) conditioned
on the half h that goes on (a zero-initialised conv of h), and the top latent a learned prior too.
Here that prior is written as one more invertible, triangular step, eps = (z - mean(h)) *
exp(-logs(h)), so that f maps y to standard-normal latents: the density is the same, ``encode`` /
``decode`` are an exact bijection, and its log-determinant is checked against a brute-force
Jacobian (tests/test_glow.py). The flow is ``trilemma.models.parts.glow.GlowFlow`` (Flow CE's flow too).

Kept from the paper: actnorm with data-dependent initialisation on the first batch (zero mean,
unit variance per channel; the ``initialized`` buffer records that it happened); the
*LU-decomposed* 1x1 convolution, W = P L (U + diag(sign(s) exp(log|s|))) with P and sign(s) fixed,
initialised from a random rotation; the affine coupling with scale sigmoid(h + 2) and the
coupling network conv3x3 -> ReLU -> conv1x1 -> ReLU -> zero-initialised conv3x3, as in the
official code, as are Adamax and the log-scales of actnorm and of the zero-initialised convs
multiplied by 3 (they learn 3x faster). Levels follow the resolution: one is added while the side
halves cleanly and the top stays at least 4x4 (16 -> 2 levels, 28 -> 2, 32 -> 3 as the paper's
CIFAR-10 model, 64 -> 4).

What this small version changes from the paper:
    * far fewer and narrower steps (the paper's CIFAR-10 model: K=32 steps per level, 512 channels);
      no actnorm inside the coupling networks (plain biased convs);
      the GPU presets (``mnist_gpu``, ``cifar10_gpu``) have the paper's K = 32 and 512 channels
      (3 levels at 32x32, ~44M parameters), still without actnorm inside the couplings;
    * RealNVP's logit transform instead of the paper's z0 = y - 1/2 (``transform="centre"`` gives
      the paper's): with a budget of a few hundred steps it learns far faster (MNIST, one small
      model: 2.4 bits/dim after 234 steps against 3.6 after 309), as it already spreads out the
      pixels near 0 and 1 that make up most of MNIST;
    * the couplings' pre-sigmoid log-scale is kept above -4 and the split priors' log-std below 4
      (smooth bounds, ``scale_bound``): unbounded, the inverse of a briefly trained flow
      overflowed on 2 in 3 MNIST samples at T=1 (a tail latent makes a scale ~0 and the next
      layer divides by it); data rarely come near the bounds;
    * a higher learning rate with a 20-step warm-up; no class conditioning.
Sampling draws eps ~ N(0, T^2 I) with temperature T = ``Config.temperature``, 1.0 by default: the
paper shows samples at T < 1, which look cleaner but are not samples of the model whose NLL is
reported, so FID is measured at T = 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from trilemma.contract.likelihood import bits_per_dim
from trilemma.contract.family import Capabilities, GenerativeModel
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
        for name in ("hidden", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"'{name}' must be >= 1")
        for name in ("levels", "warmup", "scale_bound", "grad_clip", "temperature"):  # temperature 0: the mode
            if not getattr(self, name) >= 0:
                raise ValueError(f"'{name}' must be >= 0")
        if not self.lr > 0:
            raise ValueError("'lr' must be > 0")


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
        # ~100 s on 2 CPU cores: MNIST ~0.2 s a step at batch 64 (2 levels x 8 steps), NLL of the
        # 10k test images ~40 s; CIFAR-10 ~0.25 s a step (3 levels x 8 steps).
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
