"""Layers the GAN families share as is: ProGAN's minibatch standard deviation (StyleGAN2 keeps it), the
feature widths per resolution of ProGAN and StyleGAN2, pixel normalisation, and nearest-neighbour 2x
upsampling (ProGAN, BigGAN). Each family's own layers (equalised-learning-rate convolutions tuned to
its paper, modulated convolutions, conditional batch norm) stay in its file.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def widths(channels: int, min_channels: int, stages: int) -> list[int]:
    """Feature maps per resolution, base grid first: ``channels`` halved per doubling, at least
    ``min_channels`` (never more than ``channels``). (stages + 1,)"""
    return [max(channels >> i, min(min_channels, channels)) for i in range(stages + 1)]


def minibatch_std(x: torch.Tensor, group: int = 4) -> torch.Tensor:
    """Append the mean over features of the per-group standard deviation: (B, C, H, W) -> (B, C+1, H, W)."""
    b, c, h, w = x.shape
    g = min(group, b)
    while b % g:
        g -= 1
    y = x.view(g, -1, c, h, w)  # (G, M, C, H, W); image i*M + m is member i of group m
    y = (y - y.mean(0)).square().mean(0).add(1e-8).sqrt().mean(dim=(1, 2, 3))  # (M,)
    return torch.cat([x, y.view(-1, 1, 1, 1).repeat(g, 1, h, w)], dim=1)


def pixel_norm(x: torch.Tensor) -> torch.Tensor:
    """Each pixel's feature vector to unit mean square: x / sqrt(mean_c x^2 + 1e-8), over dim 1."""
    return x * torch.rsqrt(x.square().mean(1, keepdim=True) + 1e-8)


def up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")  # (B, C, 2H, 2W)
