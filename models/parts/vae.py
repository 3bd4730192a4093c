"""The convolutional VAE as a network: encoder, decoder and its bound (Kingma & Welling 2014), shared
by the VAE family and VLAE (its encoder).

    Encoder            image (B, C, H, W) in [-1, 1] -> mu, log_var of q(z|x), (B, latent) each
    Decoder            z -> mean of p(x|z) on the [-1, 1] scale and one learned log-scale per channel
    ConvVAE            both, with the one-sample -ELBO, the IWAE bound and the training loss
    gaussian_log_prob  log N(z; mu, diag exp(log_var)) over the last dimension

The grid is halved by stride-2 convolutions ``halvings`` times, doubling the channels at each stage;
the decoder mirrors it. ``trilemma.models.vae`` describes the design and what it changes from the paper.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from trilemma.contract.likelihood import bits_per_dim, discretized_gaussian_nll, to_signed
from trilemma.models.blocks import gaussian_kl, halvings


class Encoder(nn.Module):
    """image (B, C, H, W) in [-1, 1] -> mu, log_var of q(z|x), each (B, latent)."""

    def __init__(self, shape: tuple[int, int, int], latent_dim: int, nf: int):
        super().__init__()
        c, h, w = shape
        stages = halvings(h, w)
        layers: list[nn.Module] = [nn.Conv2d(c, nf, 3, padding=1), nn.SiLU()]
        for i in range(stages):
            layers += [nn.Conv2d(nf * 2 ** i, nf * 2 ** (i + 1), 4, 2, 1), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        flat = nf * 2 ** stages * (h >> stages) * (w >> stages)
        self.head = nn.Linear(flat, 2 * latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, log_var = self.head(self.body(x).flatten(1)).chunk(2, dim=1)  # (B, latent) each
        return mu, log_var


class Decoder(nn.Module):
    """z (B, latent) -> mean of p(x|z) (B, C, H, W) on the [-1, 1] scale, and its log-scale (1, C, 1, 1)."""

    def __init__(self, shape: tuple[int, int, int], latent_dim: int, nf: int, min_log_scale: float):
        super().__init__()
        c, h, w = shape
        stages = halvings(h, w)
        self.base = (nf * 2 ** stages, h >> stages, w >> stages)  # (C0, h0, w0)
        self.project = nn.Linear(latent_dim, math.prod(self.base))
        layers: list[nn.Module] = [nn.SiLU()]
        for i in reversed(range(stages)):
            layers += [nn.ConvTranspose2d(nf * 2 ** (i + 1), nf * 2 ** i, 4, 2, 1), nn.SiLU()]
        layers.append(nn.Conv2d(nf, c, 3, padding=1))  # the mean of each subpixel
        self.body = nn.Sequential(*layers)
        self.log_scale = nn.Parameter(torch.zeros(1, c, 1, 1))  # one learned scale per channel
        self.min_log_scale = min_log_scale

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.project(z).view(z.shape[0], *self.base)  # (B, C0, h0, w0)
        mean = self.body(h)  # (B, C, H, W)
        # The mean is left unbounded: a pixel at 0 or 255 is best fit by a mean beyond [-1, 1],
        # which puts the mass of the outer bin (extending to -+infinity) near one.
        return mean, self.log_scale.clamp_min(self.min_log_scale)


def gaussian_log_prob(z: torch.Tensor, mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag exp(log_var)), summed over the last dimension."""
    return -0.5 * (math.log(2 * math.pi) + log_var + (z - mu) ** 2 * torch.exp(-log_var)).sum(-1)


class ConvVAE(nn.Module):
    """A Gaussian encoder q(z|x), the prior N(0, I) and a decoder whose Gaussian is integrated over
    each 8-bit level's bin (``discretized_gaussian_nll``), so -ELBO bounds -log P(x) of the image."""

    def __init__(self, shape: tuple[int, int, int], latent_dim: int, nf: int, min_log_scale: float):
        super().__init__()
        self.encoder = Encoder(shape, latent_dim, nf)
        self.decoder = Decoder(shape, latent_dim, nf, min_log_scale)

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

    def loss(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """-ELBO of the batch in nats per subpixel ("model": a learning rate for any image size) and
        its terms in bits/dim for the log."""
        terms, num_dims = self.negative_elbo(x), x[0].numel()
        logs = {f"{k}_bpd": bits_per_dim(v.mean().detach(), num_dims) for k, v in terms.items()}
        return {"model": terms["loss"].mean() / num_dims, **logs}

    def optimizer(self, lr: float, scale_lr: float) -> torch.optim.Optimizer:
        """Adam, with its own learning rate for the decoder's log-scale: Adam moves a parameter by
        about lr per step, and this one number must travel from 0 to about -2 within a short budget."""
        scale = [self.decoder.log_scale]
        nets = [p for p in self.parameters() if p is not self.decoder.log_scale]
        return torch.optim.Adam([{"params": nets}, {"params": scale, "lr": scale_lr}], lr=lr)

