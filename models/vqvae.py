"""VQ-VAE: a discrete latent autoencoder with a PixelCNN prior over its codes.

van den Oord, Vinyals & Kavukcuoglu (2017), "Neural Discrete Representation Learning", NeurIPS.

An encoder maps the image to a grid of vectors, each replaced by its nearest codebook vector; a decoder
maps the codes back to a distribution over pixels, its gradient copied through the quantizer
(straight-through). The loss is the paper's eq. 3 with the codebook loss, not the EMA codebook update
of its appendix: the codebook is then an ordinary parameter, which the harness's weight EMA and
checkpoints treat like every other (with a 10x learning rate, to keep up as the EMA update would). A
gated PixelCNN over the code grid is the prior. The encoder is deterministic, so -log p(x) <= -log
p(x | z_q(x)) - log p_prior(z_q(x)), the ELBO of a one-hot posterior, which ``nll`` reports. The
autoencoder is ``trilemma.models.parts.vqvae.VQAutoencoder`` (absorbing diffusion's too); it downsamples
by 4, as the paper, so the code grid grows with the image (28 -> 7x7, 32 -> 8x8).

What the small version changes from the paper: 32-48 channels and 64-128 codes of dimension 16 on the
CPU presets (the GPU presets: the paper's 256 channels and 512 x 64 codebook, residual blocks of 128
hidden units on MNIST and its 256 on CIFAR-10, 4.5M parameters, with a 12-layer prior of 128 maps);
a discretized logistic decoder instead of a fixed-variance Gaussian, so the bound is on the discrete
pixels; the codebook initialised from the first batch's encoder outputs, so many codes are in use from
the first step; the prior (5-6 gated layers of 32 maps on the CPU) trained jointly on detached codes
with its own optimizer, where the paper trains it after the autoencoder.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trilemma.contract.family import Capabilities, GenerativeModel
from trilemma.models.blocks import at_least, positive
from trilemma.models.parts.vqvae import VQAutoencoder


@dataclass
class Config:
    hidden: int = 128  # channels of the encoder and decoder convolutions (paper: 256)
    res_blocks: int = 2  # residual blocks at the latent resolution in encoder and decoder (paper: 2)
    res_hidden: int = 32  # channels inside a residual block's 3x3 convolution
    num_codes: int = 256  # K, codebook size (paper: 512)
    code_dim: int = 32  # D, dimension of a codebook vector (paper: 64)
    beta: float = 0.25  # commitment-loss weight (paper: 0.25)
    prior_channels: int = 64  # channels of the PixelCNN prior
    prior_layers: int = 6  # gated layers of the prior; each widens its receptive field by one row/column
    lr: float = 1e-3  # Adam learning rate of the encoder and decoder (paper: 2e-4)
    codebook_lr: float = 1e-2  # Adam learning rate of the codebook: higher, so the codes keep up with
    #   the moving encoder outputs in a short run (the EMA update the paper's appendix offers for this)
    prior_lr: float = 1e-3  # Adam learning rate of the prior
    min_log_scale: float = -6.0  # floor on the decoder's logistic log-scale, for stability

    def __post_init__(self):
        at_least(self, 1, "hidden", "res_blocks", "res_hidden", "num_codes", "code_dim", "prior_channels",
                 "prior_layers")
        positive(self, "lr", "codebook_lr", "prior_lr")
        at_least(self, 0, "beta")


class GatedLayer(nn.Module):
    """One layer of the gated PixelCNN with a vertical and a horizontal stack (no blind spot).

    The vertical stack sees the rows strictly above a position (its input was shifted down one row);
    the horizontal stack sees the positions strictly to the left in the same row (shifted right one
    column) plus the vertical stack. The convolutions below are causal on those shifted inputs.
    """

    def __init__(self, ch: int):
        super().__init__()
        # Vertical: 2x3 kernel over the current and previous row (padding added in forward).
        self.v_conv = nn.Conv2d(ch, 2 * ch, (2, 3))
        self.v_to_h = nn.Conv2d(2 * ch, 2 * ch, 1)
        # Horizontal: 1x2 kernel over the current and previous column.
        self.h_conv = nn.Conv2d(ch, 2 * ch, (1, 2))
        self.h_out = nn.Conv2d(ch, ch, 1)

    @staticmethod
    def gate(a):
        t, s = a.chunk(2, dim=1)
        return torch.tanh(t) * torch.sigmoid(s)

    def forward(self, v, h):  # (B, ch, h, w) each
        v_feat = self.v_conv(F.pad(v, (1, 1, 1, 0)))  # (B, 2ch, h, w): pad left, right, top
        h_feat = self.h_conv(F.pad(h, (1, 0, 0, 0))) + self.v_to_h(v_feat)  # pad left only
        return self.gate(v_feat), h + self.h_out(self.gate(h_feat))


class PixelCNNPrior(nn.Module):
    """Autoregressive prior over a grid of code indices, raster order; categorical over K codes."""

    def __init__(self, num_codes: int, ch: int, layers: int):
        super().__init__()
        self.embed = nn.Embedding(num_codes, ch)
        self.layers = nn.ModuleList(GatedLayer(ch) for _ in range(layers))
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(ch, ch, 1), nn.ReLU(), nn.Conv2d(ch, num_codes, 1))

    def forward(self, codes):  # (B, h, w) long -> (B, K, h, w) logits
        e = self.embed(codes).permute(0, 3, 1, 2)  # (B, ch, h, w)
        v = F.pad(e, (0, 0, 1, 0))[:, :, :-1]  # shift down: row i sees rows < i only
        h = F.pad(e, (1, 0, 0, 0))[:, :, :, :-1]  # shift right: column j sees columns < j only
        for layer in self.layers:
            v, h = layer(v, h)
        return self.head(h)


class VQVAE(GenerativeModel):
    name = "vqvae"
    paper = ("van den Oord, Vinyals & Kavukcuoglu (2017), Neural Discrete Representation Learning, "
             "NeurIPS")
    family = "VAE"
    literature = "VQ-VAE"
    capabilities = Capabilities(density="bound", free_form_jacobian=False, sampling="autoregressive")
    Config = Config
    presets = {
        "tiny": dict(hidden=16, res_blocks=1, res_hidden=8, num_codes=16, code_dim=4,
                     prior_channels=8, prior_layers=2),
        "mnist": dict(hidden=32, res_hidden=16, num_codes=64, code_dim=16, prior_channels=32,
                      prior_layers=5),
        "cifar10": dict(hidden=48, res_hidden=24, num_codes=128, code_dim=16, prior_channels=32,
                        prior_layers=6),
        # The paper's CIFAR-10 autoencoder (256 channels, K = 512 codes of 64 dimensions, lr 2e-4; its
        # residual blocks of 256 hidden units, half that on MNIST) and a 12-layer, 128-map prior.
        "mnist_gpu": dict(hidden=256, res_hidden=128, num_codes=512, code_dim=64, prior_channels=128,
                          prior_layers=12, lr=2e-4),
        "cifar10_gpu": dict(hidden=256, res_hidden=256, num_codes=512, code_dim=64, prior_channels=128,
                            prior_layers=12, lr=2e-4),
    }

    def __init__(self, config: Config, data_shape):
        super().__init__(config, data_shape)
        self.vq = VQAutoencoder(self.data_shape, config.hidden, config.res_blocks, config.res_hidden,
                                config.num_codes, config.code_dim, config.min_log_scale)
        self.latent_hw = self.vq.latent_hw  # (H/4, W/4)
        self.prior = PixelCNNPrior(config.num_codes, config.prior_channels, config.prior_layers)

    def prior_nll(self, codes):
        """-log p_prior(codes) in nats per image: cross-entropy of the K-way softmax at each position."""
        return F.cross_entropy(self.prior(codes), codes, reduction="none").flatten(1).sum(1)  # (B,)

    # --- training -------------------------------------------------------------------------------
    def configure_optimizers(self):
        return {"autoencoder": self.vq.optimizer(self.config.lr, self.config.codebook_lr),
                "prior": torch.optim.Adam(self.prior.parameters(), lr=self.config.prior_lr)}

    def loss(self, x):
        # Autoencoder and codebook (the codebook initialised from the first batch).
        ae_loss, logs, codes = self.vq.loss(x, self.config.beta)
        # Prior: maximum likelihood of the (detached) codes the encoder just chose.
        prior_loss = self.prior_nll(codes.detach()).mean() / codes[0].numel()  # nats/position
        return {"autoencoder": ae_loss, "prior": prior_loss, **logs}

    # --- sampling -------------------------------------------------------------------------------
    def samplers(self):
        # One prior evaluation per latent position (recomputed over the whole grid, no caching),
        # plus one decoder pass.
        h, w = self.latent_hw
        return {"ancestral": h * w + 1}

    def sampling_modules(self):
        return [self.prior, self.vq.codebook, self.vq.decoder]

    def generate(self, n, sampler):
        h, w = self.latent_hw
        codes = torch.zeros(n, h, w, dtype=torch.long, device=self.device)
        # Ancestral sampling in raster order: position (i, j) is drawn given all earlier ones.
        for i in range(h):
            for j in range(w):
                # The prior is causal, so rows below i cannot change position (i, j): evaluate on
                # rows 0..i only (half the work on average, the same logits).
                logits = self.prior(codes[:, :i + 1])[:, :, i, j]  # (n, K)
                codes[:, i, j] = torch.multinomial(F.softmax(logits, dim=1), 1).squeeze(1)
        return self.vq.images(codes)  # the decoder's mean (n, C, H, W)

    # --- likelihood -----------------------------------------------------------------------------
    def nll(self, x):
        recon, codes = self.vq.reconstruction_nll(x)
        return recon + self.prior_nll(codes)  # (B,) nats

    def nll_protocol(self):
        return {"bound": "-log p(x|z_q(x)) - log p_prior(z_q(x))", "latent_grid": list(self.latent_hw),
                "num_codes": self.config.num_codes}
