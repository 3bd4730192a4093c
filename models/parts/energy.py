"""IGEBM's energy network (Du & Mordatch 2019, "Implicit Generation and Generalization in Energy-Based
Models"): a convolutional ResNet mapping an image to one scalar energy, shared by the energy-based
families (igebm; flow_ce without spectral normalisation; vaebm).

One level per halving of the image (``halvings``): a downsampling residual block followed by
``blocks_per_level - 1`` plain ones, channels doubling at each level up to ``max_channels``; the final
feature map is summed over positions (global sum pooling, as in the paper) and mapped to E.
With ``num_classes`` > 0 the energy is class-conditional, E(x, y), as in the paper's code
(openai/ebm_code_release, ``conv_block``): each residual block adds a learned per-class bias to the
input of each convolution and multiplies its second convolution's output by a learned per-class gain.
``trilemma.models.igebm`` describes how it departs from the paper.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from trilemma.models.blocks import halvings


def _sn(layer: nn.Module, enabled: bool) -> nn.Module:
    return spectral_norm(layer) if enabled else layer


class ResBlock(nn.Module):
    """Pre-activation residual block, optionally halving the resolution with average pooling.

    The paper pools after the two convolutions; here a downsampling block pools first, so both of
    its convolutions run at the lower resolution (4x cheaper; every Langevin step pays for it).
    """

    def __init__(self, c_in: int, c_out: int, downsample: bool, act, sn: bool, num_classes: int = 0):
        super().__init__()
        self.act, self.downsample = act, downsample
        self.conv1 = _sn(nn.Conv2d(c_in, c_out, 3, padding=1), sn)
        self.conv2 = _sn(nn.Conv2d(c_out, c_out, 3, padding=1), sn)
        self.skip = _sn(nn.Conv2d(c_in, c_out, 1), sn) if c_in != c_out else nn.Identity()
        self.num_classes = num_classes
        if num_classes:  # per-class biases (zero) before each convolution, a gain (one) after the second
            self.bias1, self.bias2 = nn.Embedding(num_classes, c_in), nn.Embedding(num_classes, c_out)
            self.gain = nn.Embedding(num_classes, c_out)
            nn.init.zeros_(self.bias1.weight)
            nn.init.zeros_(self.bias2.weight)
            nn.init.ones_(self.gain.weight)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.downsample:
            x = F.avg_pool2d(x, 2)  # (B, c_in, H/2, W/2)
        if not self.num_classes:
            return self.skip(x) + self.conv2(self.act(self.conv1(self.act(x))))  # (B, c_out, H', W')
        per_class = lambda table: table(labels)[:, :, None, None]  # noqa: E731  (B, C, 1, 1)
        h = self.conv1(self.act(x) + per_class(self.bias1))
        h = self.conv2(self.act(h) + per_class(self.bias2)) * per_class(self.gain)  # (B, c_out, H', W')
        return self.skip(x) + h


class EnergyNet(nn.Module):
    """x (B, C, H, W) in [-1, 1] -> energy (B,); low energy = likely.

    ``activation`` is "leaky_relu" (slope 0.2) or "swish"; ``spectral_norm`` normalises every layer,
    as in the paper (a smooth energy); ``num_classes`` > 0 makes it class-conditional (``labels``
    int64 (B,) required), the per-class tables left unnormalised as in the paper's code."""

    def __init__(self, shape: tuple[int, int, int], channels: int, max_channels: int,
                 blocks_per_level: int, activation: str = "leaky_relu", spectral_norm: bool = True,
                 num_classes: int = 0):
        super().__init__()
        c, h, w = shape
        if activation == "leaky_relu":
            act = lambda t: F.leaky_relu(t, 0.2)  # noqa: E731
        elif activation == "swish":
            act = F.silu
        else:
            raise ValueError(f"activation must be 'leaky_relu' or 'swish', got {activation!r}")
        self.act, self.num_classes = act, num_classes
        self.stem = _sn(nn.Conv2d(c, channels, 3, padding=1), spectral_norm)
        blocks, ch = [], channels
        # One level per halving (see the module docstring): a downsampling block, then plain blocks.
        for _ in range(halvings(h, w)):
            out = min(ch * 2, max_channels)
            blocks.append(ResBlock(ch, out, True, act, spectral_norm, num_classes))
            blocks += [ResBlock(out, out, False, act, spectral_norm, num_classes)
                       for _ in range(blocks_per_level - 1)]
            ch = out
        self.blocks = nn.Sequential(*blocks)
        self.head = _sn(nn.Linear(ch, 1), spectral_norm)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_classes and labels is None:
            raise ValueError("a class-conditional energy needs labels")
        h = self.stem(x)
        for block in self.blocks:
            h = block(h, labels if self.num_classes else None)  # (B, ch, h', w')
        h = self.act(h).sum(dim=(2, 3))  # (B, ch): global sum pooling
        return self.head(h).squeeze(1)  # (B,)
