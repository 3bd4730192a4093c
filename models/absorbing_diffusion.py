"""Absorbing diffusion: a bidirectional transformer that unmasks VQ codes in parallel.

Bond-Taylor, Hessey, Sasaki, Breckon & Willcocks (2022), "Unleashing Transformers: Parallel Token
Prediction with Discrete Absorbing Diffusion for Fast High-Resolution Image Generation from
Vector-Quantized Codes", ECCV.

Two stages, as in the paper: a vector-quantized autoencoder (the project's VQ-VAE,
``trilemma.models.parts.vqvae``) trains for the first ``vq_fraction`` of the budget; then a discrete
absorbing diffusion is the prior of its code grid. q(z_t | z_0) masks each code with probability t/T, a
transformer without causal mask predicts p(z_0 | z_t) and is trained on the paper's reweighted ELBO
(``loss="elbo"``: the bound itself). ``parallel`` sampling unmasks several codes a step
(``sample_steps`` NFE); ``ancestral`` is the T-step chain whose bound ``nll`` reports, with the
decoder's discretized logistic on the pixels (``density="bound"``).

What the small version changes from the paper: a VQ-VAE with a likelihood decoder instead of a VQGAN
(so the bound is on the 8-bit images); a 7x7 (MNIST) or 8x8 (CIFAR-10) grid of 64-128 codes instead of
16x16 of 1024, with T = L as in the paper; a transformer of width 64 and depth 2 on the CPU presets,
256 x 12 on the GPU presets (half the paper's 512 x 24), no dropout, AdamW 5e-4, t uniform;
``parallel`` in 12 (MNIST) or 16 (CIFAR-10) steps, 24 and 32 on the GPU presets.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from trilemma.contract.family import Capabilities, GenerativeModel
from trilemma.models.blocks import at_least, positive
from trilemma.models.parts.vqvae import VQAutoencoder


@dataclass
class Config:
    vq_fraction: float = 0.5  # fraction of the training budget spent on the VQ-VAE (then frozen)
    hidden: int = 128  # VQ-VAE: channels of the encoder and decoder convolutions
    res_blocks: int = 2  # VQ-VAE: residual blocks at the latent resolution
    res_hidden: int = 32  # VQ-VAE: channels inside a residual block
    num_codes: int = 256  # K, codebook size (paper: 1024)
    code_dim: int = 32  # dimension of a codebook vector
    beta: float = 0.25  # commitment-loss weight
    lr: float = 1e-3  # Adam learning rate of the encoder and decoder
    codebook_lr: float = 1e-2  # Adam learning rate of the codebook (see vqvae)
    min_log_scale: float = -6.0  # floor on the decoder's logistic log-scale
    width: int = 256  # transformer width (paper: 512)
    depth: int = 12  # transformer layers (paper: 24)
    heads: int = 8  # attention heads (paper: 8)
    timesteps: int = 256  # T, steps of the absorbing process (paper: 256, one per code of its grid)
    sample_steps: int = 32  # S, steps of the `parallel` sampler (several codes unmasked a step)
    temperature: float = 1.0  # softmax temperature of the sampler (the bound is that of temperature 1)
    loss: Literal["reweighted_elbo", "elbo"] = "reweighted_elbo"  # the paper's weighting, or the bound
    nll_timesteps: int = 16  # K, stratified timesteps per image in nll(); >= T takes every t
    prior_lr: float = 5e-4  # AdamW learning rate of the transformer

    def __post_init__(self):
        at_least(self, 1, "hidden", "res_blocks", "res_hidden", "code_dim", "width", "heads")
        positive(self, "lr", "codebook_lr", "prior_lr")
        at_least(self, 0, "beta")
        if not 0 < self.vq_fraction < 1:
            raise ValueError("'vq_fraction' must be in (0, 1): both stages need part of the budget")
        if self.width % self.heads:
            raise ValueError(f"'heads' = {self.heads} must divide 'width' = {self.width}")
        at_least(self, 1, "timesteps", "sample_steps", "nll_timesteps", "num_codes", "depth")
        positive(self, "temperature")


class Denoiser(nn.Module):
    """p(z_0 | z_t): codes and [MASK] (token K) -> logits over the K codes at every position. No time
    input (the official code's ignores it): the count of masks says t."""

    def __init__(self, num_codes: int, positions: int, width: int, depth: int, heads: int):
        super().__init__()
        self.tokens = nn.Embedding(num_codes + 1, width)  # K codes and the mask token
        self.pos = nn.Parameter(0.02 * torch.randn(1, positions, width))  # learned, one per grid cell
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_codes)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, L) long in 0..K -> (B, L, K)
        h = self.tokens(z) + self.pos
        for block in self.blocks:  # no attention mask: every position sees the whole grid
            h = block(h)
        return self.head(self.norm(h))


class AbsorbingDiffusion(GenerativeModel):
    name = "absorbing_diffusion"
    title = "Absorbing diffusion (VQ)"
    paper = ("Bond-Taylor, Hessey, Sasaki, Breckon & Willcocks (2022), Unleashing Transformers: Parallel "
             "Token Prediction with Discrete Absorbing Diffusion for Fast High-Resolution Image Generation "
             "from Vector-Quantized Codes, ECCV")
    family = "EBM"  # the review files diffusion models under energy-based models
    literature = None
    reported = {"fid": 4.07, "source": "Bond-Taylor et al. 2022, abstract: LSUN Churches 256x256 "
                                       "(the paper reports no CIFAR-10 figures)"}
    capabilities = Capabilities(density="bound", free_form_jacobian=True, sampling="iterative")
    Config = Config
    presets = {
        "tiny": dict(hidden=16, res_blocks=1, res_hidden=8, num_codes=16, code_dim=4, width=16, depth=1,
                     heads=2, timesteps=8, sample_steps=3, nll_timesteps=2),
        "mnist": dict(hidden=32, res_hidden=16, num_codes=64, code_dim=16, width=64, depth=2, heads=4,
                      timesteps=49, sample_steps=12, nll_timesteps=2),
        "cifar10": dict(hidden=48, res_hidden=24, num_codes=128, code_dim=16, width=64, depth=2, heads=4,
                        timesteps=64, sample_steps=16, nll_timesteps=2),
        "mnist_gpu": dict(num_codes=256, width=256, depth=12, timesteps=49, sample_steps=24),
        "cifar10_gpu": dict(num_codes=256, width=256, depth=12, timesteps=64, sample_steps=32),
    }

    def __init__(self, config: Config, data_shape):
        super().__init__(config, data_shape)
        self.vq = VQAutoencoder(self.data_shape, config.hidden, config.res_blocks, config.res_hidden,
                                config.num_codes, config.code_dim, config.min_log_scale)
        self.latent_hw = self.vq.latent_hw  # (H/4, W/4)
        self.mask_id = config.num_codes  # the absorbing state
        self.denoiser = Denoiser(config.num_codes, self.latent_hw[0] * self.latent_hw[1], config.width,
                                 config.depth, config.heads)

    # --- the absorbing process ----------------------------------------------------------------------
    def q_sample(self, z0: torch.Tensor, t: torch.Tensor, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
        """z_t ~ q(z_t | z_0): each code masked independently with probability t/T. (B, L), (B,) ->
        z_t (B, L) and the mask (B, L) bool."""
        if generator is None:
            u = torch.rand(z0.shape, device=z0.device)  # (B, L)
        else:  # drawn on the CPU from a given generator, so that tests can replay it
            u = torch.rand(z0.shape, generator=generator).to(z0.device)
        mask = u < (t.float() / self.config.timesteps)[:, None]
        return torch.where(mask, torch.full_like(z0, self.mask_id), z0), mask

    def masked_nll(self, z0: torch.Tensor, zt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """sum over the masked positions of -log p(z_0^i | z_t), nats: (B,)."""
        logits = self.denoiser(zt)  # (B, L, K)
        ce = F.cross_entropy(logits.transpose(1, 2), z0, reduction="none")  # (B, L)
        return (ce * mask).sum(1)  # unmasked positions carry no loss (their z_t^i is z_0^i already)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images -> their code grids, flattened in raster order: (B, L)."""
        return self.vq.encode(x)[1].flatten(1)

    # --- training -----------------------------------------------------------------------------------
    def configure_optimizers(self):
        return {"autoencoder": self.vq.optimizer(self.config.lr, self.config.codebook_lr),
                "prior": torch.optim.AdamW(self.denoiser.parameters(), lr=self.config.prior_lr)}

    def loss(self, x):
        if self.progress < self.config.vq_fraction:
            return self.autoencoder_loss(x)
        return self.prior_loss(x)

    def autoencoder_loss(self, x):
        """Stage 1: the VQ-VAE's loss (van den Oord et al. eq. 3), as in ``trilemma.models.vqvae``."""
        loss, logs, _ = self.vq.loss(x, self.config.beta)  # the codebook initialised on the first batch
        return {"autoencoder": loss, **logs}

    def prior_loss(self, x):
        """Stage 2: the transformer on codes of the frozen autoencoder, one uniform t per image."""
        with torch.no_grad():
            z0 = self.codes(x)  # (B, L)
        T, L = self.config.timesteps, z0.shape[1]
        t = torch.randint(1, T + 1, (z0.shape[0],), device=z0.device)
        zt, mask = self.q_sample(z0, t)
        nll = self.masked_nll(z0, zt, mask)  # (B,)
        elbo = T * nll / t  # unbiased for the whole sum over t (t is uniform, p(t) = 1/T)
        # The paper's reweighting: 1/t, whose one-t estimate varies a lot, becomes (T - t + 1)/T (the
        # official code's 1 - t/T would leave t = T no weight).
        loss = (T - t + 1) / T * nll if self.config.loss == "reweighted_elbo" else elbo
        loss = loss.mean() / L  # nats per code
        return {"prior": loss, "elbo_nats_per_code": elbo.detach().mean() / L}

    # --- sampling -----------------------------------------------------------------------------------
    def samplers(self):
        # One transformer pass per step, plus the decoder once (not counted, as for DDPM's last step).
        return {"parallel": self.config.sample_steps, "ancestral": self.config.timesteps}

    def sampling_modules(self):
        return [self.denoiser, self.vq.codebook, self.vq.decoder]

    def sample_codes(self, n: int, steps: int) -> torch.Tensor:
        """Reverse chain of an absorbing process with `steps` steps: (n, L) codes."""
        L = self.latent_hw[0] * self.latent_hw[1]
        z = torch.full((n, L), self.mask_id, dtype=torch.long, device=self.device)  # z_T: all masked
        for s in range(steps, 0, -1):
            # Each still-masked code is unmasked with probability 1/s (all of them at s = 1).
            reveal = (z == self.mask_id) & (torch.rand(n, L, device=z.device) < 1.0 / s)
            probs = F.softmax(self.denoiser(z) / self.config.temperature, dim=-1)  # (n, L, K)
            draw = torch.multinomial(probs.flatten(0, 1), 1).view(n, L)
            z = torch.where(reveal, draw, z)  # codes already unmasked never change
        return z

    def generate(self, n, sampler):
        z = self.sample_codes(n, self.samplers()[sampler])
        return self.vq.images(z.view(n, *self.latent_hw))  # the decoder's mean, as for VQ-VAE

    # --- likelihood ---------------------------------------------------------------------------------
    def prior_bound(self, z0: torch.Tensor, k: int | None = None, generator=None) -> torch.Tensor:
        """The absorbing-diffusion ELBO of codes (B, L), nats (Austin et al. 2021),
        -log p(z_0) <= sum_{t=1}^T (1/t) E_q(z_t|z_0) [sum over masked i of -log p(z_0^i | z_t)]
        (z_T is all masks for every z_0: no prior term), from K stratified timesteps, one uniform in each
        of K equal strata of {1..T} and weighted by its size (unbiased for the sum over t)."""
        T = self.config.timesteps
        k = min(self.config.nll_timesteps if k is None else k, T)
        edges = torch.tensor([round(j * T / k) for j in range(k + 1)])  # stratum j: t in edges[j]+1..edges[j+1]
        sizes = edges[1:] - edges[:-1]  # (K,), each >= 1
        offsets = (torch.rand(z0.shape[0], k, generator=generator) * sizes).long()  # (B, K)
        ts = (edges[:-1] + 1 + offsets).to(z0.device)
        bound = torch.zeros(z0.shape[0], device=z0.device)
        for j in range(k):
            zt, mask = self.q_sample(z0, ts[:, j], generator)
            bound = bound + sizes[j].item() * self.masked_nll(z0, zt, mask) / ts[:, j]
        return bound  # (B,)

    def nll(self, x):
        recon, codes = self.vq.reconstruction_nll(x)  # (B,), (B, h, w)
        return recon + self.prior_bound(codes.flatten(1))  # (B,)

    def nll_protocol(self):
        T, K = self.config.timesteps, min(self.config.nll_timesteps, self.config.timesteps)
        return {"bound": "-log p(x|z_q(x)) + sum_t (1/t) E_q[sum over masked codes of -log p(z_0|z_t)] "
                         "(absorbing-diffusion ELBO of the T-step ancestral chain on z_q(x))",
                "timesteps": T, "kl_terms_per_image": K,
                "estimator": "every t, one mask draw each" if K >= T else "equal strata of t, one draw each",
                "latent_grid": list(self.latent_hw), "num_codes": self.config.num_codes}
