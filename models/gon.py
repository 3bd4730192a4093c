"""Variational Gradient Origin Network: a VAE whose encoder is the decoder's own gradient.

Bond-Taylor & Willcocks (2021), "Gradient Origin Networks", ICLR.

A GON has no encoder: for an image x it evaluates the loss of decoding the origin z0 = 0 and takes the
latent h = -grad_{z0} L(x, z0) (by ``create_graph=True``, so training differentiates through the
gradient). In the variational GON, L is the negative ELBO: linear maps of h give the mean and
log-variance of q(z|x), one reparameterised z is decoded, and the loss is -ELBO(x) >= -log p(x), which
``nll`` reports (``density="bound"``). Samples decode z ~ N(0, I) in one pass. The decoder is the
paper's convolutional one (not the implicit SIREN GON): z projected to the base grid of
``trilemma.models.blocks.halvings``, one stride-2 transposed convolution per doubling.

What the small version changes from the paper (nz = 48, ngf = 32, batch norm, a Bernoulli likelihood,
Adam 1e-4): a discretized logistic likelihood on the 256 levels; no batch norm (the origin pass decodes
nearly the same z for every image) and SiLU instead of ReLU (the latent, a gradient, is then smooth);
latent 32 and 16 channels with a learning rate of 2e-3 and clipping on the CPU presets; the origin's
loss summed over the batch with a fixed weight of 1/64 (the paper's mean at its batch of 64), so an
image's latent does not depend on the batch size. The GPU presets are the paper's size (latent 48, 32
channels at full resolution) with a learning rate of 2e-4.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trilemma.contract.likelihood import discretized_logistic_nll
from trilemma.contract.family import Capabilities, GenerativeModel
from trilemma.models.blocks import at_least, gaussian_kl, halvings, positive


@dataclass
class Config:
    latent_dim: int = 32  # size of z (paper: 48)
    origin_loss_scale: float = 1 / 64  # weight of an image's loss at the origin: the paper averages
    #   it over its batch of 64; a fixed factor keeps that scale of latent without tying it to the batch
    channels: int = 32  # channels of the last (full-resolution) stage; doubled at each coarser stage
    lr: float = 2e-3  # Adam learning rate (paper: 1e-4)
    grad_clip: float = 10.0  # max gradient norm: second-order training has occasional spikes
    min_log_scale: float = -6.0  # floor on the logistic log-scale, for stability
    nll_samples: int = 1  # draws of z averaged in nll() (an average of bounds is still a bound)

    def __post_init__(self):
        at_least(self, 1, "latent_dim", "channels", "nll_samples")
        positive(self, "lr")
        at_least(self, 0, "origin_loss_scale", "grad_clip")


class Decoder(nn.Module):
    """z -> the logistic's mean and log-scale: a linear map to a small grid, n upsampling stages.

    Widths as in the paper's DCGAN-style decoder: ``channels * 2^(n-1)`` on the smallest grid, halved
    at each stage down to ``channels``; a 3x3 convolution at full resolution gives the output.
    """

    def __init__(self, latent_dim: int, channels: int, data_shape):
        super().__init__()
        c, H, W = data_shape
        n = halvings(H, W)
        widths = [channels * 2 ** max(n - 1 - i, 0) for i in range(n + 1)]  # e.g. n=3: 4c, 2c, c, c
        self.grid = (widths[0], H >> n, W >> n)  # (C0, h0, w0)
        self.fc = nn.Linear(latent_dim, self.grid[0] * self.grid[1] * self.grid[2])
        stages = []
        for i in range(n):
            stages += [nn.ConvTranspose2d(widths[i], widths[i + 1], 4, stride=2, padding=1), nn.SiLU()]
        self.stages = nn.Sequential(*stages)
        self.out = nn.Conv2d(channels, 2 * c, 3, padding=1)  # the logistic's mean and log-scale

    def forward(self, z):  # (B, latent) -> mean, log-scale, each (B, C, H, W)
        g = F.silu(self.fc(z)).view(z.shape[0], *self.grid)  # (B, C0, h0, w0)
        return self.out(self.stages(g)).chunk(2, dim=1)


class GON(GenerativeModel):
    name = "gon"
    title = "Variational GON"
    paper = "Bond-Taylor & Willcocks (2021), Gradient Origin Networks, ICLR"
    family = "VAE"  # the variational GON is a VAE whose encoder is a gradient; the review has no GON row
    capabilities = Capabilities(density="bound", free_form_jacobian=True, sampling="one_pass")
    Config = Config
    presets = {
        "tiny": dict(latent_dim=8, channels=8),
        "mnist": dict(latent_dim=32, channels=16),
        "cifar10": dict(latent_dim=64, channels=16),
        # The paper's variational GON size: nz = 48, 32 channels at full resolution.
        "mnist_gpu": dict(latent_dim=48, channels=32, lr=2e-4),
        "cifar10_gpu": dict(latent_dim=48, channels=32, lr=2e-4),
    }

    def __init__(self, config: Config, data_shape):
        super().__init__(config, data_shape)
        d = config.latent_dim
        self.fc_mu = nn.Linear(d, d)  # the paper's fc21
        self.fc_logvar = nn.Linear(d, d)  # the paper's fc22
        self.decoder = Decoder(d, config.channels, self.data_shape)

    # --- the negative ELBO and the gradient origin ----------------------------------------------
    def neg_elbo_terms(self, x, h, eps):
        """Reconstruction -log p(x|z) and KL(q(z|h) || N(0, I)), nats per image, each (B,).

        ``h`` (B, latent) is the GON latent (zeros at the origin); ``eps`` (B, latent) the
        reparameterisation noise of z = mu + sigma * eps.
        """
        mu, logvar = self.fc_mu(h), self.fc_logvar(h)  # (B, latent) each
        z = mu + torch.exp(0.5 * logvar) * eps
        mean, log_scale = self.decoder(z)  # (B, C, H, W) each
        log_scale = log_scale.clamp_min(self.config.min_log_scale)
        recon = discretized_logistic_nll(x, mean, log_scale)  # (B,)
        kl = gaussian_kl(mu, logvar).sum(1)  # KL(q(z|x) || N(0, I)), (B,)
        return recon, kl

    def latent(self, x, create_graph: bool, eps0=None):
        """The GON latent h = -grad_{z0} s * sum_i L(x_i, z0) at z0 = 0, shape (B, latent).

        Summing over the batch gives each image the gradient of its own loss (s is the fixed
        ``origin_loss_scale``). With create_graph the result stays differentiable w.r.t. the
        parameters (training); without, it is a plain tensor.
        """
        b = x.shape[0]
        z0 = torch.zeros(b, self.config.latent_dim, device=x.device, dtype=self.fc_mu.weight.dtype,
                         requires_grad=True)
        if eps0 is None:
            eps0 = torch.randn_like(z0)
        with torch.enable_grad():  # nll() and the harness run under no_grad
            recon, kl = self.neg_elbo_terms(x, z0, eps0)
            loss = self.config.origin_loss_scale * (recon + kl).sum()
            (grad,) = torch.autograd.grad(loss, z0, create_graph=create_graph)
        return -grad

    # --- training -------------------------------------------------------------------------------
    def configure_optimizers(self):
        return {"model": torch.optim.Adam(self.parameters(), lr=self.config.lr)}

    def loss(self, x):
        h = self.latent(x, create_graph=True)  # (B, latent), differentiable
        recon, kl = self.neg_elbo_terms(x, h, torch.randn_like(h))
        loss = (recon + kl).mean() / self.num_dims  # nats per subpixel, for a scale-free learning rate
        return {"model": loss, "recon": recon.mean(), "kl": kl.mean(), "latent_norm": h.norm(dim=1).mean()}

    # --- sampling -------------------------------------------------------------------------------
    def samplers(self):
        return {"one_pass": 1}  # z ~ N(0, I) through the decoder

    def sampling_modules(self):
        return [self.decoder]

    def generate(self, n, sampler):
        z = torch.randn(n, self.config.latent_dim, device=self.device)
        # The decoder's mean, as VAEs usually show, rather than a draw with per-pixel logistic noise.
        mean, _ = self.decoder(z)
        return mean.clamp(-1, 1)  # (n, C, H, W)

    # --- likelihood -----------------------------------------------------------------------------
    def nll(self, x):
        total = 0.0
        for _ in range(self.config.nll_samples):
            h = self.latent(x, create_graph=False)
            recon, kl = self.neg_elbo_terms(x, h, torch.randn_like(h))
            total = total + (recon + kl).detach()
        return total / self.config.nll_samples  # (B,) nats

    def nll_protocol(self):
        return {"bound": "negative ELBO, one draw of z per sample", "latent_draws": self.config.nll_samples}
