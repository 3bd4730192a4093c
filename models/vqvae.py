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
    codebook, residual blocks of 128 hidden units (the paper's 256), and a 12-layer prior of
    128 maps (the paper's prior for CIFAR-10 is not specified beyond "a PixelCNN");
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
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trilemma.contract.likelihood import discretized_logistic_nll, to_signed
from trilemma.contract.family import Capabilities, GenerativeModel


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


class ResBlock(nn.Module):
    """The paper's residual block: ReLU, 3x3 conv, ReLU, 1x1 conv, added to the input."""

    def __init__(self, ch: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.ReLU(), nn.Conv2d(ch, hidden, 3, padding=1),
                                 nn.ReLU(), nn.Conv2d(hidden, ch, 1))

    def forward(self, x):
        return x + self.net(x)


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
        # The paper's CIFAR-10 autoencoder (256 channels, K = 512 codes of 64 dimensions, lr 2e-4),
        # its residual blocks at half of its 256 hidden units, and a 12-layer, 128-map prior.
        "mnist_gpu": dict(hidden=256, res_hidden=128, num_codes=512, code_dim=64, prior_channels=128,
                          prior_layers=12, lr=2e-4),
        "cifar10_gpu": dict(hidden=256, res_hidden=128, num_codes=512, code_dim=64, prior_channels=128,
                            prior_layers=12, lr=2e-4),
    }

    def __init__(self, config: Config, data_shape):
        super().__init__(config, data_shape)
        c, H, W = self.data_shape
        if H % 4 or W % 4:
            raise ValueError(f"vqvae downsamples by 4: height and width must be multiples of 4, got {H}x{W}")
        self.latent_hw = (H // 4, W // 4)
        ch = config.hidden
        self.encoder = nn.Sequential(
            nn.Conv2d(c, ch // 2, 4, stride=2, padding=1), nn.ReLU(),  # (B, ch/2, H/2, W/2)
            nn.Conv2d(ch // 2, ch, 4, stride=2, padding=1), nn.ReLU(),  # (B, ch, H/4, W/4)
            nn.Conv2d(ch, ch, 3, padding=1),
            *[ResBlock(ch, config.res_hidden) for _ in range(config.res_blocks)],
            nn.ReLU(), nn.Conv2d(ch, config.code_dim, 1))  # (B, D, H/4, W/4)
        self.codebook = nn.Embedding(config.num_codes, config.code_dim)  # weight (K, D)
        self.decoder = nn.Sequential(
            nn.Conv2d(config.code_dim, ch, 3, padding=1),
            *[ResBlock(ch, config.res_hidden) for _ in range(config.res_blocks)], nn.ReLU(),
            nn.ConvTranspose2d(ch, ch // 2, 4, stride=2, padding=1), nn.ReLU(),  # (B, ch/2, H/2, W/2)
            nn.ConvTranspose2d(ch // 2, 2 * c, 4, stride=2, padding=1))  # (B, 2C, H, W): mean, log-scale
        self.prior = PixelCNNPrior(config.num_codes, config.prior_channels, config.prior_layers)
        # Set once the codebook has been initialised from encoder outputs (part of the checkpoint).
        self.register_buffer("codebook_ready", torch.zeros((), dtype=torch.bool))

    # --- autoencoder ----------------------------------------------------------------------------
    def encode(self, x):
        """uint8 (B, C, H, W) -> z_e (B, D, h, w) and code indices (B, h, w)."""
        z_e = self.encoder(to_signed(x))
        flat = z_e.permute(0, 2, 3, 1).flatten(0, 2)  # (B*h*w, D)
        book = self.codebook.weight  # (K, D)
        dist = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ book.t()
                + book.pow(2).sum(1))  # (B*h*w, K) squared distances
        codes = dist.argmin(1).view(z_e.shape[0], *z_e.shape[2:])  # (B, h, w)
        return z_e, codes

    def embed_codes(self, codes):  # (B, h, w) -> (B, D, h, w)
        return self.codebook(codes).permute(0, 3, 1, 2)

    def decode(self, z_q):  # (B, D, h, w) -> mean, log-scale of the logistic, each (B, C, H, W)
        mean, log_scale = self.decoder(z_q).chunk(2, dim=1)
        return mean, log_scale.clamp_min(self.config.min_log_scale)

    def prior_nll(self, codes):
        """-log p_prior(codes) in nats per image: cross-entropy of the K-way softmax at each position."""
        return F.cross_entropy(self.prior(codes), codes, reduction="none").flatten(1).sum(1)  # (B,)

    @torch.no_grad()
    def _init_codebook(self, x):
        """Copy K random encoder outputs of the first batch into the codebook (not in the paper)."""
        z_e = self.encoder(to_signed(x)).permute(0, 2, 3, 1).flatten(0, 2)  # (N, D)
        idx = torch.randint(0, z_e.shape[0], (self.config.num_codes,), device=z_e.device)
        book = self.codebook.weight
        book.copy_(z_e[idx] + 0.01 * z_e.std() * torch.randn_like(book))
        self.codebook_ready.fill_(True)

    # --- training -------------------------------------------------------------------------------
    def configure_optimizers(self):
        nets = [*self.encoder.parameters(), *self.decoder.parameters()]
        ae = torch.optim.Adam([{"params": nets},
                               {"params": self.codebook.parameters(), "lr": self.config.codebook_lr}],
                              lr=self.config.lr)
        return {"autoencoder": ae,
                "prior": torch.optim.Adam(self.prior.parameters(), lr=self.config.prior_lr)}

    def ae_losses(self, x):
        """The paper's eq. 3 terms (means per subpixel / latent element) and the chosen codes."""
        z_e, codes = self.encode(x)  # (B, D, h, w), (B, h, w)
        e = self.embed_codes(codes)  # (B, D, h, w)
        z_q = z_e + (e - z_e).detach()  # straight-through: forward value e, gradient copied onto z_e
        mean, log_scale = self.decode(z_q)
        recon = discretized_logistic_nll(x, mean, log_scale).mean() / self.num_dims  # nats/subpixel
        codebook = F.mse_loss(e, z_e.detach())  # moves the codes towards the encoder outputs
        commit = F.mse_loss(z_e, e.detach())  # keeps the encoder near its codes
        return recon, codebook, commit, codes

    def loss(self, x):
        if not bool(self.codebook_ready):
            self._init_codebook(x)
        # Autoencoder and codebook.
        recon, codebook_loss, commit_loss, codes = self.ae_losses(x)
        ae_loss = recon + codebook_loss + self.config.beta * commit_loss
        # Prior: maximum likelihood of the (detached) codes the encoder just chose.
        prior_loss = self.prior_nll(codes.detach()).mean() / codes[0].numel()  # nats/position
        used = torch.bincount(codes.flatten(), minlength=self.config.num_codes).gt(0).sum()
        return {"autoencoder": ae_loss, "prior": prior_loss,
                "recon_nats_per_dim": recon, "codebook": codebook_loss, "commit": commit_loss,
                "codes_used": used.float()}

    # --- sampling -------------------------------------------------------------------------------
    def samplers(self):
        # One prior evaluation per latent position (recomputed over the whole grid, no caching),
        # plus one decoder pass.
        h, w = self.latent_hw
        return {"ancestral": h * w + 1}

    def sampling_modules(self):
        return [self.prior, self.codebook, self.decoder]

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
        mean, _ = self.decode(self.embed_codes(codes))
        # The decoder's mean, as VAEs usually show, rather than a draw with per-pixel logistic noise.
        return mean.clamp(-1, 1)  # (n, C, H, W)

    # --- likelihood -----------------------------------------------------------------------------
    def nll(self, x):
        _, codes = self.encode(x)
        mean, log_scale = self.decode(self.embed_codes(codes))
        return discretized_logistic_nll(x, mean, log_scale) + self.prior_nll(codes)  # (B,) nats

    def nll_protocol(self):
        return {"bound": "-log p(x|z_q(x)) - log p_prior(z_q(x))", "latent_grid": list(self.latent_hw),
                "num_codes": self.config.num_codes}
