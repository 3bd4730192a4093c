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
4x4, 64x64 -> 4 stages to 4x4), doubling the channels at each stage; the decoder mirrors it. The
network, with both bounds, is ``trilemma.models.parts.vae.ConvVAE`` (VAEBM trains the same one).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trilemma.contract.family import Capabilities, GenerativeModel
from trilemma.models.parts.vae import ConvVAE


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

    def __post_init__(self):
        for name in ("latent_dim", "nf", "nll_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"'{name}' must be >= 1")
        for name in ("lr", "scale_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"'{name}' must be > 0")
        if not self.grad_clip >= 0:
            raise ValueError("'grad_clip' must be >= 0")


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
        self.vae = ConvVAE(self.data_shape, config.latent_dim, config.nf, config.min_log_scale)

    # --- the contract ---------------------------------------------------------------------------
    def configure_optimizers(self):
        return {"model": self.vae.optimizer(self.config.lr, self.config.scale_lr)}

    def loss(self, x: torch.Tensor):
        return self.vae.loss(x)  # -ELBO in nats per subpixel, and its terms in bits/dim

    def samplers(self):
        return {"one_pass": 1}  # z ~ N(0, I) through the decoder

    def generate(self, n: int, sampler: str) -> torch.Tensor:
        z = torch.randn(n, self.config.latent_dim, device=self.device)
        mean, _ = self.vae.decoder(z)  # the decoder mean, not a draw: per-pixel noise is not an image
        return mean.clamp(-1, 1)  # (n, C, H, W)

    def sampling_modules(self):
        return [self.vae.decoder]

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        draws = [self.vae.negative_elbo(x)["loss"] for _ in range(self.config.nll_samples)]
        return torch.stack(draws).mean(0)  # (B,)

    def nll_protocol(self):
        return {"bound": "negative ELBO, closed-form KL", "latent_draws": self.config.nll_samples}
