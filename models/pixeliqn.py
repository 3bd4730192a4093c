"""PixelIQN: a gated PixelCNN that outputs quantiles, trained by quantile regression.

Ostrovski, Dabney & Munos (2018), "Autoregressive Quantile Networks for Generative Modeling", ICML.

Instead of a 256-way softmax, the network outputs for every subpixel i the value Q_i(tau_i; x_<i), the
tau_i-quantile of its conditional distribution given the subpixels before, for a level tau_i it takes
as an input. It is trained with the Huber quantile loss of implicit quantile networks (Dabney et al.
2018; kappa is one level) on levels drawn afresh, one per subpixel; sampling is inverse-transform
sampling, tau_i ~ U(0, 1) and x_i = Q_i(tau_i; x_<i), one pass per subpixel (NFE = C*H*W) with
PixelCNN's caches. No likelihood (density "none", as the review's table). The network is the project's
Gated PixelCNN (``trilemma.models.parts.pixelcnn``) conditioned on the map of levels as the Gated
PixelCNN takes a location-dependent condition: IQN's cosine embedding of each tau, masked by colour,
added to every layer's gate input; the head outputs one quantile per colour on the [-1, 1] scale.

What the small version changes from the paper: the CPU presets are PixelCNN's size (6 gated layers of
16 maps, a 7x7 first layer; the paper: the Gated PixelCNN at its full CIFAR-10 size), the ``_gpu``
presets 8 / 12 layers of 64 / 128 maps (a fraction whose exact width we did not take from the paper);
the levels condition the horizontal stack only (the vertical stack feeds it); 32 cosine features (IQN:
64); Adam at a high learning rate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trilemma.contract.family import Capabilities, GenerativeModel
from trilemma.contract.likelihood import from_signed, to_signed
from trilemma.models.parts.pixelcnn import (GatedStacks, MaskedHead, RowConv, check_colours, check_config,
                                             colour_groups)


@dataclass
class Config:
    channels: int = 16  # p: feature maps of each stack (2p before the gate)
    layers: int = 6  # gated layers, the first one (mask A) included
    first_kernel: int = 7  # n of the first layer's n x n receptive field (odd)
    kernel: int = 3  # n of every later layer (odd)
    head_channels: int = 32  # hidden width of the ReLU-1x1-ReLU-1x1 output head
    cos_features: int = 32  # cosine features of a level, cos(pi k tau) for k = 1..cos_features
    tau_embed: int = 32  # width of the embedding phi(tau) (split by colour)
    kappa: float = 2 / 255  # Huber threshold of the quantile loss, on the [-1, 1] scale (one level)
    lr: float = 5e-3  # Adam learning rate
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping

    def __post_init__(self):
        check_config(self, ("channels", "layers", "head_channels", "cos_features", "tau_embed"))
        if self.kappa <= 0:
            raise ValueError("'kappa' must be > 0")


def quantile_huber_loss(u: torch.Tensor, tau: torch.Tensor, kappa: float) -> torch.Tensor:
    """rho_tau(u) elementwise for residuals u = target - quantile at levels tau (same shape)."""
    abs_u = u.abs()
    huber = torch.where(abs_u <= kappa, 0.5 * u ** 2, kappa * (abs_u - 0.5 * kappa))
    return (tau - (u < 0).to(u.dtype)).abs() * huber / kappa


class PixelIQN(GenerativeModel):
    name = "pixeliqn"
    paper = ("Ostrovski, Dabney & Munos (2018), Autoregressive Quantile Networks for Generative "
             "Modeling, ICML")
    family = "AR"
    literature = "PixelIQN"
    capabilities = Capabilities(density="none", free_form_jacobian=False, sampling="autoregressive")
    Config = Config
    presets = {
        "tiny": dict(channels=12, layers=2, first_kernel=3, head_channels=16, cos_features=8, tau_embed=12),
        "mnist": dict(channels=16, layers=6, first_kernel=7, head_channels=32, lr=5e-3),
        "cifar10": dict(channels=24, layers=6, first_kernel=7, head_channels=48, tau_embed=48, lr=5e-3),
        "mnist_gpu": dict(channels=64, layers=8, first_kernel=7, head_channels=256, tau_embed=64, lr=1e-3),
        "cifar10_gpu": dict(channels=128, layers=12, first_kernel=7, head_channels=512, cos_features=64,
                            tau_embed=96, lr=5e-4),
    }

    def __init__(self, config: Config, data_shape):
        super().__init__(config, data_shape)
        c, p = self.data_shape[0], config.channels
        check_colours("pixeliqn", c, channels=p, head_channels=config.head_channels,
                      tau_embed=config.tau_embed)
        groups = colour_groups(p, c)
        self.layers = GatedStacks(c, p, config.layers, config.first_kernel, config.kernel)
        # The levels' embedding, by colour: cosine features of colour c form group c.
        cos_groups = torch.arange(c).repeat_interleave(config.cos_features)
        embed_groups = colour_groups(config.tau_embed, c)
        self.embed = RowConv(c * config.cos_features, config.tau_embed, 1, cos_groups, embed_groups, "B")
        self.conditions = nn.ModuleList([RowConv(config.tau_embed, 2 * p, 1, embed_groups,
                                                 torch.cat([groups, groups]), "B") for _ in self.layers])
        self.head = MaskedHead(p, config.head_channels, c, 1)  # one output per colour: its quantile
        self.register_buffer("freqs", math.pi * torch.arange(1, config.cos_features + 1).float(),
                             persistent=False)

    # --- the network ----------------------------------------------------------------------------
    def tau_terms(self, tau):  # levels (B, C, H, W) -> one gate-input term (B, 2p, H, W) per layer
        cos = torch.cos(tau[:, :, None] * self.freqs[:, None, None]).flatten(1, 2)  # (B, C*K, H, W)
        phi = F.relu(self.embed(cos))  # (B, E, H, W)
        return [cond(phi) for cond in self.conditions]

    def horizontal(self, x, links):  # (B, C, H, W'), links with the levels' terms -> (B, C, H, W')
        return self.head(self.layers.horizontal(x, links))

    def quantiles(self, x, tau):  # x (B, C, H, W) in [-1, 1], tau (B, C, H, W) -> Q (B, C, H, W)
        links = [v + t for v, t in zip(self.layers.vertical(x), self.tau_terms(tau))]
        return self.horizontal(x, links)

    # --- training -------------------------------------------------------------------------------
    def configure_optimizers(self):
        return {"model": torch.optim.Adam(self.parameters(), lr=self.config.lr)}

    def loss(self, x):
        target = to_signed(x)  # (B, C, H, W), the levels' centres
        tau = torch.rand(target.shape, device=x.device)  # one fresh level per subpixel
        u = target - self.quantiles(target, tau)
        loss = quantile_huber_loss(u, tau, self.config.kappa).flatten(1).sum(1).mean()  # per image
        return {"model": loss, "quantile_loss": loss.detach() / self.num_dims}  # the latter per subpixel

    # --- sampling -------------------------------------------------------------------------------
    def samplers(self):
        c, h, w = self.data_shape
        return {"inverse_transform": c * h * w}  # one horizontal-stack pass per subpixel

    @torch.no_grad()
    def generate(self, n, sampler):
        c, height, width = self.data_shape
        x = torch.zeros(n, c, height, width, device=self.device)  # [-1, 1]; unsampled never seen
        tau = torch.rand(n, c, height, width, device=self.device)  # a level per subpixel, drawn once
        terms = self.tau_terms(tau)  # 1x1 convolutions of the levels: computed for the whole image
        for i in range(height):
            top = max(0, i - self.layers.reach_up)  # the vertical stack for row i sees rows top .. i-1
            links = [v[:, :, -1:] + t[:, :, i:i + 1]
                     for v, t in zip(self.layers.vertical(x[:, :, top:i + 1]), terms)]  # (n, 2p, 1, W)
            for j in range(width):
                left = max(0, j - self.layers.reach_left)
                for ch in range(c):
                    q = self.horizontal(x[:, :, i:i + 1, left:j + 1], [l[..., left:j + 1] for l in links])
                    # The quantile, snapped to the nearest of the 256 levels: a discrete sample.
                    x[:, ch, i, j] = to_signed(from_signed(q[:, ch, 0, -1]))
        return x
