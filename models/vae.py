"""VAE: a convolutional variational autoencoder trained on the evidence lower bound.

Kingma & Welling (2014), "Auto-Encoding Variational Bayes", ICLR. The importance-weighted bound
used by ``iwae_nll`` is Burda, Grosse & Salakhutdinov (2016), "Importance Weighted Autoencoders",
ICLR.

The paper's recipe, kept here: a Gaussian encoder q(z|x) = N(mu(x), diag sigma^2(x)), a standard
normal prior p(z) = N(0, I), a decoder p(x|z), the reparameterisation z = mu + sigma * eps, and
training on the negative ELBO  E_q[-log p(x|z)] + KL(q(z|x) || p(z))  with the KL in closed form
(the paper's estimator B, eq. 10).

What the small version changes:
    * convolutional encoder and decoder (stride-2 convolutions and transposed convolutions) instead
      of the paper's one-hidden-layer MLPs;
    * the decoder's Gaussian is integrated over each 8-bit level's bin
      (``trilemma.contract.likelihood.discretized_gaussian_nll``), so ``-ELBO`` bounds ``-log P(x)`` of the
      discrete image and the log-scale cannot collapse to an infinite density;
    * the decoder gives a mean per subpixel and one learned log-scale per channel, shared by all
      pixels (as the "sigma-VAE" of Rybkin et al. 2021), where the paper's Gaussian MLP decoder
      outputs a variance per pixel: with per-pixel variances the mean is unconstrained wherever the
      variance is large, and the mean is what ``sample`` returns;
    * the paper trains no CIFAR-10 model; the GPU presets (``mnist_gpu``, ``cifar10_gpu``) are this
      conv VAE at twice the CPU presets' width (64 channels at full resolution, 512 at 4x4);
    * Adam instead of Adagrad; no weight decay (the paper's prior on the weights).

Resolution scaling: the encoder halves the grid with stride-2 convolutions while both sides are
even and the halves at least 4 (`halvings`; 16x16 -> 2 stages to 4x4, 28x28 -> 2 stages to 7x7, 32x32 -> 3 stages to
4x4, 64x64 -> 4 stages to 4x4), doubling the channels at each stage; the decoder mirrors it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from trilemma.contract.family import Capabilities, GenerativeModel
from trilemma.contract.likelihood import bits_per_dim, discretized_gaussian_nll, to_signed
from trilemma.models.blocks import gaussian_kl, halvings


@dataclass
class Config:
    latent_dim: int = 32  # size of z
    nf: int = 32  # channels at full resolution; doubled at each stride-2 stage
    lr: float = 1e-3  # Adam learning rate of the networks
    scale_lr: float = 1e-2  # Adam learning rate of the decoder's log-scale: Adam moves a parameter by
    #   about lr per step, and this one number must travel from 0 to about -2 within a short budget
    grad_clip: float = 100.0  # gradient-norm clip; only guards against rare early spikes
    min_log_scale: float = -7.0  # floor of the decoder's log-scale on the [-1, 1] scale (a bin is 2/255 wide)
    nll_samples: int = 1  # latent draws averaged in nll(); each gives an unbiased estimate of -ELBO


class Encoder(nn.Module):
    """image (B, C, H, W) in [-1, 1] -> mu, log_var of q(z|x), each (B, latent)."""

    def __init__(self, cfg: Config, shape: tuple[int, int, int]):
        super().__init__()
        c, h, w = shape
        stages = halvings(h, w)
        layers: list[nn.Module] = [nn.Conv2d(c, cfg.nf, 3, padding=1), nn.SiLU()]
        for i in range(stages):
            layers += [nn.Conv2d(cfg.nf * 2 ** i, cfg.nf * 2 ** (i + 1), 4, 2, 1), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        flat = cfg.nf * 2 ** stages * (h >> stages) * (w >> stages)
        self.head = nn.Linear(flat, 2 * cfg.latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, log_var = self.head(self.body(x).flatten(1)).chunk(2, dim=1)  # (B, latent) each
        return mu, log_var


class Decoder(nn.Module):
    """z (B, latent) -> mean of p(x|z) (B, C, H, W) on the [-1, 1] scale, and its log-scale (1, C, 1, 1)."""

    def __init__(self, cfg: Config, shape: tuple[int, int, int]):
        super().__init__()
        c, h, w = shape
        stages = halvings(h, w)
        self.base = (cfg.nf * 2 ** stages, h >> stages, w >> stages)  # (C0, h0, w0)
        self.project = nn.Linear(cfg.latent_dim, math.prod(self.base))
        layers: list[nn.Module] = [nn.SiLU()]
        for i in reversed(range(stages)):
            layers += [nn.ConvTranspose2d(cfg.nf * 2 ** (i + 1), cfg.nf * 2 ** i, 4, 2, 1), nn.SiLU()]
        layers.append(nn.Conv2d(cfg.nf, c, 3, padding=1))  # the mean of each subpixel
        self.body = nn.Sequential(*layers)
        self.log_scale = nn.Parameter(torch.zeros(1, c, 1, 1))  # one learned scale per channel
        self.min_log_scale = cfg.min_log_scale

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.project(z).view(z.shape[0], *self.base)  # (B, C0, h0, w0)
        mean = self.body(h)  # (B, C, H, W)
        # The mean is left unbounded: a pixel at 0 or 255 is best fit by a mean beyond [-1, 1],
        # which puts the mass of the outer bin (extending to -+infinity) near one.
        return mean, self.log_scale.clamp_min(self.min_log_scale)


def gaussian_log_prob(z: torch.Tensor, mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag exp(log_var)), summed over the last dimension."""
    return -0.5 * (math.log(2 * math.pi) + log_var + (z - mu) ** 2 * torch.exp(-log_var)).sum(-1)


class VAE(GenerativeModel):
    name = "vae"
    paper = "Kingma & Welling (2014), Auto-Encoding Variational Bayes, ICLR"
    family = "VAE"
    literature = "Convolutional VAE"
    capabilities = Capabilities(density="bound", free_form_jacobian=True, sampling="one_pass")
    Config = Config
    # Measured on one CPU core, batch 64: 0.21 s/step at 28x28, 0.38 s/step at 32x32x3. With 100
    # CPU-seconds on MNIST (480 steps): 1.60 test bits/dim (-ELBO) and blurry but legible digits.
    presets = {
        "tiny": {"latent_dim": 8, "nf": 8},
        "mnist": {"latent_dim": 32, "nf": 32},
        "cifar10": {"latent_dim": 128, "nf": 32},
        # The paper has no CIFAR-10 model: this conv VAE at twice the CPU width.
        "mnist_gpu": {"latent_dim": 64, "nf": 64},
        "cifar10_gpu": {"latent_dim": 128, "nf": 64},
    }

    def __init__(self, config: Config, data_shape: tuple[int, int, int]):
        super().__init__(config, data_shape)
        self.encoder = Encoder(config, self.data_shape)
        self.decoder = Decoder(config, self.data_shape)

    # --- the bound --------------------------------------------------------------------------------
    def negative_elbo(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """One-sample -ELBO of uint8 ``x`` in nats per image, with its two terms, each (B,)."""
        mu, log_var = self.encoder(to_signed(x))  # (B, latent) each
        z = mu + torch.exp(0.5 * log_var) * torch.randn_like(mu)  # reparameterisation trick
        mean, log_scale = self.decoder(z)  # (B, C, H, W), (1, C, 1, 1)
        rec = discretized_gaussian_nll(x, mean, log_scale)  # -log p(x|z), (B,)
        # KL(N(mu, sigma^2) || N(0, 1)) in closed form, summed over latents (Kingma & Welling, app. B).
        kl = gaussian_kl(mu, log_var).sum(1)  # (B,)
        return {"loss": rec + kl, "rec": rec, "kl": kl}

    def iwae_nll(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """-log of the k-sample importance-weighted estimate of P(x) (Burda et al. 2016), (B,).

        Its expectation is a bound at least as tight as -ELBO, tightening as k grows; k = 1 is the
        one-sample -ELBO with the KL estimated by sampling instead of in closed form.
        """
        mu, log_var = self.encoder(to_signed(x))  # (B, latent)
        log_w = []
        for _ in range(k):  # a loop rather than a (k*B) batch, to keep memory flat
            z = mu + torch.exp(0.5 * log_var) * torch.randn_like(mu)
            mean, log_scale = self.decoder(z)
            log_p_x_given_z = -discretized_gaussian_nll(x, mean, log_scale)
            log_p_z = gaussian_log_prob(z, torch.zeros_like(z), torch.zeros_like(z))
            log_w.append(log_p_x_given_z + log_p_z - gaussian_log_prob(z, mu, log_var))
        log_w = torch.stack(log_w)  # (k, B)
        return -(torch.logsumexp(log_w, dim=0) - math.log(k))

    # --- the contract ---------------------------------------------------------------------------
    def configure_optimizers(self):
        scale = [self.decoder.log_scale]
        nets = [p for p in self.parameters() if p is not self.decoder.log_scale]
        return {"model": torch.optim.Adam([{"params": nets}, {"params": scale, "lr": self.config.scale_lr}],
                                         lr=self.config.lr)}

    def loss(self, x: torch.Tensor):
        terms = self.negative_elbo(x)
        logs = {f"{k}_bpd": bits_per_dim(v.mean().detach(), self.num_dims) for k, v in terms.items()}
        # Nats per subpixel, so the learning rate does not depend on the image size.
        return {"model": terms["loss"].mean() / self.num_dims, **logs}

    def samplers(self):
        return {"one_pass": 1}  # z ~ N(0, I) through the decoder

    def generate(self, n: int, sampler: str) -> torch.Tensor:
        z = torch.randn(n, self.config.latent_dim, device=self.device)
        mean, _ = self.decoder(z)  # the decoder mean, not a draw: per-pixel noise is not an image
        return mean.clamp(-1, 1)  # (n, C, H, W)

    def sampling_modules(self):
        return [self.decoder]

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        draws = [self.negative_elbo(x)["loss"] for _ in range(self.config.nll_samples)]
        return torch.stack(draws).mean(0)  # (B,)

    def nll_protocol(self):
        return {"bound": "negative ELBO, closed-form KL", "latent_draws": self.config.nll_samples}
