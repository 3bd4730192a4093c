"""Consistency models, trained from scratch by consistency training (CT), with iCT's improvements.

Song, Dhariwal, Chen & Sutskever (2023), "Consistency Models", ICML; Song & Dhariwal (2023), "Improved
Techniques for Training Consistency Models" (iCT), arXiv:2310.14189 (ICLR 2024).

A consistency function f(x, sigma) = c_skip x + c_out F(c_in x, c_noise) maps any point of a
probability-flow trajectory of EDM's diffusion to its origin; c_skip(sigma_min) = 1 and
c_out(sigma_min) = 0 make the boundary condition f(x, sigma_min) = x hold by construction.
Consistency training (Algorithm 3) needs no teacher: on the rho = 7 discretisation, the online
network at s_{i+1} is matched to itself without gradient at s_i, on the same noise. iCT's choices:
no EMA target, the pseudo-Huber metric, weights 1 / (s_{i+1} - s_i), a discretised log-normal over i
and the exponential curriculum of N over the budget (``self.progress``). Samplers: ``one_step`` (1
NFE) and ``two_step`` (re-noise to ``two_step_sigma``, 2 NFE). No density.

What the small version changes from the papers (iCT, CIFAR-10: NCSN++ of 56M parameters, RAdam 1e-4,
batch 1024, 400k steps, dropout 0.3): the project's DDPM++ U-Net (``trilemma.models.unet``); on the
CPU presets its small form (``CPU_UNETS``) with Adam 1e-3 (RAdam at 1e-4 learns nothing in a few
hundred steps) and the curriculum compressed into the run's budget; ``cifar10_gpu`` (and ``mnist_gpu``
on MNIST) is a DDPM++ U-Net of the paper's width (128 channels, 4 blocks, attention at 16x16) with
iCT's dropout and learning rate. The harness's EMA serves evaluation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from trilemma.contract.family import Capabilities, GenerativeModel
from trilemma.contract.likelihood import to_signed
from trilemma.models.blocks import positive
from trilemma.models.unet import CPU_UNETS, UNet, check_unet_config


@dataclass
class Config:
    base_channels: int = 128  # U-Net channels at full resolution (iCT, CIFAR-10: 128)
    channel_mult: tuple = (2, 2, 2)  # U-Net width multiplier per level
    num_res_blocks: int = 4  # U-Net residual blocks per level (iCT: 4)
    attn_resolutions: tuple = (16,)  # U-Net levels with self-attention (the middle block always has it)
    min_resolution: int = 8  # the U-Net halves the image while it stays >= this (32/16/8)
    dropout: float = 0.3  # dropout in the residual blocks (iCT, CIFAR-10: 0.3)
    norm_groups: int = 32  # GroupNorm groups (fewer when a layer has fewer channels)
    sigma_data: float = 0.5  # std of the data on [-1, 1] in the parameterisation (papers: 0.5)
    sigma_min: float = 0.002  # the boundary: f(x, sigma_min) = x (papers: 0.002)
    sigma_max: float = 80.0  # the noise level samples start from (papers: 80)
    rho: float = 7.0  # curvature of the discretisation (papers: 7)
    s0: int = 10  # initial discretisation steps of the curriculum (iCT: 10)
    s1: int = 1280  # final discretisation steps (iCT: 1280)
    p_mean: float = -1.1  # log-normal index distribution: mean of ln sigma (iCT: -1.1)
    p_std: float = 2.0  # its std (iCT: 2.0)
    huber_c: float = 0.0  # pseudo-Huber c; 0: iCT's 0.00054 sqrt(D)
    two_step_sigma: float = 0.821  # noise level of the second step of `two_step` (iCT, CIFAR-10: 0.821)
    lr: float = 1e-4  # learning rate (iCT: RAdam 1e-4; here Adam)
    grad_clip: float = 1.0  # gradient-norm clipping (not in the papers; a safety net at the CPU rates)

    def __post_init__(self):
        positive(self, "sigma_data", "sigma_min", "rho", "p_std", "lr", "grad_clip")
        if not self.sigma_max > self.sigma_min:
            raise ValueError("'sigma_max' must be > 'sigma_min'")
        if not 1 <= self.s0 <= self.s1:
            raise ValueError("'s0' must be >= 1 and <= 's1'")
        if not self.sigma_min < self.two_step_sigma < self.sigma_max:
            raise ValueError("'two_step_sigma' must be in (sigma_min, sigma_max)")
        if self.huber_c < 0:
            raise ValueError("'huber_c' must be >= 0 (0: iCT's default)")
        check_unet_config(self)


class Consistency(GenerativeModel):
    name = "consistency"
    title = "Consistency (CT)"
    paper = ("Song, Dhariwal, Chen & Sutskever (2023), Consistency Models, ICML; Song & Dhariwal (2023), "
             "Improved Techniques for Training Consistency Models, arXiv:2310.14189")
    family = "EBM"  # a diffusion model's probability flow, distilled into one step; filed with diffusion
    literature = None
    reported = {"fid": 8.70, "nfe": 1,
                "source": "Song et al. 2023, Table 2 (CT, CIFAR-10, one step; 5.83 with two); iCT: 2.83 one "
                          "step, 2.46 two (Song & Dhariwal 2023, Table 2)"}
    capabilities = Capabilities(density="none", free_form_jacobian=True, sampling="one_pass")
    Config = Config
    presets = {
        "tiny": dict(CPU_UNETS["tiny"], min_resolution=4, lr=1e-3),
        "mnist": dict(CPU_UNETS["mnist"], min_resolution=4, lr=1e-3),
        "cifar10": dict(CPU_UNETS["cifar10"], min_resolution=4, lr=1e-3),
        "mnist_gpu": dict(),  # the CIFAR-10 GPU model, on MNIST
        "cifar10_gpu": dict(),  # iCT's CIFAR-10 width and schedule on the project's DDPM++ U-Net (the defaults)
    }

    def __init__(self, config: Config, data_shape):
        super().__init__(config, data_shape)
        self.net = UNet.from_config(config, data_shape)

    # --- the parameterisation ---------------------------------------------------------------------
    def consistency_fn(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """f(x, sigma) = c_skip x + c_out F(c_in x, c_noise): x (B, C, H, W), sigma (B,) or ()."""
        cfg, sd = self.config, self.config.sigma_data
        sigma = sigma.to(x.dtype).expand(x.shape[0]) if sigma.ndim == 0 else sigma.to(x.dtype)
        s = sigma[:, None, None, None]
        c_skip = sd ** 2 / ((s - cfg.sigma_min) ** 2 + sd ** 2)  # exactly 1 at sigma_min
        c_out = sd * (s - cfg.sigma_min) / (sd ** 2 + s ** 2).sqrt()  # exactly 0 at sigma_min
        c_in = 1 / (s ** 2 + sd ** 2).sqrt()
        return c_skip * x + c_out * self.net(c_in * x, 250 * sigma.log())

    # --- iCT's schedule ---------------------------------------------------------------------------
    def discretisation_steps(self, progress: float) -> int:
        """N(k) = min(s0 2^floor(k / K'), s1) + 1 with K' = floor(K / (log2(s1/s0) + 1)), k / K = progress."""
        cfg = self.config
        stages = math.log2(cfg.s1 / cfg.s0) + 1  # K / K', up to the floor of K' (K is unknown: a budget)
        return min(cfg.s0 * 2 ** math.floor(progress * stages), cfg.s1) + 1

    def sigmas(self, n: int) -> torch.Tensor:
        """s_1 = sigma_min < ... < s_n = sigma_max, the rho-schedule ascending: (n,)."""
        cfg = self.config
        ramp = torch.linspace(0, 1, n, dtype=torch.float64)
        lo, hi = cfg.sigma_min ** (1 / cfg.rho), cfg.sigma_max ** (1 / cfg.rho)
        return (lo + ramp * (hi - lo)) ** cfg.rho

    def index_probabilities(self, sigmas: torch.Tensor) -> torch.Tensor:
        """iCT's discretised log-normal over the n - 1 adjacent pairs (s_i, s_{i+1}): (n - 1,), sums to 1."""
        cfg = self.config
        cdf = torch.erf((sigmas.log() - cfg.p_mean) / (math.sqrt(2) * cfg.p_std))
        p = cdf[1:] - cdf[:-1]
        return p / p.sum()

    # --- training -----------------------------------------------------------------------------------
    def configure_optimizers(self):
        return {"model": torch.optim.Adam(self.parameters(), lr=self.config.lr)}

    def consistency_loss(self, y: torch.Tensor) -> tuple[torch.Tensor, int]:
        """iCT's consistency-training loss on images y (B, C, H, W) in [-1, 1], and the N it used."""
        n = self.discretisation_steps(self.progress)
        sigmas = self.sigmas(n).to(y.device)
        i = torch.multinomial(self.index_probabilities(sigmas).float(), y.shape[0], replacement=True)  # (B,)
        s_lo, s_hi = sigmas[i].float(), sigmas[i + 1].float()
        z = torch.randn_like(y)  # one noise for both levels: the two points lie on one trajectory
        with torch.no_grad():  # the target network is the online one, without gradient (iCT)
            target = self.consistency_fn(y + s_lo[:, None, None, None] * z, s_lo)
        online = self.consistency_fn(y + s_hi[:, None, None, None] * z, s_hi)
        c = self.config.huber_c or 0.00054 * math.sqrt(self.num_dims)
        distance = ((online - target).pow(2).flatten(1).sum(1) + c ** 2).sqrt() - c  # pseudo-Huber, (B,)
        return (distance / (s_hi - s_lo)).mean(), n  # lambda(s_i) = 1 / (s_{i+1} - s_i)

    def loss(self, x):
        loss, n = self.consistency_loss(to_signed(x))
        return {"model": loss, "discretisation_steps": float(n)}

    # --- sampling -----------------------------------------------------------------------------------
    def samplers(self):
        return {"one_step": 1, "two_step": 2}

    def sampling_modules(self):
        return [self.net]

    def generate(self, n, sampler):
        cfg = self.config
        z = torch.randn(n, *self.data_shape, device=self.device)
        x = self.consistency_fn(z * cfg.sigma_max, torch.tensor(cfg.sigma_max, device=z.device))
        if sampler == "two_step":  # Algorithm 1: re-noise to sigma, then map back to the origin again
            s = cfg.two_step_sigma
            noise = math.sqrt(s ** 2 - cfg.sigma_min ** 2) * torch.randn_like(x)
            x = self.consistency_fn(x + noise, torch.tensor(s, device=z.device))
        return x.clamp(-1, 1)
