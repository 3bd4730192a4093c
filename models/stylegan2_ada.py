"""StyleGAN2 with adaptive discriminator augmentation (ADA).

Karras, Aittala, Hellsten, Laine, Lehtinen & Aila (2020), "Training Generative Adversarial Networks
with Limited Data", NeurIPS, on the StyleGAN2 architecture of Karras, Laine, Aittala, Hellsten,
Lehtinen & Aila (2020), "Analyzing and Improving the Image Quality of StyleGAN", CVPR.

Implemented: a mapping network z -> w (lr multiplier 0.01) and a synthesis network from a learned
constant; modulated and demodulated convolutions (in the paper's non-fused form, ``ModConv``);
per-pixel noise; the skip generator and the residual discriminator ending in minibatch std; the
non-saturating logistic loss with lazy R1 every ``r1_interval`` steps (D's Adam adjusted as the paper's
lazy regularisation); adaptive augmentation of every image D sees, each augmentation applied with
probability p, p moved every ``ada_interval`` steps by sign(r_t - target), r_t = E[sign(D(real))]
(logged as ``ada_p``, ``ada_rt``); truncation in W by ``truncation_psi`` (1, off, as FIDs are
reported); class conditioning as the authors' code (``Config.conditional``, the default: G's mapping
takes the embedded label, D projects its output onto a mapped label).

Following the paper's CIFAR-10 configuration (2 mapping layers, no style mixing or path length
regularisation, gamma 0.01, lr 0.0025, betas (0, 0.99), target 0.6). What the small version changes:
``channels`` at the base grid halved per doubling down to ``min_channels`` (the paper's CIFAR-10 model,
512 everywhere, is ``cifar10_gpu``; ``mnist_gpu`` is half its width), fewer and a smaller latent on the
CPU presets; the augmentations are the paper's geometric and colour groups in a reduced form (no luma
flip, hue, filtering or cutout; ``augment``); bilinear resampling and 2x2 pooling instead of the FIR
filters; a shorter ``ada_images`` on the CPU presets (paper: 500k); minibatch-std groups of 4 (paper:
32). The synthesis starts at the base grid of ``trilemma.models.blocks.halvings`` (7x7 at 28 pixels).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trilemma.contract.family import Capabilities, GenerativeModel
from trilemma.contract.likelihood import to_signed
from trilemma.models.blocks import at_least, halvings, positive, random_labels
from trilemma.models.parts.gan import minibatch_std, pixel_norm, widths

SQRT2 = math.sqrt(2)


@dataclass
class Config:
    conditional: bool = True  # class-conditional on the data set's labels (the paper's 2.42 is)
    num_classes: int = 10  # classes of the data set's labels
    latent_dim: int = 128  # size of z and of w (paper: 512)
    mapping_layers: int = 2  # fully-connected layers of the mapping network (paper's CIFAR-10: 2)
    d_mapping_layers: int = 8  # layers of the discriminator's label mapping (authors' code: 8)
    channels: int = 64  # feature maps at the base grid (paper's CIFAR-10: 512 at every resolution)
    min_channels: int = 64  # ... halved per doubling down to this (the paper's min(cbase / res, cmax))
    lr: float = 0.0025  # Adam learning rate of both networks (paper: 0.0025)
    beta2: float = 0.99  # Adam beta2 (paper: 0.99; beta1 is 0)
    r1_gamma: float = 0.01  # R1 weight gamma (paper's CIFAR-10: 0.01)
    r1_interval: int = 16  # lazy regularisation: R1 every this many steps (paper: 16)
    ada_target: float = 0.6  # the r_t that ADA steers to (paper: 0.6)
    ada_interval: int = 4  # steps between updates of p (paper: 4)
    ada_images: int = 100_000  # images for p to move from 0 to 1 at full speed (paper: 500k)
    truncation_psi: float = 1.0  # truncation in W at sampling time; 1 = none
    w_avg_beta: float = 0.995  # decay of the running mean of w used by truncation (paper: 0.995)

    def __post_init__(self):
        if self.num_classes < 2:
            raise ValueError("'num_classes' must be >= 2")
        at_least(self, 1, "latent_dim", "mapping_layers", "d_mapping_layers", "channels", "min_channels",
                 "r1_interval", "ada_interval", "ada_images")
        positive(self, "lr")
        if self.r1_gamma < 0:
            raise ValueError("'r1_gamma' must be >= 0")
        for k in ("beta2", "ada_target", "w_avg_beta"):
            if not 0 < getattr(self, k) < 1:
                raise ValueError(f"'{k}' must be in (0, 1)")
        if not 0 < self.truncation_psi <= 1:
            raise ValueError("'truncation_psi' must be in (0, 1]")


# --- layers with an equalised learning rate: weights N(0, 1), scaled by 1/sqrt(fan_in) at run time --
class EqLinear(nn.Module):
    def __init__(self, fin: int, fout: int, bias_init: float = 0.0, lr_mul: float = 1.0, act: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fout, fin) / lr_mul)
        self.bias = nn.Parameter(torch.full((fout,), float(bias_init)) / lr_mul)
        self.gain, self.lr_mul, self.act = lr_mul / math.sqrt(fin), lr_mul, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight * self.gain, self.bias * self.lr_mul)
        return F.leaky_relu(y, 0.2) * SQRT2 if self.act else y  # sqrt 2 keeps the variance


class EqConv(nn.Module):
    """Discriminator convolution, optionally followed by 2x2 average pooling and leaky ReLU."""

    def __init__(self, cin: int, cout: int, k: int, bias: bool = True, act: bool = True, down: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, k, k))
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None
        self.gain, self.act, self.down = 1 / math.sqrt(cin * k * k), act, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight * self.gain, self.bias, padding=self.weight.shape[-1] // 2)
        x = F.avg_pool2d(x, 2) if self.down else x
        return F.leaky_relu(x, 0.2) * SQRT2 if self.act else x


class ModConv(nn.Module):
    """Modulated (and by default demodulated) convolution: x (B, I, H, W), w (B, W) -> (B, O, H', W')."""

    def __init__(self, cin: int, cout: int, k: int, w_dim: int, demodulate: bool = True, up: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, k, k))
        self.affine = EqLinear(w_dim, cin, bias_init=1.0)  # A: w -> style s, starting at 1
        self.gain, self.demodulate, self.up = 1 / math.sqrt(cin * k * k), demodulate, up

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # Scaling the weights per image equals scaling the input channels before a shared convolution
        # and the output channels after it (the paper's non-fused form, one ordinary conv for the batch).
        s = self.affine(w)  # (B, I)
        weight = self.weight * self.gain  # (O, I, k, k)
        x = x * s[:, :, None, None]
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        y = F.conv2d(x, weight, padding=weight.shape[-1] // 2)  # (B, O, H', W')
        if self.demodulate:  # 1 / |w'_o| with w'_oik = w_oik s_i: each output channel at unit variance
            norm = s.square() @ weight.square().sum(dim=(2, 3)).T  # (B, O) = sum_ik w_oik^2 s_i^2
            y = y * torch.rsqrt(norm + 1e-8)[:, :, None, None]
        return y


class StyledLayer(nn.Module):
    """Modulated 3x3 conv, per-pixel noise times a learned strength, bias, leaky ReLU."""

    def __init__(self, cin: int, cout: int, w_dim: int, up: bool = False):
        super().__init__()
        self.conv = ModConv(cin, cout, 3, w_dim, up=up)
        self.noise_strength = nn.Parameter(torch.zeros(()))  # starts at 0, as in the paper
        self.bias = nn.Parameter(torch.zeros(cout))

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        x = self.conv(x, w)  # (B, O, H, W)
        noise = torch.randn(x.shape[0], 1, *x.shape[2:], device=x.device)  # one map, all channels
        return F.leaky_relu(x + self.noise_strength * noise + self.bias.view(1, -1, 1, 1), 0.2) * SQRT2


class ToRGB(nn.Module):
    def __init__(self, cin: int, cout: int, w_dim: int):
        super().__init__()
        self.conv = ModConv(cin, cout, 1, w_dim, demodulate=False)  # the paper does not demodulate here
        self.bias = nn.Parameter(torch.zeros(cout))

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.conv(x, w) + self.bias.view(1, -1, 1, 1)


class Mapping(nn.Module):
    """The authors' mapping network: [z, the one-hot label's linear embedding], each at unit second
    moment, through ``layers`` fully-connected layers (lr x 0.01) -> (B, W). G's maps z and the label
    (``num_classes`` 0: z alone), D's the label alone (``z_dim`` 0)."""

    def __init__(self, z_dim: int, num_classes: int, w_dim: int, layers: int):
        super().__init__()
        self.num_classes = num_classes
        self.embed = EqLinear(num_classes, w_dim) if num_classes else None  # one-hot -> (B, W)
        fin = z_dim + (w_dim if num_classes else 0)
        self.layers = nn.Sequential(*[EqLinear(fin if i == 0 else w_dim, w_dim, lr_mul=0.01, act=True)
                                      for i in range(layers)])

    def forward(self, z: torch.Tensor | None, y: torch.Tensor | None) -> torch.Tensor:
        parts = [] if z is None else [pixel_norm(z)]  # (B, Z)
        if self.embed is not None:
            parts.append(pixel_norm(self.embed(F.one_hot(y, self.num_classes).float())))  # (B, W)
        return self.layers(torch.cat(parts, dim=1))  # (B, W)


class Generator(nn.Module):
    """z (B, Z), y (B,) (None when unconditional) -> w (B, W) -> image (B, C, H, W), unbounded
    (clamped to [-1, 1] only for sampling)."""

    def __init__(self, cfg: Config, shape: tuple[int, int, int]):
        super().__init__()
        c, h, w = shape
        stages, wd = halvings(h, w), cfg.latent_dim
        ch = widths(cfg.channels, cfg.min_channels, stages)  # per resolution, base first
        self.mapping = Mapping(wd, cfg.num_classes if cfg.conditional else 0, wd, cfg.mapping_layers)
        self.register_buffer("w_avg", torch.zeros(wd))  # running mean of w, for truncation
        self.const = nn.Parameter(torch.randn(ch[0], h >> stages, w >> stages))  # (C, h0, w0)
        self.base = StyledLayer(ch[0], ch[0], wd)
        self.base_rgb = ToRGB(ch[0], c, wd)
        self.blocks = nn.ModuleList(nn.ModuleDict({"conv0": StyledLayer(ch[i], ch[i + 1], wd, up=True),
                                                   "conv1": StyledLayer(ch[i + 1], ch[i + 1], wd),
                                                   "rgb": ToRGB(ch[i + 1], c, wd)}) for i in range(stages))

    def map(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.mapping(z, y)  # z (B, Z) and the class y (B,) -> w (B, W)

    def synthesis(self, w: torch.Tensor) -> torch.Tensor:
        x = self.base(self.const.expand(w.shape[0], -1, -1, -1), w)  # (B, ch, h0, w0)
        img = self.base_rgb(x, w)  # (B, C, h0, w0)
        for block in self.blocks:  # skip architecture: the upsampled image plus this resolution's RGB
            x = block["conv1"](block["conv0"](x, w), w)
            img = F.interpolate(img, scale_factor=2, mode="bilinear", align_corners=False)
            img = img + block["rgb"](x, w)
        return img


class Discriminator(nn.Module):
    """Residual discriminator: image (B, C, H, W), y (B,) (None when unconditional) -> logit (B,)."""

    def __init__(self, cfg: Config, shape: tuple[int, int, int]):
        super().__init__()
        c, h, w = shape
        stages = halvings(h, w)
        ch = widths(cfg.channels, cfg.min_channels, stages)[::-1]  # per resolution, full first
        self.from_rgb = EqConv(c, ch[0], 1)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "conv0": EqConv(ch[i], ch[i], 3), "conv1": EqConv(ch[i], ch[i + 1], 3, down=True),
            "skip": EqConv(ch[i], ch[i + 1], 1, bias=False, act=False, down=True)}) for i in range(stages))
        self.conv = EqConv(ch[-1] + 1, ch[-1], 3)
        self.fc = EqLinear(ch[-1] * (h >> stages) * (w >> stages), ch[-1], act=True)
        # Conditional: the output is a vector, projected onto the label's cmap (D's base-grid width).
        self.cmap_dim = ch[-1] if cfg.conditional else 0
        self.out = EqLinear(ch[-1], self.cmap_dim or 1)
        self.mapping = (Mapping(0, cfg.num_classes, self.cmap_dim, cfg.d_mapping_layers)
                        if cfg.conditional else None)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        x = self.from_rgb(x)
        for block in self.blocks:
            x = (block["skip"](x) + block["conv1"](block["conv0"](x))) / SQRT2
        x = self.conv(minibatch_std(x))  # (B, ch, h0, w0)
        out = self.out(self.fc(x.flatten(1)))  # (B, 1), or (B, cmap_dim) when conditional
        if self.mapping is None:
            return out.squeeze(1)
        return (out * self.mapping(None, y)).sum(1) / math.sqrt(self.cmap_dim)  # (B,)


def augment(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """ADA's augmentations, each applied to each image with probability ``p``; differentiable in x.

    x (B, C, H, W) in about [-1, 1]; p a 0-dim tensor (no host read). The geometric ones compose into
    one matrix from output to input coordinates ([-1, 1] normalised), applied by one warp.
    """
    b, c, h, w = x.shape
    dev = x.device

    def on() -> torch.Tensor:  # (B,) 1 where this augmentation applies to the image
        return (torch.rand(b, device=dev) < p).float()

    def mat(a, bb, cc, d, tx, ty) -> torch.Tensor:  # (B, 3, 3) from per-image entries
        one, zero = torch.ones(b, device=dev), torch.zeros(b, device=dev)
        rows = [torch.stack([a, bb, tx], 1), torch.stack([cc, d, ty], 1), torch.stack([zero, zero, one], 1)]
        return torch.stack(rows, 1)

    def rot(theta: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros(b, device=dev)
        return mat(theta.cos(), -theta.sin(), theta.sin(), theta.cos(), zero, zero)

    def scale(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros(b, device=dev)
        return mat(sx, zero, zero, sy, zero, zero)

    def shift(tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
        one, zero = torch.ones(b, device=dev), torch.zeros(b, device=dev)
        return mat(one, zero, zero, one, tx, ty)

    one = torch.ones(b, device=dev)
    m = scale(1 - 2 * on() * torch.randint(0, 2, (b,), device=dev), one)  # x-flip
    m = m @ rot(on() * torch.randint(0, 4, (b,), device=dev) * (math.pi / 2))  # 90-degree rotations
    t = on()[:, None] * (torch.rand(b, 2, device=dev) * 2 - 1) * 0.125  # integer translation, <= 1/8
    m = m @ shift(2 * torch.round(t[:, 0] * w) / w, 2 * torch.round(t[:, 1] * h) / h)
    s = torch.exp2(on() * torch.randn(b, device=dev) * 0.2)  # isotropic scaling, lognormal(0, 0.2 ln 2)
    m = m @ scale(s, s)
    m = m @ rot(on() * (torch.rand(b, device=dev) * 2 - 1) * math.pi)  # arbitrary rotation
    s = torch.exp2(on() * torch.randn(b, device=dev) * 0.2)  # anisotropic scaling
    m = m @ scale(s, 1 / s)
    t = on()[:, None] * torch.randn(b, 2, device=dev) * 0.125  # fractional translation
    m = m @ shift(2 * t[:, 0], 2 * t[:, 1])
    grid = F.affine_grid(m[:, :2], list(x.shape), align_corners=False)  # (B, H, W, 2)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    # Colour: brightness, contrast, and saturation (around the per-pixel grey) for RGB images.
    x = x + (on() * torch.randn(b, device=dev) * 0.2).view(b, 1, 1, 1)
    x = x * torch.exp2(on() * torch.randn(b, device=dev) * 0.5).view(b, 1, 1, 1)
    if c == 3:
        grey = x.mean(1, keepdim=True)
        x = grey + (x - grey) * torch.exp2(on() * torch.randn(b, device=dev)).view(b, 1, 1, 1)
    return x


class StyleGAN2ADA(GenerativeModel):
    name = "stylegan2_ada"
    paper = ("Karras, Aittala, Hellsten, Laine, Lehtinen & Aila (2020), Training Generative Adversarial "
             "Networks with Limited Data, NeurIPS")
    family = "GAN"
    literature = "StyleGAN2 + ADA"
    capabilities = Capabilities(density="none", free_form_jacobian=True, sampling="one_pass",
                                conditional=True)  # an instance's follows Config.conditional
    Config = Config
    presets = {
        "tiny": {"latent_dim": 16, "mapping_layers": 1, "channels": 8, "min_channels": 8, "r1_interval": 2,
                 "ada_images": 1000},
        "mnist": {"latent_dim": 64, "channels": 32, "min_channels": 16, "lr": 0.002, "ada_images": 20_000},
        "cifar10": {"latent_dim": 128, "channels": 128, "min_channels": 64, "ada_images": 100_000},
        # The paper's CIFAR-10 model (512 feature maps at 4, 8, 16 and 32, w of 512); MNIST at half width.
        "mnist_gpu": {"latent_dim": 256, "channels": 256, "min_channels": 256, "ada_images": 200_000},
        "cifar10_gpu": {"latent_dim": 512, "channels": 512, "min_channels": 512, "ada_images": 500_000},
    }

    def __init__(self, config: Config, data_shape: tuple[int, int, int]):
        super().__init__(config, data_shape)
        self.generator = Generator(config, self.data_shape)
        self.discriminator = Discriminator(config, self.data_shape)
        self.register_buffer("ada_p", torch.zeros(()))  # the augmentation probability
        self.register_buffer("ada_rt", torch.zeros(()))  # the last r_t, for the log
        self.register_buffer("ada_stats", torch.zeros(2))  # sum of sign(D(real)), count, since the update
        self.steps = 0  # host-side step counter for the lazy R1 and ADA intervals

    def configure_optimizers(self):
        cfg = self.config
        c = cfg.r1_interval / (cfg.r1_interval + 1)  # lazy regularisation's correction of D's Adam
        return {
            "generator": torch.optim.Adam(self.generator.parameters(), cfg.lr, betas=(0.0, cfg.beta2)),
            "discriminator": torch.optim.Adam(self.discriminator.parameters(), cfg.lr * c,
                                              betas=(0.0, cfg.beta2 ** c)),
        }

    def ada_update(self, d_real: torch.Tensor) -> None:
        """Accumulate sign(D(real)) (B,) and, every ``ada_interval`` steps, move p by the heuristic."""
        cfg = self.config
        self.ada_stats += torch.stack([d_real.detach().sign().sum(), d_real.new_tensor(float(len(d_real)))])
        self.steps += 1
        if self.steps % cfg.ada_interval == 0:
            rt = self.ada_stats[0] / self.ada_stats[1]
            step = torch.sign(rt - cfg.ada_target) * self.ada_stats[1] / cfg.ada_images
            self.ada_p.copy_((self.ada_p + step).clamp(0, 1))
            self.ada_rt.copy_(rt)
            self.ada_stats.zero_()

    def train_step(self, x: torch.Tensor, update, labels: torch.Tensor | None = None):
        cfg, G, D = self.config, self.generator, self.discriminator
        if cfg.conditional and labels is None:
            raise ValueError("stylegan2_ada is class-conditional: train_step needs labels=")
        y_real = labels if cfg.conditional else None  # (B,)
        real = to_signed(x)  # (B, C, H, W)
        z = torch.randn(x.shape[0], cfg.latent_dim, device=x.device)

        # Discriminator: softplus(D(aug fake)) + softplus(-D(aug real)), plus lazy R1 on the reals.
        y_fake = random_labels(len(x), cfg, self.device)
        with torch.no_grad():
            fake = G.synthesis(G.map(z, y_fake))
        lazy_r1 = cfg.r1_gamma > 0 and self.steps % cfg.r1_interval == 0
        real = real.requires_grad_(lazy_r1)
        d_real = D(augment(real, self.ada_p), y_real)
        d_loss = F.softplus(D(augment(fake, self.ada_p), y_fake)).mean() + F.softplus(-d_real).mean()
        r1 = torch.zeros((), device=x.device)
        if lazy_r1:  # R1 = |grad_x D(x)|^2 on reals, weighted by the interval it stands for
            (grad,) = torch.autograd.grad(d_real.sum(), real, create_graph=True)
            r1 = grad.square().sum(dim=(1, 2, 3)).mean()
            d_loss = d_loss + cfg.r1_gamma / 2 * r1 * cfg.r1_interval
        update("discriminator", d_loss)
        self.ada_update(d_real)

        # Generator, non-saturating: softplus(-D(aug G(z))); D's weights are frozen for this pass.
        D.requires_grad_(False)
        y_fake = random_labels(len(x), cfg, self.device)
        w = G.map(torch.randn_like(z), y_fake)
        g_loss = F.softplus(-D(augment(G.synthesis(w), self.ada_p), y_fake)).mean()
        update("generator", g_loss)
        D.requires_grad_(True)
        with torch.no_grad():
            G.w_avg.lerp_(w.mean(0), 1 - cfg.w_avg_beta)
        return {"d_loss": d_loss.detach(), "g_loss": g_loss.detach(), "r1": r1.detach(),
                "ada_p": self.ada_p.clone(), "ada_rt": self.ada_rt.clone()}

    def samplers(self):
        return {"one_pass": 1}  # z, a uniform class -> w (truncated by Config.truncation_psi) -> image

    def generate(self, n: int, sampler: str) -> torch.Tensor:
        G = self.generator
        w = G.map(torch.randn(n, self.config.latent_dim, device=self.device),
                  random_labels(n, self.config, self.device))
        w = G.w_avg + self.config.truncation_psi * (w - G.w_avg)  # (n, W)
        return G.synthesis(w).clamp(-1, 1)

    def sampling_modules(self):
        return [self.generator]
