"""OT decoder: a generator from Gaussian noise trained to minimise the Sinkhorn divergence to the data.

Sources:
    * the "optimal transport decoder" of the seed (Sam Bond-Taylor, Adam Leach, Yang Long and
      Chris G. Willcocks, 2021, "Deep Generative Modelling: A Comparative Review of VAEs, GANs,
      Normalizing Flows, Energy-Based and Autoregressive Models", IEEE TPAMI, and the seed slides):
      L_OT = E_{x ~ p_d, z ~ p_z}[OT(G(z), x)], with OT approximated by Sinkhorn;
    * Aude Genevay, Gabriel Peyre and Marco Cuturi, 2018, "Learning Generative Models with
      Sinkhorn Divergences", AISTATS: minibatch Sinkhorn divergences as a generator's loss;
    * Jean Feydy, Thibault Sejourne, Francois-Xavier Vialard, Shun-ichi Amari, Alain Trouve and
      Gabriel Peyre, 2019, "Interpolating between Optimal Transport and MMD using Sinkhorn
      Divergences", AISTATS: the debiased Sinkhorn divergence S_eps and its fast solver (geomloss).

Each training step draws a batch z ~ N(0, I), decodes it to images G(z), and moves G so that the
cloud of flattened generated images {G(z_i)} is close in S_eps to the cloud of flattened data images
{x_j}, with ground cost |x - y|^2 / 2 (p = 2) and entropic blur `blur` (eps = blur^2). The debiased
divergence S_eps(a, b) = OT_eps(a, b) - (OT_eps(a, a) + OT_eps(b, b)) / 2 is zero when the two clouds
coincide, so small blurs approach the squared Wasserstein-2 distance without its entropic bias.
There is no encoder, no discriminator, and no density (density "none"); sampling is one pass.

Scales: pixels are on [-1, 1], so a 28x28 image is a point of R^784 whose distance to another
digit is typically 11 (nearest) to 20 (median); a blur of 0.05 (geomloss's default) is far below
that, and S_eps is close to unregularised OT, for about log(diameter / blur) / log(1 / scaling)
Sinkhorn iterations on (B, B) matrices, small beside the decoder's pass. With scaling 0.5 geomloss
anneals eps quickly and the value it returns is an approximation (on small test batches it lies
about 20% under the exact W2^2 / 2; scaling 0.95 brings it within 5%); its gradient still pulls
each generated image towards the data images it is transported to, which is what training needs.

What this small version is: the seed gives only the loss; the generator here is a DCGAN-like
(Radford et al. 2016) stack of stride-2 transposed convolutions with batch norm and ReLU and a final
tanh, narrower than DCGAN's in the CPU presets. The Sinkhorn solver is geomloss's tensorized backend
(the (B, B) cost matrices fit in memory; no KeOps).

GPU presets (``mnist_gpu``, ``cifar10_gpu``): DCGAN's latent of 100 and half its width (64 channels in
the last stage, 256 on the 4x4 base grid at 32x32), DCGAN's Adam settings.

Resolution: as DCGAN grows its generator by one transposed-convolution stage per doubling, the
decoder starts from a (H / 2^L)-sided feature map and doubles L times, where L counts the halvings
of the side while it is even and above 4 (28: 7 -> 14 -> 28; 32: 4 -> 8 -> 16 -> 32; 64: 4 -> ... -> 64);
channels halve at each stage from `channels * 2^(L-1)`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from trilemma.contract.likelihood import to_signed
from trilemma.contract.family import Capabilities, GenerativeModel
from trilemma.models.blocks import halvings


@dataclass
class Config:
    latent_dim: int = 100  # dimension of z ~ N(0, I) (DCGAN: 100)
    channels: int = 64  # channels of the last hidden stage; doubled per stage towards the input (DCGAN: 128)
    blur: float = 0.05  # Sinkhorn blur on the [-1, 1] pixel scale, eps = blur^p (geomloss default)
    scaling: float = 0.5  # geomloss eps-scaling ratio: closer to 1 = more Sinkhorn iterations, more exact
    lr: float = 2e-4  # Adam learning rate (DCGAN's)
    beta1: float = 0.5  # Adam beta1 (DCGAN's)
    beta2: float = 0.999  # Adam beta2


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
        # ~100 s of CPU training: a narrow decoder so that thousands of steps fit in the budget.
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
