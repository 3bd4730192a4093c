"""Real NVP: a multi-scale normalizing flow of affine coupling layers.

Dinh, Sohl-Dickstein & Bengio (2017), "Density estimation using Real NVP", ICLR.

The paper's recipe, kept here: uniform dequantization and the logit transform
``logit(alpha + (1 - 2 alpha) y)`` with alpha = 0.05 (sec. 4.1); affine coupling layers
``y_b = x_b * exp(s(x_a)) + t(x_a)`` whose log-determinant is ``sum(s)`` (sec. 3.3); checkerboard and
channel-wise masks (sec. 3.4); a multi-scale architecture (sec. 3.6) where each scale applies three
checkerboard couplings, a squeeze (each 2x2 block of a channel becomes 4 channels), three
channel-wise couplings, and then factors out half of the channels as latents, the last scale being
four checkerboard couplings; ResNet coupling networks with weight normalisation and ``s`` bounded
by a tanh times a learned scale; a standard normal prior on all latents; Adam.

Resolution scaling (``scales: 0``): as in the paper, scales are stacked until the last one sees a small
grid; here a scale squeezes while H and W are both even and the halves at least 4 (``halvings``): 8x8 ->
2 scales (last on 4x4), 16x16 -> 3, 28x28 -> 3 (last on 7x7), 32x32 -> 4 (last on 4x4), 64x64 -> 5. A
4x4 image is one scale of checkerboard couplings. ``scales`` > 0 stops earlier.

What the presets change from the paper: docs/families.md (realnvp).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trilemma.contract.likelihood import (bits_per_dim, dequantize, discrete_nll_from_density, logit_inverse,
                                logit_transform)
from trilemma.contract.errors import TrilemmaError
from trilemma.contract.family import Capabilities, GenerativeModel
from trilemma.models.blocks import ActNorm, halvings


@dataclass
class Config:
    hidden: int = 32  # channels inside every coupling network, unless `widths` says otherwise
    blocks: int = 2  # residual blocks per coupling network (paper: 8 on CIFAR-10, 4 or 2 elsewhere)
    scales: int = 0  # scales, a squeeze between each two; 0: from the resolution (down to a 4x4 grid)
    widths: tuple[int, ...] = ()  # coupling-network channels, one per scale (a scale's channel-wise
    #   couplings, on the squeezed grid, take the next scale's); empty: `hidden` everywhere
    alpha: float = 0.05  # the logit transform's margin, keeping it away from 0 and 1 (paper: 0.05)
    lr: float = 1e-3  # Adam learning rate
    grad_clip: float = 100.0  # gradient-norm clip on the bits/dim loss; guards against early spikes

    def __post_init__(self):
        for name in ("hidden", "blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"'{name}' must be >= 1")
        if self.scales < 0:
            raise ValueError("'scales' must be >= 0 (0: from the resolution)")
        if not all(w >= 1 for w in self.widths):
            raise ValueError("'widths' must all be >= 1")
        if self.widths and self.scales and len(self.widths) != self.scales:
            raise ValueError(f"'widths' must have one entry per scale ({self.scales})")
        if not self.lr > 0:
            raise ValueError("'lr' must be > 0")
        if not self.grad_clip >= 0:
            raise ValueError("'grad_clip' must be >= 0")
        if not 0 < self.alpha < 0.5:
            raise ValueError("'alpha' must be in (0, 0.5)")


class WNConv2d(nn.Module):
    """A 'same' convolution with weight normalisation (Salimans & Kingma 2016): w = g * v / |v|."""

    def __init__(self, c_in: int, c_out: int, kernel: int, zero_init: bool = False):
        super().__init__()
        v = torch.empty(c_out, c_in, kernel, kernel)
        nn.init.kaiming_normal_(v, nonlinearity="relu")
        self.v = nn.Parameter(v)
        # g = |v| starts at the plain initialisation; g = 0 makes the layer output exactly zero.
        self.g = nn.Parameter(torch.zeros(c_out) if zero_init else v.flatten(1).norm(dim=1))
        self.bias = nn.Parameter(torch.zeros(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.v * (self.g / self.v.flatten(1).norm(dim=1)).view(-1, 1, 1, 1)
        return F.conv2d(x, w, self.bias, padding=self.v.shape[-1] // 2)


class ResNet(nn.Module):
    """The coupling network: (B, c_in, H, W) -> (B, 2 * c_out, H, W), a log-scale and a shift."""

    def __init__(self, c_in: int, c_out: int, hidden: int, blocks: int):
        super().__init__()
        self.inp = WNConv2d(c_in, hidden, 3)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.ReLU(), WNConv2d(hidden, hidden, 3), nn.ReLU(), WNConv2d(hidden, hidden, 3))
            for _ in range(blocks))
        self.out = WNConv2d(hidden, 2 * c_out, 3, zero_init=True)  # every coupling starts as identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)  # (B, hidden, H, W)
        for block in self.blocks:
            h = h + block(h)
        return self.out(F.relu(h))  # (B, 2 * c_out, H, W)


class Coupling(nn.Module):
    """Affine coupling ``y = b * x + (1 - b) * (x * exp(s) + t)``, s and t computed from ``b * x``.

    ``checkerboard``: b alternates over pixels (all channels alike), and the network also sees the
    mask so it knows which pixels it was given. Otherwise b keeps one half of the channels.
    ``parity`` flips b, so consecutive layers transform the part the previous one kept.
    """

    def __init__(self, channels: int, checkerboard: bool, parity: int, hidden: int, blocks: int):
        super().__init__()
        self.checkerboard, self.parity = checkerboard, parity
        c_in, c_out = (channels + 1, channels) if checkerboard else (channels // 2, channels - channels // 2)
        self.net = ResNet(c_in, c_out, hidden, blocks)
        self.s_scale = nn.Parameter(torch.ones(c_out, 1, 1))  # s = s_scale * tanh(.) (paper sec. 4.1)

    def _mask(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ij = torch.arange(h, device=x.device).view(-1, 1) + torch.arange(w, device=x.device)
        return ((ij + self.parity) % 2).to(x.dtype).view(1, 1, h, w)  # (1, 1, H, W), 1 = kept

    def _s_t(self, kept: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if mask is not None:
            kept = torch.cat([kept, mask.expand(kept.shape[0], -1, -1, -1)], dim=1)
        raw_s, t = self.net(kept).chunk(2, dim=1)
        return self.s_scale * torch.tanh(raw_s), t  # bounded log-scale, shift

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = x[:, : x.shape[1] // 2], x[:, x.shape[1] // 2:]
        return (a, b) if self.parity == 0 else (b, a)  # (kept, transformed)

    def _join(self, kept: torch.Tensor, changed: torch.Tensor) -> torch.Tensor:
        return torch.cat([kept, changed] if self.parity == 0 else [changed, kept], dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) -> y (B, C, H, W) and log |det dy/dx| (B,)."""
        if self.checkerboard:
            b = self._mask(x)
            s, t = self._s_t(x * b, b)
            s, t = s * (1 - b), t * (1 - b)  # the kept pixels are left alone: s = t = 0 there
            return x * b + (1 - b) * (x * torch.exp(s) + t), s.flatten(1).sum(1)
        kept, other = self._split(x)
        s, t = self._s_t(kept, None)
        return self._join(kept, other * torch.exp(s) + t), s.flatten(1).sum(1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        if self.checkerboard:
            b = self._mask(y)
            s, t = self._s_t(y * b, b)  # y * b == x * b: the network sees the same input both ways
            return y * b + (1 - b) * ((y - t) * torch.exp(-s))
        kept, other = self._split(y)
        s, t = self._s_t(kept, None)
        return self._join(kept, (other - t) * torch.exp(-s))


class Scale(nn.Module):
    """One scale: 3 checkerboard couplings, squeeze, 3 channel-wise couplings, factor out half.

    The last scale is 4 checkerboard couplings and factors out everything. Each coupling is
    followed by an actnorm. The checkerboard couplings' networks have ``width`` channels, the
    channel-wise ones (on the squeezed grid) ``squeezed_width``.
    """

    def __init__(self, channels: int, last: bool, width: int, squeezed_width: int, blocks: int):
        super().__init__()
        self.last = last
        n_checker, n_channel = (4, 0) if last else (3, 3)
        self.checker = nn.ModuleList(
            nn.ModuleList([Coupling(channels, True, i % 2, width, blocks), ActNorm(channels)])
            for i in range(n_checker))
        self.channel = nn.ModuleList(
            nn.ModuleList([Coupling(4 * channels, False, i % 2, squeezed_width, blocks), ActNorm(4 * channels)])
            for i in range(n_channel))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """h (B, C, H, W) -> (h for the next scale (B, 2C, H/2, W/2) or None, z out, log-det (B,))."""
        logdet = torch.zeros(h.shape[0], device=h.device, dtype=h.dtype)
        for coupling, norm in self.checker:
            h, ld_coupling = coupling(h)
            h, ld_norm = norm(h)
            logdet = logdet + ld_coupling + ld_norm
        if self.last:
            return None, h, logdet
        h = F.pixel_unshuffle(h, 2)  # squeeze: (B, 4C, H/2, W/2)
        for coupling, norm in self.channel:
            h, ld_coupling = coupling(h)
            h, ld_norm = norm(h)
            logdet = logdet + ld_coupling + ld_norm
        half = h.shape[1] // 2
        return h[:, half:], h[:, :half], logdet  # keep (B, 2C, H/2, W/2), factor out the other half

    def inverse(self, h: torch.Tensor | None, z: torch.Tensor) -> torch.Tensor:
        if self.last:
            h = z
        else:
            h = torch.cat([z, h], dim=1)  # (B, 4C, H/2, W/2)
            for coupling, norm in reversed(self.channel):
                h = coupling.inverse(norm.inverse(h))
            h = F.pixel_shuffle(h, 2)  # unsqueeze: (B, C, H, W)
        for coupling, norm in reversed(self.checker):
            h = coupling.inverse(norm.inverse(h))
        return h


class RealNVP(GenerativeModel):
    name = "realnvp"
    paper = "Dinh, Sohl-Dickstein & Bengio (2017), Density estimation using Real NVP, ICLR"
    family = "Flow"
    literature = "RealNVP"
    capabilities = Capabilities(density="exact", free_form_jacobian=False, sampling="one_pass")
    Config = Config
    # Measured on one CPU core, batch 64: 0.30 s/step at 28x28 and 0.45 s/step at 32x32x3 for the
    # mnist/cifar10 presets, 2.3x the cost for hidden=32. In 100 CPU-seconds on MNIST, hidden=16 with
    # lr 2e-3 reached 1.9 test bits/dim, hidden=16 with lr 1e-3 2.3, hidden=32 with lr 1e-3 2.7.
    presets = {
        "tiny": {"hidden": 8, "blocks": 1},
        "mnist": {"hidden": 16, "blocks": 1, "lr": 2e-3},
        "cifar10": {"hidden": 16, "blocks": 1, "lr": 2e-3},
        # The paper's CIFAR-10 coupling networks, 8 residual blocks of 64 feature maps; on CIFAR-10 also its
        # layout: one squeeze (2 scales), the width doubled on the squeezed grid (the authors' code).
        "mnist_gpu": {"hidden": 64, "blocks": 8, "lr": 1e-3},
        "cifar10_gpu": {"scales": 2, "widths": (64, 128), "blocks": 8, "lr": 1e-3},
    }

    def __init__(self, config: Config, data_shape: tuple[int, int, int]):
        super().__init__(config, data_shape)
        c, h, w = self.data_shape
        squeezes = halvings(h, w) if config.scales == 0 else config.scales - 1
        if squeezes > halvings(h, w):
            raise TrilemmaError(f"realnvp: 'scales' is {config.scales}, more than {h}x{w} images allow "
                                f"({halvings(h, w) + 1}: each squeeze halves an even side, down to 4)")
        widths = config.widths or (config.hidden,) * (squeezes + 1)
        if len(widths) != squeezes + 1:
            raise TrilemmaError(f"realnvp: 'widths' has {len(widths)} entries for the {squeezes + 1} "
                                f"scales of {h}x{w} images")
        self.scales = nn.ModuleList()
        self.z_shapes: list[tuple[int, int, int]] = []  # shape of the latents each scale factors out
        for i in range(squeezes + 1):
            last = i == squeezes
            self.scales.append(Scale(c, last, widths[i], widths[min(i + 1, squeezes)], config.blocks))
            if not last:
                c, h, w = 2 * c, h // 2, w // 2  # squeeze to 4C, then factor out half
            self.z_shapes.append((c, h, w))

    # --- the bijection y <-> z, exposed for the tests -----------------------------------------------
    def encode(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized y in [0, 1) (B, C, H, W) -> z (B, D) and log |det dz/dy| (B,), logit included."""
        h, logdet = logit_transform(y, self.config.alpha)  # (B, C, H, W), (B,)
        zs = []
        for scale in self.scales:
            h, z, ld = scale(h)
            zs.append(z.flatten(1))
            logdet = logdet + ld
        return torch.cat(zs, dim=1), logdet  # (B, D), (B,)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, D) -> y (B, C, H, W): the inverse of :meth:`encode`.

        y lies in (-alpha, 1 - alpha) / (1 - 2 alpha), the logit transform's image, a little wider
        than [0, 1]; ``sample`` clamps it.
        """
        parts = z.split([math.prod(s) for s in self.z_shapes], dim=1)
        h = None
        for scale, part, shape in reversed(list(zip(self.scales, parts, self.z_shapes))):
            h = scale.inverse(h, part.reshape(-1, *shape))
        return (logit_inverse(h, self.config.alpha) + 1) / 2  # logit_inverse maps to [-1, 1]

    def log_prob(self, y: torch.Tensor) -> torch.Tensor:
        """log p(y) of the continuous y in [0, 1)^D, in nats per image (B,): change of variables."""
        z, logdet = self.encode(y)
        log_pz = -0.5 * (z ** 2 + math.log(2 * math.pi)).sum(1)  # standard normal prior
        return log_pz + logdet

    # --- the contract ---------------------------------------------------------------------------
    def configure_optimizers(self):
        return {"model": torch.optim.Adam(self.parameters(), lr=self.config.lr)}

    def loss(self, x: torch.Tensor):
        nll = self.nll(x)  # (B,) nats, a fresh dequantization noise each step
        # The loss in bits/dim: the same scale at any size (clipped to Config.grad_clip by the harness).
        return {"model": bits_per_dim(nll.mean(), self.num_dims)}

    def samplers(self):
        return {"one_pass": 1}  # z ~ N(0, I) through the inverse flow

    def generate(self, n: int, sampler: str) -> torch.Tensor:
        z = torch.randn(n, self.num_dims, device=self.device)
        return (self.decode(z) * 2 - 1).clamp(-1, 1)  # (n, C, H, W)

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        # One uniform dequantization draw per image: an unbiased estimate of the bound
        # -log P(x) <= E_u[-log p(y)] + D log 256 (trilemma.contract.likelihood).
        return discrete_nll_from_density(self.log_prob(dequantize(x)), self.num_dims)

    def nll_protocol(self):
        return {"dequantization": "uniform", "dequantization_draws": 1, "logit_alpha": self.config.alpha}

    def dequantized_log_prob(self, y):  # exact log-determinant: offers the importance-weighted NLL
        return self.log_prob(y)
