"""Small building blocks that several families use the same way, written once.

Only what is shared *as is* lives here (the ODE density of the continuous-time families is in
``trilemma.models.ode``, whole networks that families share in ``trilemma.models.parts``); a block
that one family tunes to its paper stays in that family's file (STYLE.md: a little repetition across
model files beats a deep hierarchy).

    halvings        the resolution rule of the convolutional families: how often an image is halved
    gaussian_kl     KL between diagonal Gaussians (VAE, GON, DDPM's bound)
    ActNorm         Glow's data-initialised per-channel affine layer (Glow, RealNVP)
"""
from __future__ import annotations

import torch
from torch import nn


def halvings(h: int, w: int, min_side: int = 4) -> int:
    """How many times an ``h x w`` grid is halved: while both sides are even and the halves stay at
    least ``min_side``. 16 -> 2 (to 4x4), 28 -> 2 (to 7x7), 32 -> 3 (to 4x4), 64 -> 4 (to 4x4).

    Every family that adds up/down-sampling stages with the resolution uses this rule, so that their
    architectures grow alike in the resolution-scaling study.
    """
    n = 0
    while h % 2 == 0 and w % 2 == 0 and min(h, w) // 2 >= min_side:
        h, w, n = h // 2, w // 2, n + 1
    return n


def gaussian_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor | float = 0.0,
                logvar2: torch.Tensor | float = 0.0) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats; the default second
    Gaussian is the standard normal. Sum over the event dimensions yourself."""
    mean2 = torch.as_tensor(mean2, dtype=mean1.dtype, device=mean1.device)
    logvar2 = torch.as_tensor(logvar2, dtype=mean1.dtype, device=mean1.device)
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1)


class ActNorm(nn.Module):
    """Per-channel ``y = (x + bias) * exp(logscale_factor * logs)`` (Kingma & Dhariwal 2018, "Glow").

    Batch normalisation with its statistics frozen into parameters: the first forward pass in training
    mode sets ``bias`` and ``logs`` so that its batch comes out with zero mean and unit variance per
    channel, once (the ``initialized`` buffer is saved, so a resumed or reloaded model never
    re-initialises). ``logscale_factor`` > 1 makes the log-scales learn that many times faster (the
    official Glow code uses 3). Whether initialisation is pending is also kept as a Python flag, so the
    forward pass never reads the buffer back from the device.
    """

    def __init__(self, channels: int, logscale_factor: float = 1.0):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, channels, 1, 1))  # log-scale / logscale_factor
        self.logscale_factor = logscale_factor
        self.register_buffer("initialized", torch.tensor(False))
        self._ready = False  # mirrors `initialized` on the host

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ready = bool(self.initialized)

    def log_scale(self) -> torch.Tensor:
        return self.logscale_factor * self.logs  # (1, C, 1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) -> y (B, C, H, W) and log |det dy/dx| (B,)."""
        if self.training and not self._ready:
            if not bool(self.initialized):  # data-dependent initialisation, once
                with torch.no_grad():
                    std = x.std(dim=(0, 2, 3), keepdim=True, unbiased=False)
                    self.bias.copy_(-x.mean(dim=(0, 2, 3), keepdim=True))
                    self.logs.copy_(-torch.log(std + 1e-6) / self.logscale_factor)
                    self.initialized.fill_(True)
            self._ready = True
        log_scale = self.log_scale()
        logdet = log_scale.sum() * x.shape[2] * x.shape[3]  # the same for every image
        return (x + self.bias) * torch.exp(log_scale), logdet.expand(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * torch.exp(-self.log_scale()) - self.bias
