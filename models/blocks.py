"""Small building blocks that several families use the same way, written once.

Only what is shared *as is* lives here (the ODE density of the continuous-time families is in
``trilemma.models.ode``, whole networks that families share in ``trilemma.models.parts``); a block
that one family tunes to its paper stays in that family's file (STYLE.md: a little repetition across
model files beats a deep hierarchy).

    halvings        the resolution rule of the convolutional families: how often an image is halved
    flow_scales     the scales of a multi-scale flow by that rule, checked (FFJORD)
    gaussian_kl     KL between diagonal Gaussians (VAE, GON, DDPM's bound)
    ActNorm         Glow's data-initialised per-channel affine layer (Glow, RealNVP)
    at_least,       the range checks of a Config's ``__post_init__``: sizes >= 1, rates > 0, with the
    positive        ValueError the suite loader turns into one line naming the key
    random_labels   the uniform class draws of a class-conditional family (BigGAN, StyleGAN2)
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


def flow_scales(family: str, scales: int, h: int, w: int) -> int:
    """The scales of a multi-scale flow on ``h x w`` images, one squeeze between each two: ``scales``, or
    (0) one per halving plus one; a ValueError naming ``family`` when the image cannot be squeezed so often."""
    n = scales or halvings(h, w) + 1
    if h % 2 ** (n - 1) or w % 2 ** (n - 1):
        raise ValueError(f"{family}: {h}x{w} images cannot be squeezed {n - 1} times")
    return n


def at_least(cfg, bound: int | float, *names: str) -> None:
    """Each field ``names`` of ``cfg`` is >= ``bound`` (a width, a depth, a step count: 1), else a
    ValueError naming the first that is not."""
    for name in names:
        if not getattr(cfg, name) >= bound:
            raise ValueError(f"'{name}' must be >= {bound}")


def positive(cfg, *names: str) -> None:
    """Each field ``names`` of ``cfg`` is > 0 (a learning rate, a scale, a tolerance), else a ValueError
    naming the first that is not."""
    for name in names:
        if not getattr(cfg, name) > 0:
            raise ValueError(f"'{name}' must be > 0")


def random_labels(n: int, cfg, device: torch.device) -> torch.Tensor | None:
    """``n`` classes drawn uniformly (n,) for a Config with ``conditional`` and ``num_classes``, or None
    when the model is unconditional."""
    if not cfg.conditional:
        return None
    return torch.randint(0, cfg.num_classes, (n,), device=device)


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
