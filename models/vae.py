"""VAE: a convolutional variational autoencoder trained on the evidence lower bound.

Kingma & Welling (2014), "Auto-Encoding Variational Bayes", ICLR; the importance-weighted bound of
``iwae_nll`` is Burda, Grosse & Salakhutdinov (2016), "Importance Weighted Autoencoders", ICLR.

The paper's recipe: a Gaussian encoder q(z|x), a standard normal prior, a decoder p(x|z), the
reparameterisation z = mu + sigma eps, and training on the negative ELBO with the KL in closed form
(estimator B, eq. 10). The network, with both bounds, is ``trilemma.models.parts.vae.ConvVAE`` (VAEBM
trains the same one).

What the small version changes: convolutional encoder and decoder (stride-2 convolutions, one stage per
halving of ``trilemma.models.blocks.halvings``) instead of one-hidden-layer MLPs; the decoder's Gaussian
integrated over each 8-bit bin, so -ELBO bounds -log P(x) of the discrete image; a mean per subpixel and
one learned log-scale per channel (the "sigma-VAE" of Rybkin et al. 2021), as per-pixel variances leave
the mean, which ``sample`` returns, unconstrained; Adam instead of Adagrad, no weight decay. The paper
trains no CIFAR-10 model: the GPU presets are this VAE at twice the CPU width (64 channels at full
resolution, 512 at 4x4).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trilemma.contract.family import Capabilities, GenerativeModel
from trilemma.models.blocks import at_least, positive
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
        at_least(self, 1, "latent_dim", "nf", "nll_samples")
        positive(self, "lr", "scale_lr")
        at_least(self, 0, "grad_clip")


class VAE(GenerativeModel):
    name = "vae"
    paper = "Kingma & Welling (2014), Auto-Encoding Variational Bayes, ICLR"
    family = "VAE"
    literature = "Convolutional VAE"
    capabilities = Capabilities(density="bound", free_form_jacobian=True, sampling="one_pass")
    Config = Config
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
