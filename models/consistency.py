"""Consistency models, trained from scratch by consistency training (CT), with iCT's improvements.

Song, Dhariwal, Chen & Sutskever (2023), "Consistency Models", ICML; Song & Dhariwal (2023), "Improved
Techniques for Training Consistency Models" (iCT), arXiv:2310.14189 (ICLR 2024).

A consistency function f(x, sigma) maps any point of a probability-flow trajectory of the diffusion
x = y + sigma z (EDM's, sigma in [sigma_min, sigma_max]) to the trajectory's origin, so one evaluation at
sigma_max turns noise into a sample. The boundary condition f(x, sigma_min) = x holds *by construction*
(Song et al. eq. 4): with a free network F,

    f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma)),
    c_skip = sigma_data^2 / ((sigma - sigma_min)^2 + sigma_data^2),   c_out = sigma_data (sigma - sigma_min)
    / sqrt(sigma_data^2 + sigma^2),   c_in = 1 / sqrt(sigma^2 + sigma_data^2),   c_noise = 250 ln sigma,

so c_skip(sigma_min) = 1 and c_out(sigma_min) = 0 exactly.

Consistency training (Song et al. Algorithm 3) needs no pretrained diffusion model: on a discretisation
sigma_min = s_1 < ... < s_N = sigma_max (EDM's rho = 7 schedule), draw an index i, one noise z, and match
the online network at the higher level to the target at the lower one, on the *same* z:

    loss = lambda(s_i) d( f_theta(y + s_{i+1} z, s_{i+1}),  stopgrad f_theta-(y + s_i z, s_i) ).

iCT's choices, taken here (sec. 3-5 of Song & Dhariwal): the target network is the online one without
gradient (theta- = stopgrad theta, no EMA teacher); the pseudo-Huber metric d(a, b) = sqrt(||a - b||^2 +
c^2) - c with c = 0.00054 sqrt(D); the weighting lambda(s_i) = 1 / (s_{i+1} - s_i); the index drawn from
a discretised log-normal, p(i) proportional to erf((ln s_{i+1} - P_mean) / (sqrt 2 P_std)) -
erf((ln s_i - P_mean) / (sqrt 2 P_std)), P_mean = -1.1, P_std = 2; and the exponential curriculum
N(k) = min(s0 2^floor(k / K'), s1) + 1, K' = floor(K / (log2(s1 / s0) + 1)), s0 = 10, s1 = 1280, with k / K
the fraction of the training budget done (``self.progress``).

Samplers (Song et al. Algorithm 1): ``one_step``, f(sigma_max z, sigma_max), 1 NFE; ``two_step``, then
re-noise to ``two_step_sigma`` and apply f once more, 2 NFE (iCT's sigma = 0.821 on CIFAR-10).
Density: none (a consistency model defines no likelihood).

Network: the DDPM++ U-Net of ``trilemma.models.unet`` (iCT uses NCSN++, CT the NCSN++ of EDM).

What the small version changes from the papers (iCT, CIFAR-10: NCSN++ of 56M parameters, RAdam 1e-4,
batch 1024, 400k steps, dropout 0.3, EMA 0.99993 for evaluation):
    * CPU presets: a DDPM++ U-Net of 16 base channels, one block per level, attention only in the middle
      block, no dropout, Adam 1e-3 (RAdam at 1e-4 learns nothing in a few hundred steps); the harness's
      EMA (the suite's half-life) for evaluation; the curriculum compressed into the run's budget (a few
      hundred steps for iCT's 400k), so the schedule doubles N every ~1/8 of the budget, as in iCT;
    * the ``cifar10_gpu`` preset (``mnist_gpu`` the same on MNIST) is a DDPM++ U-Net of the paper's width (128
      channels, 4 blocks, attention at 16x16) with iCT's dropout and learning rate; DDPM++ rather than NCSN++
      (the project's U-Net).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from trilemma.contract.family import Capabilities, GenerativeModel
from trilemma.contract.likelihood import to_signed
from trilemma.models.unet import UNet


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
        for name in ("sigma_data", "sigma_min", "rho", "p_std", "lr", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"'{name}' must be > 0")
        if not self.sigma_max > self.sigma_min:
            raise ValueError("'sigma_max' must be > 'sigma_min'")
        if not 1 <= self.s0 <= self.s1:
            raise ValueError("'s0' must be >= 1 and <= 's1'")
        if not self.sigma_min < self.two_step_sigma < self.sigma_max:
            raise ValueError("'two_step_sigma' must be in (sigma_min, sigma_max)")
        if self.huber_c < 0:
            raise ValueError("'huber_c' must be >= 0 (0: iCT's default)")


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
        "tiny": dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                     min_resolution=4, dropout=0.0, norm_groups=4, lr=1e-3),
        # 2 CPU cores, ~40 s: a few hundred steps of a 0.3M-parameter U-Net (two passes a step, one with
        # gradients); sampling is 1 or 2 NFE.
        "mnist": dict(base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(),
                      min_resolution=4, dropout=0.0, norm_groups=8, lr=1e-3),
        "cifar10": dict(base_channels=16, channel_mult=(1, 2, 2, 2), num_res_blocks=1, attn_resolutions=(),
                        min_resolution=4, dropout=0.0, norm_groups=8, lr=1e-3),
        "mnist_gpu": dict(),  # the CIFAR-10 GPU model, on MNIST
        "cifar10_gpu": dict(),  # iCT's CIFAR-10 width and schedule on the project's DDPM++ U-Net (the defaults)
    }

    def __init__(self, config: Config, data_shape):
        super().__init__(config, data_shape)
        cfg = config
        self.net = UNet(data_shape, cfg.base_channels, cfg.channel_mult, cfg.num_res_blocks,
                        cfg.attn_resolutions, cfg.dropout, cfg.norm_groups,
                        min_resolution=cfg.min_resolution)

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
