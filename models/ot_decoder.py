"""OT decoder: a generator from Gaussian noise trained to minimise the Sinkhorn divergence to the data.

Sources: the "optimal transport decoder" of the seed review (Bond-Taylor, Leach, Long & Willcocks
(2021), "Deep Generative Modelling: A Comparative Review of VAEs, GANs, Normalizing Flows, Energy-Based
and Autoregressive Models", IEEE TPAMI): L_OT = E[OT(G(z), x)], OT approximated by Sinkhorn; Genevay,
Peyre & Cuturi (2018), "Learning Generative Models with Sinkhorn Divergences", AISTATS; Feydy et al.
(2019), "Interpolating between Optimal Transport and MMD using Sinkhorn Divergences", AISTATS.

Each step decodes a batch z ~ N(0, I) and moves the decoder G so that the cloud of flattened generated
images is close to the batch of data images in the debiased Sinkhorn divergence S_eps (geomloss's
tensorized solver; cost |x - y|^2 / 2, eps = ``blur``^2), zero when the clouds coincide. A blur of
0.05 is far below the distances between images on [-1, 1] (11 to 20 for 28x28 digits), so S_eps is
close to unregularised OT; ``scaling`` sets how fast geomloss anneals eps (0.5: an approximate value,
whose gradient still pulls each image towards the data it is transported to). No encoder, no
discriminator, no density; sampling is one pass.

What this small version is: the seed gives only the loss; the decoder is a DCGAN-like stack of stride-2
transposed convolutions with batch norm, ReLU and a tanh output, one stage per halving of the side
(``trilemma.models.blocks.halvings``; 28: 7 -> 14 -> 28), narrow on the CPU presets. The GPU presets
take DCGAN's latent of 100 and half its width (64 channels in the last stage), DCGAN's Adam settings.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from trilemma.contract.likelihood import to_signed
from trilemma.contract.family import Capabilities, GenerativeModel
from trilemma.models.blocks import at_least, halvings, positive


@dataclass
class Config:
    latent_dim: int = 100  # dimension of z ~ N(0, I) (DCGAN: 100)
    channels: int = 64  # channels of the last hidden stage; doubled per stage towards the input (DCGAN: 128)
    blur: float = 0.05  # Sinkhorn blur on the [-1, 1] pixel scale, eps = blur^p (geomloss default)
    scaling: float = 0.5  # geomloss eps-scaling ratio: closer to 1 = more Sinkhorn iterations, more exact
    lr: float = 2e-4  # Adam learning rate (DCGAN's)
    beta1: float = 0.5  # Adam beta1 (DCGAN's)
    beta2: float = 0.999  # Adam beta2

    def __post_init__(self):
        at_least(self, 1, "latent_dim", "channels")
        positive(self, "blur", "lr")
        if not 0 < self.scaling < 1:
            raise ValueError("'scaling' must be in (0, 1)")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError("'beta1' and 'beta2' must be in [0, 1)")


class Decoder(nn.Module):
    """z (B, latent) -> image (B, C, H, W) in [-1, 1]; DCGAN-like generator."""

    def __init__(self, cfg: Config, data_shape: tuple[int, int, int]):
        super().__init__()
        c, h, w = data_shape
        levels = max(1, halvings(h, w))  # one upsampling stage per halving; a 4x4 image starts from 2x2
        side = h >> levels
        self.start = (side, w >> levels)  # (h0, w0): 7x7 at 28, 4x4 at 32
        ch = cfg.channels * 2 ** (levels - 1)
        self.ch0 = ch
        # Project and reshape, like DCGAN's first layer.
        self.project = nn.Sequential(nn.Linear(cfg.latent_dim, ch * side * self.start[1]),
                                     nn.BatchNorm1d(ch * side * self.start[1]), nn.ReLU())
        layers: list[nn.Module] = []
        for _ in range(levels - 1):
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, stride=2, padding=1),
                       nn.BatchNorm2d(ch // 2), nn.ReLU()]
            ch //= 2
        # The last stage maps straight to pixels; tanh keeps them in [-1, 1].
        layers += [nn.ConvTranspose2d(ch, c, 4, stride=2, padding=1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.project(z).view(z.shape[0], self.ch0, *self.start)  # (B, ch0, h0, w0)
        return self.net(h)  # (B, C, H, W)


class OTDecoder(GenerativeModel):
    name = "ot_decoder"
    title = "OT decoder"
    paper = ("Bond-Taylor, Leach, Long and Willcocks, 2021. Deep Generative Modelling: A Comparative "
             "Review. IEEE TPAMI (the seed's OT decoder); Genevay, Peyre and Cuturi, 2018. Learning "
             "Generative Models with Sinkhorn Divergences. AISTATS; Feydy et al., 2019. Interpolating "
             "between Optimal Transport and MMD using Sinkhorn Divergences. AISTATS.")
    family = "OT"
    literature = None  # the seed's own model; the review has no row for it
    capabilities = Capabilities(density="none", free_form_jacobian=True, sampling="one_pass")
    Config = Config
    presets = {
        "tiny": dict(latent_dim=8, channels=8),
        # A narrow decoder, so that thousands of steps fit in a CPU budget.
        "mnist": dict(latent_dim=32, channels=32, lr=1e-3),
        "cifar10": dict(latent_dim=64, channels=32, lr=1e-3),
        # Half DCGAN's width (64 channels in the last stage; DCGAN: 128), DCGAN's latent and Adam.
        "mnist_gpu": dict(latent_dim=100, channels=64),
        "cifar10_gpu": dict(latent_dim=100, channels=64),
    }

    def __init__(self, config: Config, data_shape: tuple[int, int, int]):
        super().__init__(config, data_shape)
        from geomloss import SamplesLoss  # imported here, so listing the models does not load it

        self.decoder = Decoder(config, self.data_shape)
        # Every pixel lies in [-1, 1], so 2 sqrt(D) bounds any distance; giving it to geomloss saves
        # its on-the-fly estimate (a GPU sync per step) and fixes the eps-scaling schedule.
        self.sinkhorn = SamplesLoss("sinkhorn", p=2, blur=config.blur, scaling=config.scaling,
                                    diameter=2 * math.sqrt(self.num_dims), backend="tensorized")

    def configure_optimizers(self):
        cfg = self.config
        return {"decoder": torch.optim.Adam(self.decoder.parameters(), lr=cfg.lr,
                                            betas=(cfg.beta1, cfg.beta2))}

    def ot_loss(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Debiased Sinkhorn divergence between two batches of images (B, C, H, W) in [-1, 1]."""
        return self.sinkhorn(a.flatten(1), b.flatten(1))  # () scalar; each image is one point in R^D

    def sinkhorn_loss(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """S_eps(G(z), data) for a uint8 batch x (B, C, H, W); z defaults to a fresh N(0, I) draw."""
        if z is None:
            z = torch.randn(x.shape[0], self.config.latent_dim, device=x.device)  # (B, latent)
        return self.ot_loss(self.decoder(z), to_signed(x))

    def loss(self, x):
        return {"decoder": self.sinkhorn_loss(x)}

    def samplers(self):
        return {"one_pass": 1}  # z ~ N(0, I) through the decoder

    @torch.no_grad()
    def generate(self, n, sampler):
        z = torch.randn(n, self.config.latent_dim, device=self.device)  # (n, latent)
        return self.decoder(z).clamp(-1, 1)  # (n, C, H, W)

    def sampling_modules(self):
        return [self.decoder]
