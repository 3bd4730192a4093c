"""The Glow flow as a network (Kingma & Dhariwal 2018, "Glow: Generative Flow with Invertible 1x1
Convolutions"), shared by the glow family and Flow Contrastive Estimation's flow.

    GlowFlow    dequantized y (B, C, H, W) in [0, 1) <-> standard-normal latents, one per level, with
                the exact log-determinant: the data transform, L levels of squeeze -> K flow steps ->
                split, each split-off half standardised by its learned prior
    FlowStep    actnorm -> LU-decomposed invertible 1x1 convolution -> affine coupling

``trilemma.models.glow`` says what it changes from the paper.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trilemma.contract.likelihood import (centre_transform, dequantize, discrete_nll_from_density,
                                          logit_inverse, logit_transform)
from trilemma.models.blocks import ActNorm, halvings

LOG_2PI = math.log(2 * math.pi)


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


class GlowFlow(nn.Module):
    """y <-> eps, L levels of K flow steps of ``hidden`` channels; ``levels`` 0 picks L from the
    resolution; ``scale_bound`` b keeps coupling scales >= sigmoid(2-b) and prior stds <= e^b (0:
    unbounded); ``transform`` is the data transform after dequantization, "logit" or "centre".

    Glow's learned prior of each split-off half z, N(mean(h), exp(logs(h))^2) given the half h that goes
    on (and of the top latent), is written as one more triangular step eps = (z - mean(h)) exp(-logs(h)),
    so the flow maps y to standard-normal latents with the same density and ``encode`` / ``decode`` are
    an exact bijection (its log-determinant is checked against a brute-force Jacobian in the tests)."""

    def __init__(self, shape: tuple[int, int, int], hidden: int, steps: int, levels: int = 0,
                 scale_bound: float = 4.0, transform: str = "logit"):
        super().__init__()
        c, h, w = shape
        self.shape, self.scale_bound, self.transform = shape, scale_bound, transform
        self.num_levels = levels or auto_levels(min(h, w))
        if h % 2 ** self.num_levels or w % 2 ** self.num_levels:
            raise ValueError(f"glow: {h}x{w} images cannot be squeezed {self.num_levels} times")
        self.levels, self.priors = nn.ModuleList(), nn.ModuleList()
        for level in range(self.num_levels):
            c *= 4  # squeeze
            self.levels.append(nn.ModuleList([FlowStep(c, hidden, scale_bound) for _ in range(steps)]))
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
        b = self.scale_bound
        return mean, (-soft_floor(-logs, -b) if b > 0 else logs)

    def encode(self, y):
        """Dequantized y (B, C, H, W) in [0, 1) -> standard-normal latents (one per level, from the
        first split to the top) and log |det d eps / dy| (B,)."""
        h, logdet = logit_transform(y) if self.transform == "logit" else centre_transform(y)
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
        if self.transform == "logit":
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

    # --- likelihood and sampling ----------------------------------------------------------------
    def nll(self, x):  # upper bound on -log P(x) in nats (B,), one dequantization draw per image
        return discrete_nll_from_density(self.log_prob(dequantize(x)), math.prod(self.shape))

    def latents(self, n: int, temperature: float = 1.0) -> list[torch.Tensor]:
        """Latents shaped as ``encode`` returns them, drawn from N(0, temperature^2 I)."""
        c, h, w = self.shape
        eps = []
        for level in range(self.num_levels):
            c, h, w = c * 4, h // 2, w // 2
            if level < self.num_levels - 1:
                c //= 2
            eps.append(temperature * torch.randn(n, c, h, w, device=self.top_mean.device))
        return eps

    def sample(self, n: int, temperature: float = 1.0) -> torch.Tensor:
        """n images (n, C, H, W) on the [-1, 1] scale: latents through the inverse flow."""
        y = self.decode(self.latents(n, temperature))  # (n, C, H, W), ~[0, 1)
        # Should a tail latent still overflow the inverse despite ``scale_bound`` (none of 1000
        # MNIST samples did after 100 s of training; 2 in 3 did without the bounds), its pixels
        # become mid-grey: the sample stays in the FID set, visibly broken, not redrawn or dropped.
        y = torch.nan_to_num(y, nan=0.5)
        # y lies in the bin of level floor(256 y); that level's value on the [-1, 1] scale:
        return ((256 * y - 0.5) / 127.5 - 1).clamp(-1, 1)
