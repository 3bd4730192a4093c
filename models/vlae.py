"""VLAE: a VAE with a small-receptive-field PixelCNN decoder and an autoregressive-flow prior.

Chen, Kingma, Salimans, Duan, Dhariwal, Schulman, Sutskever & Abbeel (2017), "Variational Lossy
Autoencoder", ICLR.

Trained on the negative ELBO, E_q[-log p(x|z) + log q(z|x) - log p(z)] >= -log P(x) (the KL against a
flow prior estimated with the posterior sample). q(z|x) is a Gaussian convolutional encoder; p(x|z) a
gated PixelCNN over the 8-bit subpixels (``trilemma.models.parts.pixelcnn``) whose receptive field is
deliberately small, so what it cannot see (a digit's shape) must come through z; z conditions it through
a transposed-convolution network that gives every layer a location-dependent input (van den Oord et al.
2016), on the horizontal stack only. p(z) is an autoregressive-flow prior of a few MADE layers
(Germain et al. 2015), evaluated in one pass and inverted one dimension at a time for sampling; NFE =
C*H*W decoder passes + latent_dim * flow_steps MADE passes.

What the small version changes from the paper: the encoder is the project's VAE encoder
(``trilemma.models.parts.vae``) instead of a ResNet, the MADEs have one hidden layer; on the CPU presets
2 gated layers of 16 maps with 3x3 kernels (3 rows up, 2 columns aside); the ``_gpu`` presets 6 layers
of 64 / 96 maps (7 rows up) with wider encoders and MADEs, a larger model of the same design, not the
paper's CIFAR-10 network; the prior's log-scales bounded smoothly to (-3, 3), its last MADE starting at
zero (the prior starts as N(0, I)); no free bits by default (``free_nats``); Adam at a high learning rate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trilemma.contract.family import Capabilities, GenerativeModel
from trilemma.contract.likelihood import bits_per_dim, categorical_nll, to_signed
from trilemma.models.blocks import at_least, halvings
from trilemma.models.parts.pixelcnn import GatedPixelCNN, check_colours
from trilemma.models.parts.vae import Encoder, gaussian_log_prob


@dataclass
class Config:
    latent_dim: int = 32  # size of z
    nf: int = 32  # channels of the encoder and the conditioning network at full resolution
    flow_steps: int = 2  # MADE layers of the AF prior
    made_hidden: int = 256  # hidden units of each MADE
    channels: int = 16  # p: feature maps of the PixelCNN decoder
    layers: int = 2  # gated decoder layers; the receptive field grows with them
    kernel: int = 3  # n of every decoder layer's n x n kernel (odd)
    head_channels: int = 32  # hidden width of the decoder's output head
    lr: float = 2e-3  # Adam learning rate
    grad_clip: float = 1.0  # max gradient norm (of the loss in nats per subpixel); 0 disables it
    free_nats: float = 0.0  # training floor on the batch's mean KL (Kingma et al. 2016); 0: none
    nll_samples: int = 1  # posterior draws averaged in nll(); each is an unbiased estimate of -ELBO

    def __post_init__(self):
        at_least(self, 1, "nf", "made_hidden", "channels", "head_channels")
        if self.latent_dim < 2:
            raise ValueError("'latent_dim' must be >= 2 (an autoregressive prior needs two dimensions)")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError("'kernel' must be odd and >= 1")
        if min(self.flow_steps, self.layers, self.nll_samples) < 1:
            raise ValueError("'flow_steps', 'layers' and 'nll_samples' must be >= 1")
        if self.lr <= 0 or self.grad_clip < 0 or self.free_nats < 0:
            raise ValueError("'lr' must be > 0, 'grad_clip' and 'free_nats' >= 0")


# --- the autoregressive-flow prior ---------------------------------------------------------------
class MaskedLinear(nn.Linear):
    def __init__(self, cin: int, cout: int, mask: torch.Tensor):
        super().__init__(cin, cout)
        self.register_buffer("mask", mask.float(), persistent=False)  # (cout, cin), fixed by the sizes

    def forward(self, x):
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """z (B, D) -> shift m and log-scale s (B, D) each, output i depending on z_<i only (natural order)."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        degree_in = torch.arange(1, d + 1)  # input i has degree i
        degree_hidden = torch.arange(hidden) % (d - 1) + 1  # 1 .. d-1: unit k sees inputs <= degree
        self.hidden = MaskedLinear(d, hidden, degree_hidden[:, None] >= degree_in[None])
        # Output i (shift and log-scale) sees hidden units of degree < i: inputs strictly before i.
        self.out = MaskedLinear(hidden, 2 * d, degree_in.repeat(2)[:, None] > degree_hidden[None])
        nn.init.zeros_(self.out.weight)  # the flow starts as the identity
        nn.init.zeros_(self.out.bias)

    def forward(self, z):
        m, s = self.out(F.elu(self.hidden(z))).chunk(2, dim=1)
        return m, 3 * torch.tanh(s / 3)  # log-scale bounded smoothly to (-3, 3)


class AFPrior(nn.Module):
    """p(z) through eps = f(z): each step eps_i = (z_i - m_i(z_<i)) * exp(-s_i(z_<i)), then reversed."""

    def __init__(self, d: int, steps: int, hidden: int):
        super().__init__()
        self.d = d
        self.steps = nn.ModuleList(MADE(d, hidden) for _ in range(steps))

    def forward(self, z):  # z (B, D) -> eps (B, D), log |det d eps / dz| (B,)
        logdet = torch.zeros(z.shape[0], device=z.device)
        for made in self.steps:
            m, s = made(z)
            z = ((z - m) * torch.exp(-s)).flip(1)  # reversed: the next step's order is the opposite
            logdet = logdet - s.sum(1)
        return z, logdet

    def log_prob(self, z):  # (B, D) -> (B,)
        eps, logdet = self(z)
        return gaussian_log_prob(eps, torch.zeros_like(eps), torch.zeros_like(eps)) + logdet

    def inverse(self, eps):  # (B, D) -> z (B, D), one MADE pass per dimension and step
        for made in reversed(self.steps):
            y, z = eps.flip(1), torch.zeros_like(eps)
            for i in range(self.d):  # z_i needs z_<i: solved in order
                m, s = made(z)
                z[:, i] = y[:, i] * torch.exp(s[:, i]) + m[:, i]
            eps = z
        return eps


# --- the decoder's conditioning --------------------------------------------------------------------
class Condition(nn.Module):
    """z (B, latent) -> one location-dependent input (B, 2p, H, W) per decoder layer: s = m(z)."""

    def __init__(self, cfg: Config, shape: tuple[int, int, int]):
        super().__init__()
        _, h, w = shape
        stages = halvings(h, w)
        self.base = (cfg.nf, h >> stages, w >> stages)  # (nf, h0, w0)
        self.project = nn.Linear(cfg.latent_dim, math.prod(self.base))
        layers: list[nn.Module] = []
        for _ in range(stages):
            layers += [nn.SiLU(), nn.ConvTranspose2d(cfg.nf, cfg.nf, 4, 2, 1)]  # doubles the grid
        layers += [nn.SiLU(), nn.Conv2d(cfg.nf, cfg.layers * 2 * cfg.channels, 1)]
        self.body = nn.Sequential(*layers)
        self.layers = cfg.layers

    def forward(self, z):
        s = self.body(self.project(z).view(z.shape[0], *self.base))  # (B, L * 2p, H, W)
        return s.chunk(self.layers, dim=1)


class VLAE(GenerativeModel):
    name = "vlae"
    paper = ("Chen, Kingma, Salimans, Duan, Dhariwal, Schulman, Sutskever & Abbeel (2017), "
             "Variational Lossy Autoencoder, ICLR")
    family = "VAE"
    literature = "Variational Lossy AE"
    capabilities = Capabilities(density="bound", free_form_jacobian=False, sampling="autoregressive")
    Config = Config
    presets = {
        "tiny": dict(latent_dim=4, nf=8, made_hidden=16, channels=6, layers=2, head_channels=12),
        # The budget's high learning rate, as PixelCNN's.
        "mnist": dict(latent_dim=32, nf=32, made_hidden=256, channels=16, layers=2, head_channels=32,
                      lr=5e-3),
        "cifar10": dict(latent_dim=64, nf=32, made_hidden=256, channels=24, layers=2, head_channels=48,
                        lr=5e-3),
        "mnist_gpu": dict(latent_dim=64, nf=64, made_hidden=640, channels=64, layers=6, head_channels=256,
                          lr=1e-3),
        "cifar10_gpu": dict(latent_dim=128, nf=128, made_hidden=1024, channels=96, layers=6,
                            head_channels=384, lr=5e-4),
    }

    def __init__(self, config: Config, data_shape):
        super().__init__(config, data_shape)
        c = self.data_shape[0]
        check_colours("vlae", c, channels=config.channels, head_channels=config.head_channels)
        # The VAE's encoder: image -> mu, log_var (B, latent).
        self.encoder = Encoder(self.data_shape, config.latent_dim, config.nf)
        self.prior = AFPrior(config.latent_dim, config.flow_steps, config.made_hidden)
        self.condition = Condition(config, self.data_shape)
        self.decoder = GatedPixelCNN(c, config.channels, config.layers, config.kernel, config.kernel,
                                     config.head_channels)  # x, conditions -> logits (B, 256, C, H, W)

    def receptive_field(self) -> tuple[int, int]:
        """How far p(x_i | x_<i, z) sees: rows up, and columns to each side (left and right)."""
        return self.decoder.reach_up, self.decoder.reach_left

    def logits(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) in [-1, 1], z (B, latent) -> logits of p(x|z) (B, 256, C, H, W)."""
        return self.decoder(x, self.condition(z))

    # --- the bound --------------------------------------------------------------------------------
    def negative_elbo(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """One-sample -ELBO of uint8 ``x`` in nats per image, with its two terms, each (B,)."""
        signed = to_signed(x)
        mu, log_var = self.encoder(signed)  # (B, latent) each
        z = mu + torch.exp(0.5 * log_var) * torch.randn_like(mu)  # reparameterisation
        kl = gaussian_log_prob(z, mu, log_var) - self.prior.log_prob(z)  # one-sample KL estimate, (B,)
        rec = categorical_nll(self.logits(signed, z), x)  # -log p(x|z), (B,)
        return {"loss": rec + kl, "rec": rec, "kl": kl}

    # --- the contract -----------------------------------------------------------------------------
    def configure_optimizers(self):
        return {"model": torch.optim.Adam(self.parameters(), lr=self.config.lr)}

    def loss(self, x):
        terms = self.negative_elbo(x)
        kl = terms["kl"].mean()
        if self.config.free_nats > 0:  # free bits: below the floor the KL is not pushed down
            kl = torch.clamp(kl, min=self.config.free_nats)
        objective = terms["rec"].mean() + kl
        logs = {f"{k}_bpd": bits_per_dim(v.mean().detach(), self.num_dims) for k, v in terms.items()}
        # Nats per subpixel: a step size for any image size.
        return {"model": objective / self.num_dims, **logs}

    def samplers(self):
        c, h, w = self.data_shape
        return {"ancestral": c * h * w + self.config.latent_dim * self.config.flow_steps}

    @torch.no_grad()
    def generate(self, n, sampler):
        z = self.prior.inverse(torch.randn(n, self.config.latent_dim, device=self.device))  # z ~ p(z)
        x = torch.zeros(n, *self.data_shape, device=self.device)  # [-1, 1]; unsampled never seen
        return self.decoder.sample(x, self.condition(z))  # the cached sampler, conditioned on z

    def sampling_modules(self):
        return [self.prior, self.condition, self.decoder]

    def nll(self, x):
        # In chunks of 128 images: the logits are 256 floats per subpixel.
        draws = [torch.cat([self.negative_elbo(chunk)["loss"] for chunk in x.split(128)])
                 for _ in range(self.config.nll_samples)]
        return torch.stack(draws).mean(0)  # (B,)

    def nll_protocol(self):
        return {"bound": "negative ELBO, one-sample KL against the AF prior",
                "latent_draws": self.config.nll_samples}
