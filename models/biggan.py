"""BigGAN: a class-conditional GAN with a shared embedding, self-attention and truncation.

Brock, Donahue & Simonyan (2019), "Large Scale GAN Training for High Fidelity Natural Image
Synthesis", ICLR.

Implemented: class conditioning (``Config.conditional``, the default, as the paper's CIFAR-10 figure):
conditional batch norm in G on [a shared class embedding, a chunk of z] ("skip-z"), the projection
discriminator of Miyato & Koyama (2018) in D (``conditional: false``: z chunks alone, no projection);
residual up- and down-blocks, orthogonal initialisation, spectral norm everywhere but G's shared
embedding; SAGAN self-attention at one resolution of each network; the hinge loss with ``d_steps``
D steps per G step, Adam with beta1 = 0; orthogonal regularisation of G (beta = 1e-4); the
``truncated`` sampler draws z from the normal truncated at ``truncation`` (by the inverse CDF).

What the small version changes (``cifar10_gpu`` is the authors' CIFAR-10 architecture, 256 maps at
every resolution, z of 128, attention at 16x16; ``mnist_gpu`` half as wide): narrower widths and a
smaller z and embedding on the CPU presets, one D step (the authors: 4 on CIFAR-10); a train step's
D steps share its batch of reals, split into ``d_steps`` parts; the EMA generator's batch norm uses
running statistics (the paper's "standing statistics" re-estimate them); attention pools keys and
values 2x2 only on even grids. G starts from the base grid of ``trilemma.models.blocks.halvings`` (4x4
at 32 pixels, 7x7 at 28) with one up-block per doubling; D mirrors it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm

from trilemma.contract.family import Capabilities, GenerativeModel
from trilemma.contract.likelihood import to_signed
from trilemma.models.blocks import at_least, halvings, positive, random_labels
from trilemma.models.parts.gan import up


@dataclass
class Config:
    conditional: bool = True  # class-conditional on the data set's labels (the paper's figure is)
    num_classes: int = 10  # classes of the data set's labels
    latent_dim: int = 128  # size of z, split into chunks per block (paper's CIFAR-10: 128)
    shared_dim: int = 128  # size of the shared class embedding (paper: 128)
    g_channels: int = 64  # generator feature maps at every resolution (authors' CIFAR-10: 256)
    d_channels: int = 64  # discriminator feature maps at every resolution (authors' CIFAR-10: 256)
    attention_halvings: int = 1  # self-attention at the full resolution / 2^this (>= 1)
    lr_g: float = 2e-4  # generator Adam learning rate (authors' CIFAR-10: 2e-4)
    lr_d: float = 2e-4  # discriminator Adam learning rate (authors' CIFAR-10: 2e-4)
    beta2: float = 0.999  # Adam beta2 (beta1 is 0)
    d_steps: int = 1  # discriminator steps per generator step, each on a part of the batch
    ortho_weight: float = 1e-4  # beta of the orthogonal regularisation (paper: 1e-4)
    truncation: float = 0.5  # threshold of the `truncated` sampler, |z_i| <= this

    def __post_init__(self):
        if self.num_classes < 2:
            raise ValueError("'num_classes' must be >= 2")
        at_least(self, 1, "latent_dim", "shared_dim", "g_channels", "d_channels", "attention_halvings", "d_steps")
        positive(self, "lr_g", "lr_d", "truncation")
        if not 0 < self.beta2 < 1:
            raise ValueError("'beta2' must be in (0, 1)")
        if self.ortho_weight < 0:
            raise ValueError("'ortho_weight' must be >= 0")


def sn_conv(cin: int, cout: int, k: int, bias: bool = True) -> nn.Module:
    conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=bias)
    nn.init.orthogonal_(conv.weight)
    return spectral_norm(conv)


def sn_linear(fin: int, fout: int, bias: bool = True) -> nn.Module:
    linear = nn.Linear(fin, fout, bias=bias)
    nn.init.orthogonal_(linear.weight)
    return spectral_norm(linear)


def off_diagonal_gram(weight: torch.Tensor) -> torch.Tensor:
    """BigGAN's orthogonal regulariser |W W^T (1 - I)|_F^2, filters as the rows of W: (out, in * k * k).
    It leaves the norms of the filters free and penalises only their overlaps."""
    w = weight.flatten(1)
    gram = w @ w.T  # (out, out)
    return (gram - torch.diag_embed(gram.diagonal())).square().sum()


class ConditionalBN(nn.Module):
    """Batch norm without its own affine; gain 1 + A(c) and bias B(c) from the condition c (B, D)."""

    def __init__(self, channels: int, cond_dim: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False)
        self.gain = sn_linear(cond_dim, channels, bias=False)
        self.bias = sn_linear(cond_dim, channels, bias=False)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.bn(x) * (1 + self.gain(c))[:, :, None, None] + self.bias(c)[:, :, None, None]


class Attention(nn.Module):
    """SAGAN self-attention: x + gamma * o(softmax(theta^T phi) g), with gamma starting at 0."""

    def __init__(self, ch: int):
        super().__init__()
        self.theta, self.phi = sn_conv(ch, max(ch // 8, 1), 1, False), sn_conv(ch, max(ch // 8, 1), 1, False)
        self.g, self.o = sn_conv(ch, max(ch // 2, 1), 1, False), sn_conv(max(ch // 2, 1), ch, 1, False)
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        pool = (lambda t: F.max_pool2d(t, 2)) if h % 2 == 0 and w % 2 == 0 else (lambda t: t)
        theta = self.theta(x).flatten(2)  # (B, C/8, HW)
        phi, g = pool(self.phi(x)).flatten(2), pool(self.g(x)).flatten(2)  # (B, C/8, N), (B, C/2, N)
        attn = torch.softmax(theta.transpose(1, 2) @ phi, dim=-1)  # (B, HW, N)
        return x + self.gamma * self.o((g @ attn.transpose(1, 2)).view(b, -1, h, w))


class GBlock(nn.Module):
    def __init__(self, cin: int, cout: int, cond_dim: int):
        super().__init__()
        self.bn0, self.conv0 = ConditionalBN(cin, cond_dim), sn_conv(cin, cout, 3)
        self.bn1, self.conv1 = ConditionalBN(cout, cond_dim), sn_conv(cout, cout, 3)
        self.skip = sn_conv(cin, cout, 1)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.conv0(up(F.relu(self.bn0(x, c))))  # (B, cout, 2h, 2w)
        return self.conv1(F.relu(self.bn1(h, c))) + self.skip(up(x))


class DBlock(nn.Module):
    def __init__(self, cin: int, cout: int, preact: bool, down: bool):
        super().__init__()
        self.conv0, self.conv1 = sn_conv(cin, cout, 3), sn_conv(cout, cout, 3)
        self.skip = sn_conv(cin, cout, 1) if cin != cout or down else None
        self.preact, self.down = preact, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.relu(self.conv0(F.relu(x) if self.preact else x)))
        h = F.avg_pool2d(h, 2) if self.down else h
        s = x
        if self.skip is not None:  # authors' order: pre-activated: conv, pool; else pool, conv
            s = self.skip(s) if self.preact else s
            s = F.avg_pool2d(s, 2) if self.down else s
            s = s if self.preact else self.skip(s)
        return h + s


class Generator(nn.Module):
    """z (B, Z), y (B,) (None when unconditional) -> image (B, C, H, W) in (-1, 1)."""

    def __init__(self, cfg: Config, shape: tuple[int, int, int]):
        super().__init__()
        c, h, w = shape
        stages, ch = halvings(h, w), cfg.g_channels
        self.base_shape = (ch, h >> stages, w >> stages)
        self.chunks = [len(t) for t in torch.arange(cfg.latent_dim).tensor_split(stages + 1)]  # skip-z
        # One class embedding for every block; none for the unconditional model.
        self.shared = nn.Embedding(cfg.num_classes, cfg.shared_dim) if cfg.conditional else None
        shared_dim = cfg.shared_dim if cfg.conditional else 0
        self.linear = sn_linear(self.chunks[0], ch * self.base_shape[1] * self.base_shape[2])
        self.blocks = nn.ModuleList(GBlock(ch, ch, shared_dim + self.chunks[i + 1]) for i in range(stages))
        self.attn_level = max(stages - cfg.attention_halvings, 0)  # doublings above the base grid
        self.attention = Attention(ch)
        self.out_bn, self.out_conv = nn.BatchNorm2d(ch), sn_conv(ch, c, 3)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        zs = z.split(self.chunks, dim=1)  # the chunks of z
        e = [self.shared(y)] if self.shared is not None else []  # (B, shared_dim)
        h = self.linear(zs[0]).view(z.shape[0], *self.base_shape)  # (B, ch, h0, w0)
        h = self.attention(h) if self.attn_level == 0 else h
        for i, block in enumerate(self.blocks):
            h = block(h, torch.cat([*e, zs[i + 1]], dim=1))
            h = self.attention(h) if i + 1 == self.attn_level else h
        return torch.tanh(self.out_conv(F.relu(self.out_bn(h))))


class Discriminator(nn.Module):
    """image (B, C, H, W), y (B,) -> hinge logit (B,) with the projection of the class embedding
    (without it, and y None, when unconditional)."""

    def __init__(self, cfg: Config, shape: tuple[int, int, int]):
        super().__init__()
        c, h, w = shape
        stages, ch = halvings(h, w), cfg.d_channels
        # One down-block per halving, then one at the base grid (the authors' 32x32 layout).
        self.blocks = nn.ModuleList(DBlock(c if i == 0 else ch, ch, preact=i > 0, down=i < stages)
                                    for i in range(stages + 1))
        self.attn_block = stages - max(stages - cfg.attention_halvings, 0)  # attend to this block's input
        self.attention = Attention(ch)
        self.linear = sn_linear(ch, 1)
        self.embed = spectral_norm(nn.Embedding(cfg.num_classes, ch)) if cfg.conditional else None
        if self.embed is not None:
            nn.init.orthogonal_(self.embed.weight_orig)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = x
        for i, block in enumerate(self.blocks):
            h = self.attention(h) if i == self.attn_block and i > 0 else h
            h = block(h)
        phi = F.relu(h).sum(dim=(2, 3))  # (B, ch), global sum pooling
        out = self.linear(phi).squeeze(1)  # (B,)
        return out if self.embed is None else out + (self.embed(y) * phi).sum(1)


class BigGAN(GenerativeModel):
    name = "biggan"
    paper = ("Brock, Donahue & Simonyan (2019), Large Scale GAN Training for High Fidelity Natural Image "
             "Synthesis, ICLR")
    family = "GAN"
    literature = "BigGAN"
    capabilities = Capabilities(density="none", free_form_jacobian=True, sampling="one_pass",
                                conditional=True)  # an instance's follows Config.conditional
    Config = Config
    presets = {
        "tiny": {"latent_dim": 16, "shared_dim": 8, "g_channels": 8, "d_channels": 8},
        "mnist": {"latent_dim": 64, "shared_dim": 32, "g_channels": 16, "d_channels": 16},
        "cifar10": {"latent_dim": 128, "shared_dim": 64, "g_channels": 64, "d_channels": 64},
        # The authors' CIFAR-10 architecture (256 maps everywhere, 4 D steps); MNIST at half width.
        "mnist_gpu": {"latent_dim": 128, "shared_dim": 128, "g_channels": 128, "d_channels": 128,
                      "d_steps": 2},
        "cifar10_gpu": {"latent_dim": 128, "shared_dim": 128, "g_channels": 256, "d_channels": 256,
                        "d_steps": 4},
    }

    def __init__(self, config: Config, data_shape: tuple[int, int, int]):
        super().__init__(config, data_shape)
        self.generator = Generator(config, self.data_shape)
        self.discriminator = Discriminator(config, self.data_shape)

    def configure_optimizers(self):
        cfg, betas = self.config, (0.0, self.config.beta2)
        return {"generator": torch.optim.Adam(self.generator.parameters(), cfg.lr_g, betas=betas),
                "discriminator": torch.optim.Adam(self.discriminator.parameters(), cfg.lr_d, betas=betas)}

    def ortho_penalty(self) -> torch.Tensor:
        """The sum of `off_diagonal_gram` over G's weights (not the shared embedding)."""
        return sum((off_diagonal_gram(p) for name, p in self.generator.named_parameters()
                    if p.ndim >= 2 and not name.startswith("shared")), torch.zeros((), device=self.device))

    def latents(self, n: int, truncation: float | None = None) -> torch.Tensor:
        """z (n, Z): standard normal, or truncated to [-truncation, truncation] per coordinate."""
        z = torch.empty(n, self.config.latent_dim, device=self.device)
        if truncation is None:
            return z.normal_()
        return nn.init.trunc_normal_(z, 0.0, 1.0, -truncation, truncation)

    def train_step(self, x: torch.Tensor, update, labels: torch.Tensor | None = None):
        cfg, G, D = self.config, self.generator, self.discriminator
        if cfg.conditional and labels is None:
            raise ValueError("biggan is class-conditional: train_step needs labels=")
        parts = labels.chunk(cfg.d_steps) if cfg.conditional else [None] * cfg.d_steps
        # Discriminator, hinge: relu(1 - D(x, y)) + relu(1 + D(G(z, y'), y')), one step per part of the batch.
        for real, y in zip(to_signed(x).chunk(cfg.d_steps), parts):
            y_fake = random_labels(len(real), cfg, self.device)
            with torch.no_grad():
                fake = G(self.latents(len(real)), y_fake)
            d_real, d_fake = D(real, y), D(fake, y_fake)
            d_loss = F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
            update("discriminator", d_loss)

        # Generator: -D(G(z, y), y) plus the orthogonal regularisation, the critic frozen.
        D.requires_grad_(False)
        y_fake = random_labels(len(x), cfg, self.device)
        g_loss = -D(G(self.latents(len(x)), y_fake), y_fake).mean()
        ortho = self.ortho_penalty()
        update("generator", g_loss + cfg.ortho_weight * ortho)
        D.requires_grad_(True)
        return {"d_loss": d_loss.detach(), "g_loss": g_loss.detach(), "ortho": ortho.detach(),
                "d_real": d_real.mean().detach(), "d_fake": d_fake.mean().detach()}

    def samplers(self):
        # Classes uniform in both; `truncated` draws z from the normal truncated at Config.truncation.
        return {"one_pass": 1, "truncated": 1}

    def generate(self, n: int, sampler: str) -> torch.Tensor:
        z = self.latents(n, self.config.truncation if sampler == "truncated" else None)
        return self.generator(z, random_labels(n, self.config, self.device))  # (n, C, H, W), tanh in (-1, 1)

    def sampling_modules(self):
        return [self.generator]
