"""EDM: a preconditioned denoiser with log-normal noise levels and a second-order (Heun) sampler.

Karras, Aittala, Aila & Laine (2022), "Elucidating the Design Space of Diffusion-Based Generative
Models", NeurIPS.

The diffusion is x = y + n, n ~ N(0, sigma^2 I), at continuous noise levels sigma. The denoiser
D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) wraps a network F in the paper's preconditioning
(Table 1), so that F's input and target have unit variance at every sigma; training draws ln sigma ~
N(P_mean, P_std^2) and minimises lambda(sigma) ||D - y||^2 with lambda = 1 / c_out^2, the plain MSE in
F's units (eq. 8). Sampling solves the probability-flow ODE on the rho = 7 schedule (eq. 5): ``heun``
is Algorithm 1 (2N - 1 NFE; the paper's 18 steps are its 35 NFE), ``stochastic`` Algorithm 2 (noise
churned in while S_tmin <= sigma <= S_tmax; the same NFE). No density is reported.

Network: the DDPM++ U-Net of ``trilemma.models.unet`` (the paper's VP configuration, positional
embedding of c_noise). What the small version changes from the paper (CIFAR-10 VP: 128 channels,
multipliers (2, 2, 2), 4 blocks, attention at 16x16, dropout 0.13, Adam 1e-3, batch 512, 200M images):
the CPU presets take the small U-Net of ``CPU_UNETS`` (16 channels, one block per level, attention only
in the middle block, no dropout), Adam 2e-3 and 10 sampler steps (19 NFE); ``cifar10_gpu`` (and
``mnist_gpu`` on MNIST) is the paper's network and sampler (the Config defaults, stochastic sampler at
its VP settings, Table 5). Neither uses the paper's augmentation; the harness's EMA is the suite's.
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
    base_channels: int = 128  # U-Net channels at full resolution (paper, CIFAR-10: 128)
    channel_mult: tuple = (2, 2, 2)  # U-Net width multiplier per level (paper: 2, 2, 2)
    num_res_blocks: int = 4  # U-Net residual blocks per level (paper: 4)
    attn_resolutions: tuple = (16,)  # U-Net levels with self-attention (the middle block always has it)
    min_resolution: int = 8  # the U-Net halves the image while it stays >= this (paper: 32/16/8)
    dropout: float = 0.13  # dropout in the residual blocks (paper, CIFAR-10: 0.13)
    norm_groups: int = 32  # GroupNorm groups (fewer when a layer has fewer channels)
    sigma_data: float = 0.5  # std of the data on [-1, 1] assumed by the preconditioning (paper: 0.5)
    p_mean: float = -1.2  # mean of ln sigma in training (paper: -1.2)
    p_std: float = 1.2  # std of ln sigma in training (paper: 1.2)
    sigma_min: float = 0.002  # smallest noise level of the sampler's schedule (paper: 0.002)
    sigma_max: float = 80.0  # largest (paper: 80)
    rho: float = 7.0  # curvature of the schedule (paper: 7)
    steps: int = 18  # N, sampler steps: 2N - 1 network evaluations (paper, CIFAR-10: 18, 35 NFE)
    s_churn: float = 30.0  # stochastic sampler: total churn (paper, VP, Table 5: 30)
    s_tmin: float = 0.01  # stochastic sampler: churn only at sigma >= s_tmin (paper, VP: 0.01)
    s_tmax: float = 1.0  # ... and sigma <= s_tmax (paper, VP: 1)
    s_noise: float = 1.007  # stochastic sampler: std inflation of the added noise (paper, VP: 1.007)
    lr: float = 1e-3  # Adam learning rate (paper, CIFAR-10: 1e-3)
    grad_clip: float = 1.0  # gradient-norm clipping (not in the paper: a safety net at the CPU rates)

    def __post_init__(self):
        positive(self, "sigma_data", "p_std", "sigma_min", "rho", "lr", "grad_clip", "s_noise")
        if not self.sigma_max > self.sigma_min:
            raise ValueError("'sigma_max' must be > 'sigma_min'")
        if self.steps < 2:
            raise ValueError("'steps' must be >= 2")
        if self.s_churn < 0 or self.s_tmin > self.s_tmax:
            raise ValueError("'s_churn' must be >= 0 and 's_tmin' <= 's_tmax'")
        check_unet_config(self)
        if not self.s_tmin >= 0:
            raise ValueError("'s_tmin' must be >= 0")


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """The paper's schedule (eq. 5): n levels from sigma_max down to sigma_min, then a final 0: (n + 1,)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    inv = sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    return torch.cat([inv ** rho, torch.zeros(1, dtype=torch.float64)])


class EDM(GenerativeModel):
    name = "edm"
    title = "EDM"
    paper = ("Karras, Aittala, Aila & Laine (2022), Elucidating the Design Space of Diffusion-Based "
             "Generative Models, NeurIPS")
    family = "EBM"  # the review files diffusion models under energy-based models
    literature = None
    reported = {"fid": 1.97, "nfe": 35, "source": "Karras et al. 2022, Table 2 (CIFAR-10 unconditional, VP, "
                                                 "deterministic Heun, 18 steps)"}
    capabilities = Capabilities(density="none", free_form_jacobian=True, sampling="iterative")
    Config = Config
    presets = {
        "tiny": dict(CPU_UNETS["tiny"], min_resolution=4, steps=3, lr=1e-3),
        "mnist": dict(CPU_UNETS["mnist"], min_resolution=4, steps=10, lr=2e-3),
        "cifar10": dict(CPU_UNETS["cifar10"], min_resolution=4, steps=10, lr=2e-3),
        "mnist_gpu": dict(),  # the CIFAR-10 GPU model, on MNIST
        "cifar10_gpu": dict(),  # the paper's CIFAR-10 VP network and sampler (the defaults)
    }

    def __init__(self, config: Config, data_shape):
        super().__init__(config, data_shape)
        self.net = UNet.from_config(config, data_shape)

    # --- the preconditioning ----------------------------------------------------------------------
    def preconditioning(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """c_skip, c_out, c_in, c_noise at noise levels sigma (B,): each (B, 1, 1, 1) but c_noise (B,)."""
        sd = self.config.sigma_data
        s = sigma[:, None, None, None]
        c_skip = sd ** 2 / (s ** 2 + sd ** 2)
        c_out = s * sd / (s ** 2 + sd ** 2).sqrt()
        c_in = 1 / (s ** 2 + sd ** 2).sqrt()
        return c_skip, c_out, c_in, sigma.log() / 4

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """D(x; sigma), one network evaluation: x (B, C, H, W), sigma () or (B,) -> (B, C, H, W)."""
        sigma = sigma.to(x.dtype).expand(x.shape[0]) if sigma.ndim == 0 else sigma.to(x.dtype)
        c_skip, c_out, c_in, c_noise = self.preconditioning(sigma)
        return c_skip * x + c_out * self.net(c_in * x, c_noise)

    def network_io(self, y: torch.Tensor, n: torch.Tensor,
                   sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """F's input c_in (y + n) and its effective training target (y - c_skip (y + n)) / c_out (eq. 8)."""
        c_skip, c_out, c_in, _ = self.preconditioning(sigma)
        x = y + n
        return c_in * x, (y - c_skip * x) / c_out

    # --- training -----------------------------------------------------------------------------------
    def configure_optimizers(self):
        return {"model": torch.optim.Adam(self.parameters(), lr=self.config.lr)}

    def denoising_loss(self, y: torch.Tensor) -> torch.Tensor:
        """lambda(sigma) ||D(y + n; sigma) - y||^2 at ln sigma ~ N(P_mean, P_std^2), written in F's units:
        lambda = 1 / c_out^2 makes it the MSE of F against its effective target. y (B, C, H, W) in [-1, 1]."""
        sigma = (torch.randn(y.shape[0], device=y.device) * self.config.p_std + self.config.p_mean).exp()
        n = torch.randn_like(y) * sigma[:, None, None, None]
        net_in, target = self.network_io(y, n, sigma)
        return (self.net(net_in, sigma.log() / 4) - target).pow(2).mean()

    def loss(self, x):
        return {"model": self.denoising_loss(to_signed(x))}

    # --- sampling -----------------------------------------------------------------------------------
    def samplers(self):
        nfe = 2 * self.config.steps - 1  # Heun at every step but the last (to sigma = 0), Euler there
        return {"heun": nfe, "stochastic": nfe}

    def sampling_modules(self):
        return [self.net]

    def generate(self, n, sampler):
        cfg = self.config
        sigmas = karras_sigmas(cfg.steps, cfg.sigma_min, cfg.sigma_max, cfg.rho).tolist()  # N + 1, ends at 0
        x = torch.randn(n, *self.data_shape, device=self.device) * sigmas[0]  # x_0 ~ N(0, sigma_max^2 I)
        for i, (s_cur, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
            # Algorithm 2: raise the noise level to s_hat = (1 + gamma) s_cur with fresh noise.
            gamma = 0.0
            if sampler == "stochastic" and cfg.s_tmin <= s_cur <= cfg.s_tmax:
                gamma = min(cfg.s_churn / cfg.steps, math.sqrt(2) - 1)
            s_hat = s_cur * (1 + gamma)
            if gamma > 0:
                x = x + math.sqrt(s_hat ** 2 - s_cur ** 2) * cfg.s_noise * torch.randn_like(x)
            # Euler step of dx/dsigma = (x - D(x; sigma)) / sigma, then Heun's correction unless sigma = 0.
            d = (x - self.denoise(x, torch.tensor(s_hat, device=x.device))) / s_hat
            x_next = x + (s_next - s_hat) * d
            if s_next > 0:
                d_next = (x_next - self.denoise(x_next, torch.tensor(s_next, device=x.device))) / s_next
                x_next = x + (s_next - s_hat) * (d + d_next) / 2
            x = x_next
        return x.clamp(-1, 1)
