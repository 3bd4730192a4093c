"""VLAE: a VAE with a small-receptive-field PixelCNN decoder and an autoregressive-flow prior.

Chen, Kingma, Salimans, Duan, Dhariwal, Schulman, Sutskever & Abbeel (2017), "Variational Lossy
Autoencoder", ICLR.

    -log P(x) <= E_q(z|x)[ -log p(x|z) + log q(z|x) - log p(z) ]          (the negative ELBO)

    q(z|x)  = N(mu(x), diag sigma^2(x)), a convolutional encoder;
    p(x|z)  = prod_i softmax(PixelCNN(x_<i, z))[x_i], a gated PixelCNN over the 8-bit subpixels
              whose receptive field is deliberately small (a few rows up, a few columns aside), so
              that it can model texture but not the shape of a whole digit: what it cannot see must
              come through z, which is what keeps the code from being ignored;
    p(z)    = an autoregressive flow (AF) prior, eps = f(z) with eps_i = (z_i - m_i(z_<i))
              * exp(-s_i(z_<i)) for each of a few MADE layers (Germain et al. 2015), the order
              reversed between them, and eps ~ N(0, I):
              log p(z) = log N(f(z); 0, I) - sum_i s_i.

An AF prior is evaluated in one pass (training needs log p(z) of posterior samples) and inverted
one latent dimension at a time (sampling); the paper shows it is equivalent to an IAF posterior. The KL term has no closed form against a flow prior, so it is estimated with
the posterior sample, log q(z|x) - log p(z).

The decoder is the project's gated PixelCNN (``trilemma.models.pixelcnn``): vertical and horizontal
stacks, R -> G -> B within a pixel, a 256-way softmax per subpixel. It is conditioned on z through a
small transposed-convolution network s = m(z) that gives every layer a location-dependent input,
added to that layer's vertical-to-horizontal link (the location-dependent conditioning of van den
Oord et al. 2016); only the horizontal stack receives it, where the Gated PixelCNN conditions both,
since the vertical stack only feeds the horizontal one.

What the small version changes from the paper:
    * the encoder is the convolutional encoder of the project's VAE (``trilemma.models.vae``)
      instead of the paper's ResNet; the MADEs have one hidden layer;
    * on a CPU, 2 gated decoder layers of 16 maps with 3x3 kernels (receptive field 3 rows up, 2
      columns to each side), lighter than the paper's decoders: drawing samples takes about 40% of
      the CPU time of PixelCNN's MNIST preset, and a small field is the point; the
      ``_gpu`` presets have 6 layers of 64 / 96 maps (7 rows up) and wider encoders and MADEs,
      a larger model of the same design, not a copy of the paper's CIFAR-10 network;
    * the AF prior's log-scales are bounded smoothly to (-3, 3) (a briefly trained flow inverted at
      sampling time must not overflow); the last MADE layer starts at zero (the prior starts as
      N(0, I));
    * no free bits (``free_nats`` offers them) and Adam at a high learning rate for the short budget.

Sampling: z ~ p(z) by inverting the flow (one MADE pass per latent dimension and flow step), then
the image subpixel by subpixel with PixelCNN's two caches (the vertical stack once per row, on the
rows it reaches). NFE = C*H*W decoder passes + latent_dim * flow_steps MADE passes.
Resolution: the encoder and the conditioning network halve / double the grid by ``halvings``; the
decoder is fully convolutional and only its sequential steps, C*H*W, grow with the image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trilemma.contract.family import Capabilities, GenerativeModel
from trilemma.contract.likelihood import bits_per_dim, categorical_nll, to_signed
from trilemma.models.blocks import halvings
from trilemma.models.pixelcnn import Config as PixelCNNConfig, PixelCNN
from trilemma.models.vae import Encoder, gaussian_log_prob


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
        # The budget's high learning rate, as PixelCNN's: 100 MNIST steps reach 1.26 bits/dim at 5e-3
        # against 1.51 at 2e-3. Free bits (16 nats) kept more in z but learned slower (1.36).
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
        self.encoder = Encoder(config, self.data_shape)  # the VAE's: image -> mu, log_var (B, latent)
        self.prior = AFPrior(config.latent_dim, config.flow_steps, config.made_hidden)
        self.condition = Condition(config, self.data_shape)
        decoder = PixelCNNConfig(channels=config.channels, layers=config.layers, first_kernel=config.kernel,
                                 kernel=config.kernel, head_channels=config.head_channels)
        self.decoder = PixelCNN(decoder, self.data_shape)  # its networks only; trained here

    def receptive_field(self) -> tuple[int, int]:
        """How far p(x_i | x_<i, z) sees: rows up, and columns to each side (left and right)."""
        return self.decoder.reach_up, self.decoder.reach_left

    def logits(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) in [-1, 1], z (B, latent) -> logits of p(x|z) (B, 256, C, H, W)."""
        links = [link + s for link, s in zip(self.decoder.vertical_stack(x), self.condition(z))]
        return self.decoder.head(self.decoder.horizontal_stack(x, links))

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
        c, height, width = self.data_shape
        up, side = self.receptive_field()
        z = self.prior.inverse(torch.randn(n, self.config.latent_dim, device=self.device))  # z ~ p(z)
        cond = self.condition(z)  # L maps (n, 2p, H, W)
        x = torch.zeros(n, c, height, width, device=self.device)  # [-1, 1]; unsampled never seen
        for i in range(height):
            # The vertical stack's links for row i see rows i-up .. i-1: run it on that band only.
            band = self.decoder.vertical_stack(x[:, :, max(0, i - up):i + 1])
            links = [link[:, :, -1:] + s[:, :, i:i + 1] for link, s in zip(band, cond)]  # (n, 2p, 1, W)
            for j in range(width):
                left = max(0, j - side)  # the horizontal stack sees columns left .. j
                for ch in range(c):
                    h = self.decoder.horizontal_stack(x[:, :, i:i + 1, left:j + 1],
                                                      [link[..., left:j + 1] for link in links])
                    logits = self.decoder.head(h[..., -1:])[:, :, ch, 0, 0]  # (n, 256)
                    level = torch.multinomial(F.softmax(logits, dim=1), 1).squeeze(1)  # (n,)
                    x[:, ch, i, j] = to_signed(level)
        return x

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
