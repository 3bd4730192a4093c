"""The VQ-VAE autoencoder as a network (van den Oord, Vinyals & Kavukcuoglu 2017, "Neural Discrete
Representation Learning"): encoder, codebook and decoder, shared by the vqvae family (with its PixelCNN
prior) and absorbing diffusion (with its transformer prior).

The encoder downsamples by 4 with two stride-2 convolutions, so the code grid is a quarter of the image
on each side; the decoder outputs a discretized logistic per subpixel (mean and log-scale). The loss is
the paper's eq. 3 with the codebook loss (not the EMA update of its appendix), the codebook initialised
from encoder outputs of the first batch; ``trilemma.models.vqvae`` says why.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trilemma.contract.likelihood import discretized_logistic_nll, to_signed


class ResBlock(nn.Module):
    """The paper's residual block: ReLU, 3x3 conv, ReLU, 1x1 conv, added to the input."""

    def __init__(self, ch: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.ReLU(), nn.Conv2d(ch, hidden, 3, padding=1),
                                 nn.ReLU(), nn.Conv2d(hidden, ch, 1))

    def forward(self, x):
        return x + self.net(x)


class VQAutoencoder(nn.Module):
    """uint8 image (B, C, H, W) -> code indices (B, H/4, W/4) -> discretized logistic p(x | z_q)."""

    def __init__(self, shape: tuple[int, int, int], hidden: int, res_blocks: int, res_hidden: int,
                 num_codes: int, code_dim: int, min_log_scale: float):
        super().__init__()
        c, H, W = shape
        if H % 4 or W % 4:
            raise ValueError(f"vqvae downsamples by 4: height and width must be multiples of 4, got {H}x{W}")
        self.latent_hw = (H // 4, W // 4)
        self.num_codes, self.min_log_scale = num_codes, min_log_scale
        ch = hidden
        self.encoder = nn.Sequential(
            nn.Conv2d(c, ch // 2, 4, stride=2, padding=1), nn.ReLU(),  # (B, ch/2, H/2, W/2)
            nn.Conv2d(ch // 2, ch, 4, stride=2, padding=1), nn.ReLU(),  # (B, ch, H/4, W/4)
            nn.Conv2d(ch, ch, 3, padding=1),
            *[ResBlock(ch, res_hidden) for _ in range(res_blocks)],
            nn.ReLU(), nn.Conv2d(ch, code_dim, 1))  # (B, D, H/4, W/4)
        self.codebook = nn.Embedding(num_codes, code_dim)  # weight (K, D)
        self.decoder = nn.Sequential(
            nn.Conv2d(code_dim, ch, 3, padding=1),
            *[ResBlock(ch, res_hidden) for _ in range(res_blocks)], nn.ReLU(),
            nn.ConvTranspose2d(ch, ch // 2, 4, stride=2, padding=1), nn.ReLU(),  # (B, ch/2, H/2, W/2)
            nn.ConvTranspose2d(ch // 2, 2 * c, 4, stride=2, padding=1))  # (B, 2C, H, W): mean, log-scale
        # Set once the codebook has been initialised from encoder outputs (part of the checkpoint).
        self.register_buffer("codebook_ready", torch.zeros((), dtype=torch.bool))

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
        return mean, log_scale.clamp_min(self.min_log_scale)

    def images(self, codes):  # (B, h, w) -> the decoder's mean (B, C, H, W) in [-1, 1]
        # The mean, as VAEs usually show, rather than a draw with per-pixel logistic noise.
        mean, _ = self.decode(self.embed_codes(codes))
        return mean.clamp(-1, 1)

    def reconstruction_nll(self, x):
        """-log p(x | z_q(x)) in nats per image (B,), and the codes z_q(x) (B, h, w)."""
        _, codes = self.encode(x)
        mean, log_scale = self.decode(self.embed_codes(codes))
        return discretized_logistic_nll(x, mean, log_scale), codes

    @torch.no_grad()
    def init_codebook(self, x):
        """Copy K random encoder outputs of the first batch into the codebook (not in the paper)."""
        z_e = self.encoder(to_signed(x)).permute(0, 2, 3, 1).flatten(0, 2)  # (N, D)
        idx = torch.randint(0, z_e.shape[0], (self.num_codes,), device=z_e.device)
        book = self.codebook.weight
        book.copy_(z_e[idx] + 0.01 * z_e.std() * torch.randn_like(book))
        self.codebook_ready.fill_(True)

    def optimizer(self, lr: float, codebook_lr: float) -> torch.optim.Optimizer:
        """Adam over encoder and decoder, the codebook at its own (higher) learning rate."""
        nets = [*self.encoder.parameters(), *self.decoder.parameters()]
        return torch.optim.Adam([{"params": nets}, {"params": self.codebook.parameters(), "lr": codebook_lr}],
                                lr=lr)

    def ae_losses(self, x):
        """The paper's eq. 3 terms (means per subpixel / latent element) and the chosen codes."""
        z_e, codes = self.encode(x)  # (B, D, h, w), (B, h, w)
        e = self.embed_codes(codes)  # (B, D, h, w)
        z_q = z_e + (e - z_e).detach()  # straight-through: forward value e, gradient copied onto z_e
        mean, log_scale = self.decode(z_q)
        recon = discretized_logistic_nll(x, mean, log_scale).mean() / x[0].numel()  # nats/subpixel
        codebook = F.mse_loss(e, z_e.detach())  # moves the codes towards the encoder outputs
        commit = F.mse_loss(z_e, e.detach())  # keeps the encoder near its codes
        return recon, codebook, commit, codes

    def loss(self, x, beta: float):
        """Eq. 3 on uint8 ``x`` (the codebook initialised on the first call): the loss, its terms and
        the number of codes in use for the log, and the codes chosen (B, h, w)."""
        if not bool(self.codebook_ready):
            self.init_codebook(x)
        recon, codebook, commit, codes = self.ae_losses(x)
        used = torch.bincount(codes.flatten(), minlength=self.num_codes).gt(0).sum()
        logs = {"recon_nats_per_dim": recon, "codebook": codebook, "commit": commit,
                "codes_used": used.float()}
        return recon + codebook + beta * commit, logs, codes
