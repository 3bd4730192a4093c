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
Jacobian (tests/test_glow.py).

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

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from trilemma.contract.likelihood import (bits_per_dim, centre_transform, dequantize, discrete_nll_from_density,
                               logit_inverse, logit_transform)
from trilemma.contract.family import Capabilities, GenerativeModel
from trilemma.models.blocks import ActNorm, halvings

LOG_2PI = math.log(2 * math.pi)


@dataclass
class Config:
    hidden: int = 512  # channels of each coupling network
    steps: int = 32  # K: flow steps per level
    levels: int = 0  # L: levels of the multi-scale architecture; 0 picks them from the resolution
    scale_bound: float = 4.0  # b: coupling scales >= sigmoid(2-b), prior stds <= e^b; 0: unbounded
    temperature: float = 1.0  # std of the latents when sampling; 1.0 samples the model itself
    transform: Literal["logit", "centre"] = "logit"  # data transform after dequantization: "logit" or "centre" (the paper's)
    lr: float = 1e-3  # Adamax learning rate
    warmup: int = 20  # steps of linear learning-rate warm-up
    grad_clip: float = 50.0  # max gradient norm; 0 disables clipping


def auto_levels(size: int) -> int:
    """Halve while the side stays even and the top at least 4 pixels; at least one level."""
    return max(halvings(size, size), 1)


def squeeze(x):  # (B, C, H, W) -> (B, 4C, H/2, W/2): each 2x2 block becomes 4 channels
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, 4 * c, h // 2, w // 2)


def unsqueeze(x):  # (B, 4C, H, W) -> (B, C, 2H, 2W), the inverse of squeeze
    b, c, h, w = x.shape
    x = x.view(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c // 4, 2 * h, 2 * w)


class InvConv1x1(nn.Module):
    """Invertible 1x1 convolution, LU-decomposed so that log|det W| = sum log|s| costs O(C)."""

    def __init__(self, c: int):
        super().__init__()
        w = torch.linalg.qr(torch.randn(c, c))[0]  # a random rotation: log|det| = 0 at start
        p, lower, upper = torch.linalg.lu(w)
        s = torch.diagonal(upper)
        self.register_buffer("perm", p)
        self.register_buffer("sign_s", torch.sign(s))
        self.register_buffer("l_mask", torch.tril(torch.ones(c, c), -1))
        self.lower = nn.Parameter(lower)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(s.abs()))

    def weight(self):  # (C, C)
        eye = torch.eye(self.perm.shape[0], device=self.perm.device, dtype=self.perm.dtype)
        lower = self.lower * self.l_mask + eye
        upper = self.upper * self.l_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.perm @ lower @ upper

    def forward(self, x):  # (B, C, H, W) -> same, log-det (B,)
        w = self.weight()
        logdet = self.log_s.sum() * x.shape[2] * x.shape[3]
        return F.conv2d(x, w[:, :, None, None]), logdet.expand(x.shape[0])

    def inverse(self, y):
        return F.conv2d(y, torch.inverse(self.weight())[:, :, None, None])


class ZeroConv(nn.Module):
    """3x3 conv initialised to output zero, scaled by exp(3 logs) per channel (Glow's Conv2dZeros):
    each coupling starts as the identity and each learned prior as N(0, I)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.logs = nn.Parameter(torch.zeros(1, cout, 1, 1))

    def forward(self, x):
        return self.conv(x) * torch.exp(3 * self.logs)


def soft_floor(v, floor: float):
    """A smooth max(v, floor): ~v well above the floor, never below it."""
    return floor + F.softplus(v - floor)


class AffineCoupling(nn.Module):
    """x_b -> (x_b + t(x_a)) * sigmoid(s(x_a) + 2); x_a passes through.

    s is kept above -bound (0: unbounded, the paper's), so that the inverse expands by at most
    1 / sigmoid(2 - bound) per coupling: unbounded, a latent in the tail makes s very negative,
    the inverse divides by ~0 and the next layers overflow."""

    def __init__(self, c: int, hidden: int, bound: float):
        super().__init__()
        self.bound = bound
        self.net = nn.Sequential(
            nn.Conv2d(c // 2, hidden, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 1), nn.ReLU(),
            ZeroConv(hidden, 2 * (c - c // 2)))

    def params(self, xa):  # shift, scale (B, C - C/2, H, W) each
        h = self.net(xa)
        s = soft_floor(h[:, 1::2], -self.bound) if self.bound > 0 else h[:, 1::2]
        return h[:, 0::2], torch.sigmoid(s + 2.0)  # +2: scale ~0.88 at start, stable

    def forward(self, x):
        xa, xb = x[:, :x.shape[1] // 2], x[:, x.shape[1] // 2:]
        shift, scale = self.params(xa)
        return torch.cat([xa, (xb + shift) * scale], 1), torch.log(scale).flatten(1).sum(1)

    def inverse(self, y):
        ya, yb = y[:, :y.shape[1] // 2], y[:, y.shape[1] // 2:]
        shift, scale = self.params(ya)
        return torch.cat([ya, yb / scale - shift], 1)


class FlowStep(nn.Module):
    """One step of flow: actnorm -> invertible 1x1 conv -> affine coupling."""

    def __init__(self, c: int, hidden: int, bound: float):
        super().__init__()
        self.layers = nn.ModuleList([ActNorm(c, logscale_factor=3.0), InvConv1x1(c),
                                     AffineCoupling(c, hidden, bound)])

    def forward(self, x):
        logdet = 0
        for layer in self.layers:
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, y):
        for layer in reversed(self.layers):
            y = layer.inverse(y)
        return y


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
        c, h, w = self.data_shape
        self.num_levels = config.levels or auto_levels(min(h, w))
        if h % 2 ** self.num_levels or w % 2 ** self.num_levels:
            raise ValueError(f"glow: {h}x{w} images cannot be squeezed {self.num_levels} times")
        self.levels, self.priors = nn.ModuleList(), nn.ModuleList()
        for level in range(self.num_levels):
            c *= 4  # squeeze
            self.levels.append(nn.ModuleList(
                [FlowStep(c, config.hidden, config.scale_bound) for _ in range(config.steps)]))
            if level < self.num_levels - 1:  # split: prior of the dropped half given the kept half
                self.priors.append(ZeroConv(c // 2, c))
                c //= 2
        # The top latent's learned prior: a mean and log-scale per channel.
        self.top_mean = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.top_logs = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))  # actnorm data init

    # --- the bijection y <-> eps ----------------------------------------------------------------
    def split_prior(self, level, h):  # kept half (B, c, H, W) -> mean, log-std of the other half
        mean, logs = self.priors[level](h).chunk(2, 1)
        # An upper bound on the log-std, for the same reason as the couplings' floor: decode
        # multiplies by exp(logs(h)), which a large h would overflow.
        b = self.config.scale_bound
        return mean, (-soft_floor(-logs, -b) if b > 0 else logs)

    def encode(self, y):
        """Dequantized y (B, C, H, W) in [0, 1) -> standard-normal latents (one per level, from the
        first split to the top) and log |det d eps / dy| (B,)."""
        h, logdet = logit_transform(y) if self.config.transform == "logit" else centre_transform(y)
        eps = []
        for level, steps in enumerate(self.levels):
            h = squeeze(h)
            for step in steps:
                h, ld = step(h)
                logdet = logdet + ld
            if level < self.num_levels - 1:
                h, z = h.chunk(2, 1)  # keep h, factor out z
                mean, logs = self.split_prior(level, h)
            else:
                z, mean, logs = h, self.top_mean, self.top_logs.expand_as(h)
            eps.append((z - mean) * torch.exp(-logs))  # standardize by the learned prior
            logdet = logdet - logs.flatten(1).sum(1)
        return eps, logdet

    def decode(self, eps):
        """Latents as returned by ``encode`` -> y (B, C, H, W)."""
        h = eps[-1] * torch.exp(self.top_logs) + self.top_mean
        for level in reversed(range(self.num_levels)):
            if level < self.num_levels - 1:
                mean, logs = self.split_prior(level, h)
                h = torch.cat([h, eps[level] * torch.exp(logs) + mean], 1)
            for step in reversed(self.levels[level]):
                h = step.inverse(h)
            h = unsqueeze(h)
        if self.config.transform == "logit":
            return (logit_inverse(h) + 1) / 2
        return h + 0.5  # undo centre_transform

    def log_prob(self, y):  # log p(y) of the dequantized image (B,)
        eps, logdet = self.encode(y)
        log_normal = sum(-0.5 * (e ** 2 + LOG_2PI).flatten(1).sum(1) for e in eps)
        return log_normal + logdet

    @torch.no_grad()
    def data_init(self, x):
        """Actnorm's data-dependent initialisation: one forward pass on a uint8 batch, in training
        mode (each ActNorm initialises on its first training forward)."""
        was_training = self.training
        self.train()
        self.encode(dequantize(x))
        self.train(was_training)
        self.initialized.fill_(True)

    # --- training and likelihood ----------------------------------------------------------------
    def configure_optimizers(self):
        # Adamax, the official code's default: its infinity-norm scaling damps the loss spikes a
        # small flow has on MNIST's constant background.
        return {"model": torch.optim.Adamax(self.parameters(), lr=self.config.lr)}

    def lr_factor(self, role, step):
        return min(1.0, (step + 1) / max(1, self.config.warmup))  # linear warm-up from lr / warmup

    def loss(self, x):
        if not self.initialized:
            self.data_init(x)
        # Bits per dim (gradients clipped to Config.grad_clip by the harness's default rule).
        return {"model": bits_per_dim(self.nll(x).mean(), self.num_dims)}

    def nll(self, x):  # upper bound on -log P(x) in nats (B,), one dequantization draw per image
        return discrete_nll_from_density(self.log_prob(dequantize(x)), self.num_dims)

    def nll_protocol(self):
        return {"dequantization": "uniform", "dequantization_draws": 1}

    def dequantized_log_prob(self, y):  # exact log-determinant: offers the importance-weighted NLL
        return self.log_prob(y)

    # --- sampling -------------------------------------------------------------------------------
    def samplers(self):
        return {"one_pass": 1}  # one pass through the inverse flow

    def generate(self, n, sampler):
        c, h, w = self.data_shape
        t = self.config.temperature
        eps = []
        for level in range(self.num_levels):  # latent shapes, as encode returns them
            c, h, w = c * 4, h // 2, w // 2
            if level < self.num_levels - 1:
                c //= 2
            eps.append(t * torch.randn(n, c, h, w, device=self.device))
        y = self.decode(eps)  # (n, C, H, W), ~[0, 1)
        # Should a tail latent still overflow the inverse despite ``scale_bound`` (none of 1000
        # MNIST samples did after 100 s of training; 2 in 3 did without the bounds), its pixels
        # become mid-grey: the sample stays in the FID set, visibly broken, not redrawn or dropped.
        y = torch.nan_to_num(y, nan=0.5)
        # y lies in the bin of level floor(256 y); that level's value on the [-1, 1] scale:
        return ((256 * y - 0.5) / 127.5 - 1).clamp(-1, 1)
