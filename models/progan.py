"""ProGAN: progressive growing of GANs.

Karras, Aila, Laine & Lehtinen (2018), "Progressive Growing of GANs for Improved Quality, Stability,
and Variation", ICLR.

Implemented: progressive growing, both networks starting at the base grid and gaining a block per
doubling, each new block faded in (G's output (1 - alpha) up(toRGB_old(h)) + alpha toRGB_new(block(h)),
D mirroring it with average pooling, the reals blended alike); pixelwise feature normalisation; the
equalised learning rate; minibatch standard deviation before D's last block; the WGAN-GP loss (lambda
= 10) with the drift term 0.001 D(x)^2, Adam lr 0.001, betas (0, 0.99), moments reset when a resolution
starts fading in. The schedule is part of the budget: the paper counts images (800k to fade in, 800k to
stabilise); here the first ``grow_until`` of the budget (``self.progress``) is split into 2L equal
phases (``schedule``), and the level and alpha are buffers, so the EMA copy and a checkpoint carry
them. Samples come from the level reached, upsampled to the full resolution. The base grid is that of
``trilemma.models.blocks.halvings`` (4x4 at 32 pixels; 7x7 at 28, so 7 -> 14 -> 28).

What the small version changes: the widths (``channels`` at the base grid, halved per doubling down to
``min_channels``) and a smaller latent (paper: 512) on the CPU presets; ``mnist_gpu`` halves the
paper's 512 maps, ``cifar10_gpu`` keeps its CIFAR-10 networks (as the authors' code configures them for
section 6.5: 128 maps at every resolution, a latent of 128; 2.6M parameters).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trilemma.contract.family import Capabilities, GenerativeModel
from trilemma.contract.likelihood import to_signed
from trilemma.models.blocks import at_least, halvings, positive
from trilemma.models.parts.gan import minibatch_std, pixel_norm, up, widths


@dataclass
class Config:
    latent_dim: int = 128  # size of z, normalised onto the sphere (paper: 512)
    channels: int = 128  # feature maps at the base grid (paper: 512)
    min_channels: int = 64  # ... halved per doubling down to this (paper: 512 up to 32x32)
    lr: float = 0.001  # Adam learning rate of both networks (paper: 0.001)
    beta2: float = 0.99  # Adam beta2 (paper: 0.99; beta1 is 0)
    gp_weight: float = 10.0  # WGAN-GP's lambda (paper: 10)
    drift: float = 0.001  # weight of the drift term D(real)^2 (paper: 0.001)
    grow_until: float = 0.5  # fraction of the budget by which the full resolution has faded in

    def __post_init__(self):
        at_least(self, 1, "latent_dim", "channels", "min_channels")
        positive(self, "lr")
        if not 0 < self.beta2 < 1:
            raise ValueError("'beta2' must be in (0, 1)")
        if self.gp_weight < 0 or self.drift < 0:
            raise ValueError("'gp_weight' and 'drift' must be >= 0")
        if not 0 < self.grow_until <= 1:
            raise ValueError("'grow_until' must be in (0, 1]")


class EqConv(nn.Module):
    """Convolution with the equalised learning rate, then leaky ReLU(0.2) and pixel norm if asked."""

    def __init__(self, cin: int, cout: int, k: int, gain: float = math.sqrt(2), act: bool = True,
                 pixel_norm: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, k, k))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.scale, self.act, self.pixel_norm = gain / math.sqrt(cin * k * k), act, pixel_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight * self.scale, self.bias, padding=self.weight.shape[-1] // 2)
        x = F.leaky_relu(x, 0.2) if self.act else x
        return pixel_norm(x) if self.pixel_norm else x


class EqLinear(nn.Module):
    def __init__(self, fin: int, fout: int, gain: float = math.sqrt(2)):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fout, fin))
        self.bias = nn.Parameter(torch.zeros(fout))
        self.scale = gain / math.sqrt(fin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale, self.bias)


class Generator(nn.Module):
    """z (B, Z) -> image (B, C, h, w) at the given level (h = base * 2^level), unbounded."""

    def __init__(self, cfg: Config, shape: tuple[int, int, int]):
        super().__init__()
        c, h, w = shape
        stages = halvings(h, w)
        ch = widths(cfg.channels, cfg.min_channels, stages)
        self.base_shape = (ch[0], h >> stages, w >> stages)
        # The paper's first block: a dense layer to the base grid, then a 3x3 conv, each pixel-normed.
        self.project = EqLinear(cfg.latent_dim, ch[0] * self.base_shape[1] * self.base_shape[2],
                                gain=math.sqrt(2) / 4)  # the paper's gain for this layer
        self.base_conv = EqConv(ch[0], ch[0], 3, pixel_norm=True)
        self.blocks = nn.ModuleList([nn.Identity()] + [  # blocks[i] grows level i-1 to level i
            nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                          EqConv(ch[i - 1], ch[i], 3, pixel_norm=True),
                          EqConv(ch[i], ch[i], 3, pixel_norm=True)) for i in range(1, stages + 1)])
        self.to_rgb = nn.ModuleList(EqConv(ch[i], c, 1, gain=1.0, act=False) for i in range(stages + 1))

    def forward(self, z: torch.Tensor, level: int, alpha: float) -> torch.Tensor:
        h = self.project(pixel_norm(z)).view(z.shape[0], *self.base_shape)
        h = self.base_conv(pixel_norm(F.leaky_relu(h, 0.2)))  # (B, ch0, h0, w0)
        for i in range(1, level):
            h = self.blocks[i](h)
        if level == 0:
            return self.to_rgb[0](h)
        new = self.to_rgb[level](self.blocks[level](h))  # (B, C, h, w)
        if alpha >= 1:
            return new
        old = up(self.to_rgb[level - 1](h))  # the previous resolution, upsampled
        return old + alpha * (new - old)  # the fade-in: exactly `old` at alpha = 0


class Discriminator(nn.Module):
    """image (B, C, h, w) at the given level -> critic value (B,)."""

    def __init__(self, cfg: Config, shape: tuple[int, int, int]):
        super().__init__()
        c, h, w = shape
        stages = halvings(h, w)
        ch = widths(cfg.channels, cfg.min_channels, stages)
        self.from_rgb = nn.ModuleList(EqConv(c, ch[i], 1) for i in range(stages + 1))
        self.blocks = nn.ModuleList([nn.Identity()] + [  # blocks[i] takes level i down to level i-1
            nn.Sequential(EqConv(ch[i], ch[i], 3), EqConv(ch[i], ch[i - 1], 3), nn.AvgPool2d(2))
            for i in range(1, stages + 1)])
        self.conv = EqConv(ch[0] + 1, ch[0], 3)
        self.fc = EqLinear(ch[0] * (h >> stages) * (w >> stages), ch[0])
        self.out = EqLinear(ch[0], 1, gain=1.0)

    def forward(self, x: torch.Tensor, level: int, alpha: float) -> torch.Tensor:
        h = self.from_rgb[level](x)
        if level > 0:
            h = self.blocks[level](h)
            if alpha < 1:  # fade-in, mirrored: the downsampled image through the old input layer
                old = self.from_rgb[level - 1](F.avg_pool2d(x, 2))
                h = old + alpha * (h - old)
            for i in range(level - 1, 0, -1):
                h = self.blocks[i](h)
        h = self.conv(minibatch_std(h))  # (B, ch0, h0, w0)
        return self.out(F.leaky_relu(self.fc(h.flatten(1)), 0.2)).squeeze(1)  # (B,)


class ProGAN(GenerativeModel):
    name = "progan"
    paper = ("Karras, Aila, Laine & Lehtinen (2018), Progressive Growing of GANs for Improved Quality, "
             "Stability, and Variation, ICLR")
    family = "GAN"
    literature = "ProGAN"
    capabilities = Capabilities(density="none", free_form_jacobian=True, sampling="one_pass")
    Config = Config
    presets = {
        "tiny": {"latent_dim": 16, "channels": 8, "min_channels": 8},
        "mnist": {"latent_dim": 64, "channels": 32, "min_channels": 16},
        "cifar10": {"latent_dim": 128, "channels": 128, "min_channels": 64},
        # MNIST: half the paper's 512 maps; CIFAR-10: the paper's CIFAR-10 networks (the authors' code for its
        # section 6.5: 128 maps at every level, a latent of 128).
        "mnist_gpu": {"latent_dim": 256, "channels": 256, "min_channels": 256},
        "cifar10_gpu": {"latent_dim": 128, "channels": 128, "min_channels": 128},
    }

    def __init__(self, config: Config, data_shape: tuple[int, int, int]):
        super().__init__(config, data_shape)
        self.stages = halvings(*self.data_shape[1:])
        self.generator = Generator(config, self.data_shape)
        self.discriminator = Discriminator(config, self.data_shape)
        self.register_buffer("level", torch.tensor(0))  # the resolution reached: base * 2^level
        self.register_buffer("alpha", torch.tensor(1.0))  # fade-in of that level
        self._level = 0  # host copy, to notice a new level (Adam's moments are reset then)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._level = int(self.level)  # a resumed run does not take its level for a new one

    def schedule(self, progress: float) -> tuple[int, float]:
        """(level, alpha) at a fraction of the budget: 2L equal phases up to grow_until, then level L."""
        if self.stages == 0:
            return 0, 1.0
        phase = min(progress / self.config.grow_until, 1.0) * 2 * self.stages  # in [0, 2L]
        k = int(phase)
        if k >= 2 * self.stages:
            return self.stages, 1.0
        if k % 2 == 0:
            return k // 2, 1.0  # stabilising level k/2 (phase 0: the base)
        return (k + 1) // 2, phase - k  # fading in level (k+1)/2

    def reals(self, x: torch.Tensor, level: int, alpha: float) -> torch.Tensor:
        """Real images (B, C, H, W) at the level's resolution, blended across a fade-in like the fakes."""
        x = F.avg_pool2d(x, 2 ** (self.stages - level)) if level < self.stages else x
        if level == 0 or alpha >= 1:
            return x
        old = up(F.avg_pool2d(x, 2))
        return old + alpha * (x - old)

    def configure_optimizers(self):
        lr, betas = self.config.lr, (0.0, self.config.beta2)
        return {"generator": torch.optim.Adam(self.generator.parameters(), lr, betas=betas),
                "discriminator": torch.optim.Adam(self.discriminator.parameters(), lr, betas=betas)}

    def train_step(self, x: torch.Tensor, update):
        cfg, G, D = self.config, self.generator, self.discriminator
        level, alpha = self.schedule(self.progress)
        if level != self._level:  # a new resolution: the paper resets Adam's moments
            for opt in update.optimizers.values():
                opt.state.clear()
            self._level = level
        self.level.fill_(level)
        self.alpha.fill_(alpha)
        real = self.reals(to_signed(x), level, alpha)  # (B, C, h, w)
        z = torch.randn(x.shape[0], cfg.latent_dim, device=x.device)

        # Critic: D(fake) - D(real) + lambda (|grad D(x_hat)| - 1)^2 + drift D(real)^2.
        with torch.no_grad():
            fake = G(z, level, alpha)
        d_real, d_fake = D(real, level, alpha), D(fake, level, alpha)
        eps = torch.rand(x.shape[0], 1, 1, 1, device=x.device)
        mix = (real + eps * (fake - real)).requires_grad_(True)  # random points between real and fake
        (grad,) = torch.autograd.grad(D(mix, level, alpha).sum(), mix, create_graph=True)
        gp = (grad.flatten(1).norm(dim=1) - 1).square().mean()
        d_loss = d_fake.mean() - d_real.mean() + cfg.gp_weight * gp + cfg.drift * d_real.square().mean()
        update("discriminator", d_loss)

        # Generator: -D(G(z)), with the critic frozen.
        D.requires_grad_(False)
        g_loss = -D(G(torch.randn_like(z), level, alpha), level, alpha).mean()
        update("generator", g_loss)
        D.requires_grad_(True)
        return {"d_loss": d_loss.detach(), "g_loss": g_loss.detach(), "gp": gp.detach(),
                "wasserstein": (d_real.mean() - d_fake.mean()).detach(),
                "level": float(level), "alpha": float(alpha)}

    def samplers(self):
        return {"one_pass": 1}  # z -> image at the level reached, upsampled to the full resolution

    def generate(self, n: int, sampler: str) -> torch.Tensor:
        level, alpha = int(self.level), float(self.alpha)
        z = torch.randn(n, self.config.latent_dim, device=self.device)
        x = self.generator(z, level, alpha)
        for _ in range(self.stages - level):
            x = up(x)
        return x.clamp(-1, 1)  # (n, C, H, W)

    def sampling_modules(self):
        return [self.generator]
