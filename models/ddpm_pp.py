"""DDPM++ (continuous): a score model of the variance-preserving SDE, sampled by reverse-time SDE or ODE.

Song, Sohl-Dickstein, Kingma, Kumar, Ermon & Poole (2021), "Score-Based Generative Modeling through
Stochastic Differential Equations", ICLR (the "DDPM++ cont. (VP)" rows of its tables).

The forward process is the VP SDE dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw, t in [0, 1] (eq. 11), whose
marginal is Gaussian in closed form (``marginal``); a DDPM++ U-Net (``trilemma.models.unet``, fed 999 t)
predicts the noise, trained by denoising score matching with lambda(t) = s(t)^2. Samplers:
``euler_maruyama`` (the reverse SDE, eq. 6), ``predictor_corrector`` (plus one Langevin corrector step
at r = 0.16, Alg. 1 and 5) and ``probability_flow`` (the ODE of eq. 13, adaptive solver, NFE measured).
The NLL (app. D.2) integrates the probability-flow ODE as a continuous flow (``trilemma.models.ode``,
Hutchinson's trace, or the exact one on images of at most ``exact_trace_max_dims`` dims) on the
uniformly dequantized image: an unbiased estimate of an upper bound (``density="bound"``);
``dequantized_log_prob`` takes the exact divergence for the importance-weighted NLL.

What the small version changes from the paper: a far smaller U-Net on the CPU presets (8 base
channels, multipliers 1, 2, 4, one block per level, attention only in the middle block; the paper: 128,
1, 2, 2, 2, 4 blocks, attention at 16x16), no dropout, a larger learning rate and a 20-step warm-up;
N = 30 sampler steps (paper: 1000), and RK45 at 1e-3 (sampling and the NLL) where the paper uses
1e-5; the NLL's solver error against 1e-5, measured on a batch, is recorded with the figure
(``solver_error``). The corrector's alpha_i is exp(-beta(t) dt) (1 - beta(t) dt to first
order, positive at small N); the reverse samplers' last step is noise-free. ``cifar10_gpu`` is the
paper's CIFAR-10 network (the Config defaults, 62.5M parameters at 32x32), ``mnist_gpu`` it at half
width (64 channels, 2 blocks per level).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from trilemma.contract.family import Capabilities, GenerativeModel
from trilemma.contract.likelihood import dequantize, discrete_nll_from_density, to_signed
from trilemma.models.blocks import at_least, positive
from trilemma.models.ode import (ode_log_likelihood, ode_nll_protocol, ode_sample, reference_solver,
                                 signed_log_prob, solver_error, standard_normal_log_prob)
from trilemma.models.unet import UNet, check_unet_config


@dataclass
class Config:
    base_channels: int = 128  # U-Net channels at full resolution (paper: 128)
    channel_mult: tuple = (1, 2, 2, 2)  # width multiplier per level; the last repeats (paper: 1, 2, 2, 2)
    num_res_blocks: int = 4  # residual blocks per level (paper: 4)
    attn_resolutions: tuple = (16,)  # resolutions with self-attention, besides the middle block (paper: 16)
    dropout: float = 0.1  # dropout in the residual blocks (paper: 0.1 on CIFAR-10)
    norm_groups: int = 32  # GroupNorm groups (fewer when a layer has fewer channels)
    beta_min: float = 0.1  # beta(0) of the VP SDE (paper: 0.1)
    beta_max: float = 20.0  # beta(1) of the VP SDE (paper: 20)
    train_eps: float = 1e-5  # smallest t of training and of the likelihood (paper: 1e-5)
    sample_eps: float = 1e-3  # the reverse samplers stop at this t (paper: 1e-3)
    sde_steps: int = 1000  # N, steps of the Euler-Maruyama and predictor-corrector samplers (paper: 1000)
    snr: float = 0.16  # r, the Langevin corrector's signal-to-noise ratio (paper: 0.16 for the VP SDE)
    solver: Literal["dopri5", "bosh3"] = "dopri5"  # adaptive ODE solver of sampling and the NLL (paper: RK45)
    ode_rtol: float = 1e-5  # relative tolerance of the probability-flow sampler (paper: 1e-5)
    ode_atol: float = 1e-5  # absolute tolerance of the probability-flow sampler (paper: 1e-5)
    min_step: float = 1e-4  # the probability-flow sampler accepts any step this short (a barely trained
    #   score is stiff near t = 0, and the solver would otherwise shrink its step to nothing and fail)
    nll_min_step: float = 1e-6  # the same for the likelihood solve, which starts at train_eps: the
    #   divergence grows as t^-1/2 there, and a step longer than train_eps misses it (1e-4: +0.02 bits/dim)
    nll_rtol: float = 1e-5  # relative tolerance of the likelihood solve (paper: 1e-5)
    nll_atol: float = 1e-5  # absolute tolerance of the likelihood solve (paper: 1e-5)
    exact_trace_max_dims: int = 16  # nll() takes the exact divergence on images of at most this many dims
    #   (0: Hutchinson's estimate at every size)
    lr: float = 2e-4  # Adam learning rate (paper: 2e-4)
    warmup: int = 5000  # steps of linear learning-rate warm-up (paper: 5000)
    grad_clip: float = 1.0  # gradient-norm clipping (paper: 1.0)

    def __post_init__(self):
        at_least(self, 1, "base_channels", "num_res_blocks", "norm_groups", "sde_steps")
        if not 0 < self.beta_min < self.beta_max:
            raise ValueError("'beta_min' must be > 0 and below 'beta_max'")
        if not 0 < self.train_eps < 1 or not 0 < self.sample_eps < 1:
            raise ValueError("'train_eps' and 'sample_eps' must be in (0, 1)")
        positive(self, "snr", "min_step", "nll_min_step", "ode_rtol", "ode_atol", "nll_rtol", "nll_atol", "lr",
                 "grad_clip")
        if not 0 <= self.dropout < 1:
            raise ValueError("'dropout' must be in [0, 1)")
        at_least(self, 0, "warmup", "exact_trace_max_dims")
        check_unet_config(self)


class DDPMpp(GenerativeModel):
    name = "ddpm_pp"
    title = "DDPM++ Continuous"
    paper = ("Song, Sohl-Dickstein, Kingma, Kumar, Ermon & Poole (2021), Score-Based Generative Modeling "
             "through Stochastic Differential Equations, ICLR")
    family = "EBM"  # the review files diffusion models under energy-based models
    literature = "DDPM++ Continuous"
    capabilities = Capabilities(density="bound", free_form_jacobian=True, sampling="iterative")
    Config = Config
    _small = dict(base_channels=8, channel_mult=(1, 2, 4), num_res_blocks=1, attn_resolutions=(), dropout=0.0,
                  norm_groups=4, sde_steps=30, lr=2e-3, warmup=20, ode_rtol=1e-3, ode_atol=1e-3)
    presets = {
        "tiny": dict(_small, channel_mult=(1, 2), sde_steps=4, ode_rtol=1e-2, ode_atol=1e-2, nll_rtol=1e-2,
                     nll_atol=1e-2, warmup=0),
        # The NLL at 1e-3: 0.001 bits/dim from 1e-5 after 100 MNIST steps (1e-2: 0.01), a thirtieth of its
        # standard error in the 15 s the suite gives it.
        "mnist": dict(_small, nll_rtol=1e-3, nll_atol=1e-3),
        "cifar10": dict(_small, channel_mult=(1, 2, 4, 4), nll_rtol=1e-3, nll_atol=1e-3),
        "mnist_gpu": dict(base_channels=64, num_res_blocks=2),
        "cifar10_gpu": dict(),  # the paper's CIFAR-10 network (the defaults)
    }

    def __init__(self, config: Config, data_shape):
        super().__init__(config, data_shape)
        self.net = UNet.from_config(config, self.data_shape, embedding="positional")
        self.last_nfe = {"probability_flow": 0, "nll": 0}

    # --- the VP SDE ---------------------------------------------------------------------------
    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return self.config.beta_min + t * (self.config.beta_max - self.config.beta_min)

    def marginal(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """m(t) and s(t) of q(x_t | x_0) = N(m(t) x_0, s(t)^2 I), each shaped like t."""
        cfg = self.config
        log_m = -0.25 * t ** 2 * (cfg.beta_max - cfg.beta_min) - 0.5 * t * cfg.beta_min
        return log_m.exp(), (-torch.expm1(2 * log_m)).sqrt()

    def eps_model(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's noise prediction at (B, C, H, W), (B,); score = -eps / s(t)."""
        return self.net(x, 999 * t)  # DDPM++ embeds the VP SDE's time on DDPM's 0..999 scale

    def score(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        _, s = self.marginal(t)
        return -self.eps_model(x, t) / s[:, None, None, None]

    def ode_drift(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The probability-flow drift f - 1/2 g^2 score at a scalar t, in models.ode's (t, x) order."""
        tt = t.reshape(1).expand(x.shape[0]).to(x.dtype)  # (B,)
        beta = self.beta(tt)[:, None, None, None]
        return -0.5 * beta * (x + self.score(x, tt))

    # --- training ----------------------------------------------------------------------------
    def configure_optimizers(self):
        return {"model": torch.optim.Adam(self.parameters(), lr=self.config.lr)}

    def lr_factor(self, role, step):
        return min(1.0, (step + 1) / max(1, self.config.warmup))  # linear warm-up, as the paper

    def loss(self, x):
        cfg = self.config
        x0 = to_signed(x)  # (B, C, H, W) in [-1, 1]
        t = torch.rand(x0.shape[0], device=x0.device) * (1 - cfg.train_eps) + cfg.train_eps  # (B,)
        m, s = (v[:, None, None, None] for v in self.marginal(t))
        z = torch.randn_like(x0)
        # Denoising score matching with lambda(t) = s(t)^2: ||s score + z||^2 = ||z - eps(x_t, t)||^2.
        eps = self.eps_model(m * x0 + s * z, t)
        return {"model": (eps - z).pow(2).flatten(1).sum(1).mean() / self.num_dims}

    # --- sampling ----------------------------------------------------------------------------
    def samplers(self):
        n = self.config.sde_steps
        # probability_flow: the latest solve's measured NFE (before any, an estimate of N / 5).
        ode_nfe = self.last_nfe["probability_flow"] or max(1, n // 5)
        return {"euler_maruyama": n, "predictor_corrector": 2 * n, "probability_flow": int(ode_nfe)}

    def generate(self, n, sampler):
        cfg = self.config
        x = torch.randn(n, *self.data_shape, device=self.device)  # x(1) ~ N(0, I), the prior
        if sampler == "probability_flow":
            drift = lambda t, x: self.ode_drift(t, x)  # noqa: E731
            x, self.last_nfe["probability_flow"] = ode_sample(drift, x, 1.0, cfg.sample_eps, cfg.solver,
                                                              cfg.ode_rtol, cfg.ode_atol, {"min_step": cfg.min_step})
            return torch.nan_to_num(x).clamp(-1, 1)
        times = torch.linspace(1.0, cfg.sample_eps, cfg.sde_steps, device=self.device)
        dt = (1.0 - cfg.sample_eps) / cfg.sde_steps  # the step's length (time runs backwards)
        for i, t_now in enumerate(times):
            t = t_now.expand(n)  # (n,)
            if sampler == "predictor_corrector":
                # Corrector (Alg. 5): one Langevin step at a step size set by the signal-to-noise ratio r.
                grad, noise = self.score(x, t), torch.randn_like(x)
                grad_norm = grad.flatten(1).norm(dim=1).mean()
                ratio = noise.flatten(1).norm(dim=1).mean() / grad_norm.clamp_min(1e-30)
                # The discrete chain's alpha_i = 1 - beta_i / N (app. G), as exp(-beta dt): the same to
                # first order, and positive at any N.
                alpha = torch.exp(-self.beta(t_now) * dt)
                # (A zero score, as of the zero-initialised network, makes no move rather than 0 * inf.)
                step = torch.where(grad_norm > 0, 2 * alpha * (cfg.snr * ratio) ** 2, 0.0)
                x = x + step * grad + (2 * step).sqrt() * noise
            # Predictor: an Euler-Maruyama step of the reverse SDE; the last step adds no noise.
            beta = self.beta(t_now)
            mean = x + (0.5 * beta * x + beta * self.score(x, t)) * dt
            x = mean + (beta * dt).sqrt() * torch.randn_like(x) if i < cfg.sde_steps - 1 else mean
        return x.clamp(-1, 1)

    # --- likelihood --------------------------------------------------------------------------
    def nll_trace(self) -> str:
        return "exact" if self.num_dims <= self.config.exact_trace_max_dims else "hutchinson"

    def nll_solver(self, reference: bool = False) -> dict:
        """The NLL's solve as ``odeint`` arguments; ``reference``: the tight one its error is measured against."""
        cfg = self.config
        solver = {"method": cfg.solver, "rtol": cfg.nll_rtol, "atol": cfg.nll_atol,
                  "options": {"min_step": cfg.nll_min_step}}
        return reference_solver(solver) if reference else solver

    def continuous_log_prob(self, z: torch.Tensor, trace: Literal["exact", "hutchinson"] | None = None,
                            reference: bool = False):
        """log p_eps(z) (B,) of continuous z on the [-1, 1] scale, through the probability-flow ODE
        (the trace: ``nll_trace()`` unless given)."""
        cfg = self.config
        log_p, _, self.last_nfe["nll"] = ode_log_likelihood(
            self.ode_drift, z, cfg.train_eps, 1.0, standard_normal_log_prob, trace or self.nll_trace(),
            **self.nll_solver(reference))
        return log_p

    def nll(self, x):
        return self.nll_with(x)

    def nll_with(self, x: torch.Tensor, reference: bool = False) -> torch.Tensor:
        """``nll(x)``, or with the reference solve."""
        log_prob = lambda z: self.continuous_log_prob(z, reference=reference)  # noqa: E731
        return discrete_nll_from_density(signed_log_prob(log_prob, dequantize(x)), self.num_dims)

    def solver_error(self, x):
        return solver_error(self.nll_with, x, self.num_dims, self.nll_solver(reference=True))

    def dequantized_log_prob(self, y):  # the exact divergence: the importance weights need exact densities
        return signed_log_prob(lambda z: self.continuous_log_prob(z, "exact"), y)

    def nll_protocol(self):
        cfg = self.config
        return ode_nll_protocol(self.nll_trace(), cfg.solver, rtol=cfg.nll_rtol, atol=cfg.nll_atol,
                                min_step=cfg.nll_min_step, t_min=cfg.train_eps)
