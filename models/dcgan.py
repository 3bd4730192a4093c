"""DCGAN: a deep convolutional generative adversarial network.

Radford, Metz & Chintala (2016), "Unsupervised Representation Learning with Deep Convolutional
Generative Adversarial Networks", ICLR; the game of Goodfellow et al. (2014), "Generative Adversarial
Nets", NeurIPS, with its non-saturating generator loss.

The paper's recipe: a generator of a linear "project and reshape" then stride-2 transposed
convolutions with BatchNorm and ReLU and a tanh output; a discriminator of stride-2 convolutions with
LeakyReLU(0.2) and BatchNorm (none on its first layer); weights from N(0, 0.02); Adam 2e-4, beta1 0.5.

What the small version changes: the widths ``ngf`` / ``ndf`` are small on the CPU presets; the number
of stages follows the resolution (``trilemma.models.blocks.halvings``: 28x28 -> 2 stages from 7x7,
32x32 -> 3 from 4x4, 64x64 -> 4 as in the paper), and the discriminator ends in a linear layer over
the base grid rather than a 4x4 valid convolution, so odd grids such as MNIST's 7x7 work. The GPU
presets take ngf = ndf = 64, the paper's last-stage width (256 channels on the 4x4 grid, 3 stages:
1.07M generator and 0.66M discriminator parameters at 32x32), a quarter of its 64x64 LSUN model's base.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trilemma.contract.family import Capabilities, GenerativeModel
from trilemma.contract.likelihood import to_signed
from trilemma.models.blocks import at_least, halvings, positive


@dataclass
class Config:
    latent_dim: int = 100  # size of the generator's input noise z ~ N(0, I), as in the paper
    ngf: int = 64  # generator channels at its last hidden stage; the base grid has ngf * 2^(L-1)
    ndf: int = 64  # discriminator channels after its first stride-2 conv; doubles at each stage
    lr: float = 2e-4  # Adam learning rate for both networks (paper: 0.0002)
    beta1: float = 0.5  # Adam beta1 (paper: 0.5)
    beta2: float = 0.999  # Adam beta2
    init_std: float = 0.02  # std of the N(0, std) weight initialisation (paper: 0.02)

    def __post_init__(self):
        at_least(self, 1, "latent_dim", "ngf", "ndf")
        positive(self, "lr", "init_std")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError("'beta1' and 'beta2' must be in [0, 1)")


class Generator(nn.Module):
    """z (B, latent) -> image (B, C, H, W) in (-1, 1)."""

    def __init__(self, cfg: Config, shape: tuple[int, int, int]):
        super().__init__()
        c, h, w = shape
        self.stages = halvings(h, w)
        self.base = (h >> self.stages, w >> self.stages)  # the grid the projection reshapes to
        widths = [cfg.ngf * 2 ** (self.stages - 1 - i) for i in range(self.stages)] + [c]
        self.base_channels = widths[0]
        # "Project and reshape": one matmul to the base grid, then BatchNorm + ReLU.
        self.project = nn.Linear(cfg.latent_dim, widths[0] * self.base[0] * self.base[1], bias=False)
        self.project_norm = nn.BatchNorm2d(widths[0])
        layers: list[nn.Module] = []
        for i in range(self.stages):
            last = i == self.stages - 1
            # kernel 4, stride 2, padding 1 exactly doubles the grid.
            layers.append(nn.ConvTranspose2d(widths[i], widths[i + 1], 4, 2, 1, bias=last))
            if not last:
                layers += [nn.BatchNorm2d(widths[i + 1]), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        # With no stage at all (a 4x4 image), the projection itself produces the C output channels.
        self.out_bias = nn.Parameter(torch.zeros(c)) if self.stages == 0 else None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.project(z).view(z.shape[0], self.base_channels, *self.base)  # (B, C0, h0, w0)
        if self.stages == 0:
            return torch.tanh(h + self.out_bias.view(1, -1, 1, 1))
        h = F.relu(self.project_norm(h))
        return torch.tanh(self.body(h))  # (B, C, H, W)


class Discriminator(nn.Module):
    """image (B, C, H, W) in [-1, 1] -> real/fake logit (B,)."""

    def __init__(self, cfg: Config, shape: tuple[int, int, int]):
        super().__init__()
        c, h, w = shape
        stages = halvings(h, w)
        layers: list[nn.Module] = []
        channels = c
        for i in range(stages):
            out = cfg.ndf * 2 ** i
            layers.append(nn.Conv2d(channels, out, 4, 2, 1, bias=i == 0))
            if i > 0:  # the paper puts no BatchNorm on the discriminator's input layer
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.LeakyReLU(0.2))
            channels = out
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(channels * (h >> stages) * (w >> stages), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).flatten(1)).squeeze(1)  # (B,)


class DCGAN(GenerativeModel):
    name = "dcgan"
    paper = ("Radford, Metz & Chintala (2016), Unsupervised Representation Learning with Deep "
             "Convolutional Generative Adversarial Networks, ICLR")
    family = "GAN"
    literature = "DCGAN"
    capabilities = Capabilities(density="none", free_form_jacobian=True, sampling="one_pass")
    Config = Config
    presets = {
        "tiny": {"latent_dim": 16, "ngf": 8, "ndf": 8},
        "mnist": {"latent_dim": 64, "ngf": 32, "ndf": 32},
        "cifar10": {"latent_dim": 100, "ngf": 32, "ndf": 32},
        "mnist_gpu": {"latent_dim": 100, "ngf": 64, "ndf": 64},
        "cifar10_gpu": {"latent_dim": 100, "ngf": 64, "ndf": 64},
    }

    def __init__(self, config: Config, data_shape: tuple[int, int, int]):
        super().__init__(config, data_shape)
        self.generator = Generator(config, self.data_shape)
        self.discriminator = Discriminator(config, self.data_shape)
        for m in self.modules():  # the paper's initialisation: N(0, 0.02), BatchNorm gains N(1, 0.02)
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                nn.init.normal_(m.weight, 0.0, config.init_std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, config.init_std)
                nn.init.zeros_(m.bias)

    def configure_optimizers(self):
        betas = (self.config.beta1, self.config.beta2)
        return {
            "generator": torch.optim.Adam(self.generator.parameters(), self.config.lr, betas=betas),
            "discriminator": torch.optim.Adam(self.discriminator.parameters(), self.config.lr, betas=betas),
        }

    def train_step(self, x: torch.Tensor, update):
        # The generator's loss is computed after the discriminator has stepped: an alternation, so
        # the family runs its own two updates.
        real = to_signed(x)  # (B, C, H, W) in [-1, 1]
        z = torch.randn(x.shape[0], self.config.latent_dim, device=x.device)
        fake = self.generator(z)  # (B, C, H, W)

        # Discriminator: -log D(x) - log(1 - D(G(z))), with D = sigmoid(logit). Real and fake go
        # through it as separate batches, so each BatchNorm batch is all real or all fake (as the paper).
        d_real = self.discriminator(real)
        d_fake = self.discriminator(fake.detach())
        d_loss = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
        update("discriminator", d_loss)

        # Generator, non-saturating: maximise log D(G(z)) instead of minimising log(1 - D(G(z))),
        # which has vanishing gradients early on when D rejects every fake (Goodfellow et al. 2014).
        g_loss = F.softplus(-self.discriminator(fake)).mean()
        update("generator", g_loss)  # also fills the discriminator's grads; zeroed before its next step
        return {
            "d_loss": d_loss.detach(),
            "g_loss": g_loss.detach(),
            "d_real": torch.sigmoid(d_real).mean().detach(),  # D's mean belief that reals are real
            "d_fake": torch.sigmoid(d_fake).mean().detach(),  # ... and that fakes are real
        }

    def samplers(self):
        return {"one_pass": 1}  # z ~ N(0, I) through the generator

    def generate(self, n: int, sampler: str) -> torch.Tensor:
        z = torch.randn(n, self.config.latent_dim, device=self.device)
        return self.generator(z).clamp(-1, 1)  # (n, C, H, W)

    def sampling_modules(self):
        return [self.generator]
