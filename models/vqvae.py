"""VQ-VAE: a discrete latent autoencoder with a PixelCNN prior over its codes.

Paper: Aaron van den Oord, Oriol Vinyals, Koray Kavukcuoglu (2017), "Neural Discrete Representation
Learning", NeurIPS 2017.

An encoder maps the image to a grid of vectors ``z_e(x)``; each is replaced by its nearest neighbour
among K codebook vectors, ``z_q(x)``; a decoder maps ``z_q(x)`` back to a distribution over pixels.
The quantizer has no gradient, so the decoder's gradient with respect to ``z_q`` is copied onto
``z_e`` (the straight-through estimator). The loss is the paper's eq. 3:

    L = -log p(x | z_q(x)) + ||sg[z_e(x)] - e||^2 + beta ||z_e(x) - sg[e]||^2

with the codebook loss (second term), not the EMA codebook update of the paper's appendix: the
codebook is then an ordinary parameter, which the harness's weight EMA and checkpoints treat like
every other (it gets a 10x learning rate instead, so that it keeps up with the encoder as the EMA
update would). A gated PixelCNN over the latent grid is the prior that makes the model generative.

Likelihood bound. The encoder is deterministic: q(z|x) puts all its mass on the codes z_q(x). Then
p(x) = sum_z p(z) p(x|z) >= p(z_q(x)) p(x|z_q(x)), i.e.

    -log p(x) <= -log p(x | z_q(x)) - log p_prior(z_q(x))      (nats),

which is the ELBO with a one-hot posterior (its entropy is 0). With the uniform prior the paper uses
while training the autoencoder, the second term is the constant ``h*w*log K`` (the paper's "KL =
log K"); with the learned prior it is the prior's cross-entropy on the codes. ``nll`` reports this.

What the small version changes from the paper:
  * 32-48 channels instead of 256, K = 64-128 codes of dimension 16 instead of 512 x 64 (the
    Config defaults, for a GPU, are 128 channels and 256 x 32);
  * the GPU presets (``mnist_gpu``, ``cifar10_gpu``) have the paper's 256 channels and 512 x 64
    codebook, residual blocks of 128 hidden units in ``mnist_gpu`` and the paper's 256 in
    ``cifar10_gpu`` (its CIFAR-10 autoencoder, 4.5M parameters), and a 12-layer prior of 128 maps
    (4.3M; the paper's prior for CIFAR-10 is not specified beyond "a PixelCNN");
  * the decoder outputs a discretized logistic per subpixel, mean and log-scale
    (``trilemma.contract.likelihood``), instead of a fixed-variance Gaussian, so the bound is on discrete
    pixels;
  * the codebook is initialised from encoder outputs of the first batch (not in the paper) so that
    many codes are in use from the first step of a short run;
  * the prior is trained jointly with the autoencoder, on detached codes, with its own optimizer
    (the paper trains it after the autoencoder): the two losses share no parameters, and separate
    optimizers keep that plain and let each have its own learning rate;
  * the prior is a small gated PixelCNN (van den Oord et al. 2016) of 5-6 layers and 32 channels.

Resolution: as in the paper (ImageNet 128x128 -> a 32x32 grid of codes), the encoder always
downsamples by 4 with two stride-2 convolutions, so the latent grid grows with the image (28 -> 7x7,
32 -> 8x8, 64 -> 16x16) and the prior has more positions to model; its depth is a config field.
The autoencoder is ``trilemma.models.parts.vqvae.VQAutoencoder`` (absorbing diffusion's too).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trilemma.contract.family import Capabilities, GenerativeModel
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
        for name in ("hidden", "res_blocks", "res_hidden", "num_codes", "code_dim", "prior_channels",
                     "prior_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"'{name}' must be >= 1")
        for name in ("lr", "codebook_lr", "prior_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"'{name}' must be > 0")
        if not self.beta >= 0:
            raise ValueError("'beta' must be >= 0")


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
