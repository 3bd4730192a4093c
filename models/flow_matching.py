"""Flow matching: a continuous normalizing flow trained by regressing a conditional velocity field.

Lipman, Chen, Ben-Hamu, Nickel & Le (2023), "Flow Matching for Generative Modeling", ICLR;
Liu, Gong & Liu (2023), "Flow Straight and Fast: Learning to Generate and Transfer Data with Rectified
Flow", ICLR; Tong, Fatras, Malkin, Huguet, Zhang, Rector-Brooks, Wolf & Bengio (2024), "Improving and
Generalizing Flow-Based Generative Models with Minibatch Optimal Transport", TMLR (OT-CFM).

A velocity network v(x, t) defines dx/dt = v from noise (t = 0) to data (t = 1). It is trained without a
solver: the conditional flow-matching loss regresses v onto the velocity of the straight path between
a noise draw and an image (Lipman et al. eq. 20-23; sigma_min = 0 is rectified flow), the pairs coupled
independently or, as OT-CFM, by a minibatch optimal-transport plan (an exact assignment, or Sinkhorn's
entropic plan), which straightens the paths. Samplers: ``euler`` (``euler_steps`` NFE) and ``adaptive``
(dopri5, NFE measured). The NLL is the flow's exact density through ``trilemma.models.ode`` with
Hutchinson's trace on the uniformly dequantized image: an estimated upper bound (``density="bound"``);
``dequantized_log_prob`` takes the exact trace for the importance-weighted NLL.

Network: the DDPM++ U-Net of ``trilemma.models.unet`` (the papers use the ADM/DDPM U-Net), t embedded on a
0..1000 scale. What the small version changes from the papers (CIFAR-10: 128 channels, 2 blocks,
attention at 16x16, Adam 2e-4 or 5e-4, batch 128, 400k steps, dopri5 at 1e-5): the CPU presets take the
small U-Net of ``CPU_UNETS`` with Adam 2e-3, Euler in 10 steps, dopri5 at 1e-3 for the `adaptive`
sampler and at 1e-2 for the NLL (its solver error against dopri5 at 1e-4, measured on a batch, is
recorded with the figure: ``solver_error``); ``cifar10_gpu`` is the papers' model with
dopri5 at 1e-5 at 120 base channels (34.8M parameters against Tong et al.'s 35.7M: this U-Net's BigGAN
resampling blocks give 39.6M at 128); ``mnist_gpu`` is it at 128 channels on MNIST.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from trilemma.contract.family import Capabilities, GenerativeModel
from trilemma.contract.likelihood import dequantize, discrete_nll_from_density, to_signed
from trilemma.models.blocks import at_least, positive
from trilemma.models.ode import (ode_log_likelihood, ode_nll_protocol, ode_sample, reference_solver,
                                 signed_log_prob, solver_error, standard_normal_log_prob)
from trilemma.models.unet import CPU_UNETS, UNet, check_unet_config


@dataclass
class Config:
    base_channels: int = 128  # U-Net channels at full resolution (papers, CIFAR-10: 128)
    channel_mult: tuple = (1, 2, 2, 2)  # U-Net width multiplier per level (last entry repeats)
    num_res_blocks: int = 2  # U-Net residual blocks per level (papers: 2)
    attn_resolutions: tuple = (16,)  # U-Net levels with self-attention (the middle block always has it)
    dropout: float = 0.1  # dropout in the residual blocks (papers: 0.1)
    norm_groups: int = 32  # GroupNorm groups (fewer when a layer has fewer channels)
    sigma_min: float = 0.0  # std of the path's end at t = 1 (Lipman: small; 0: rectified flow / OT-CFM)
    coupling: Literal["exact_ot", "sinkhorn", "independent"] = "exact_ot"  # noise-data pairing in a batch
    sinkhorn_blur: float = 1.0  # geomloss blur for coupling="sinkhorn" (eps = blur^2, cost |x - y|^2 / 2)
    euler_steps: int = 20  # steps of the `euler` sampler (NFE)
    rtol: float = 1e-5  # relative tolerance of the `adaptive` (dopri5) sampler (papers: 1e-5)
    atol: float = 1e-5  # absolute tolerance of the `adaptive` sampler
    nll_solver: Literal["dopri5", "midpoint", "rk4"] = "dopri5"  # ODE solver of nll() (a fixed-step one's
    #   error is measured against dopri5 at nll_rtol / 100)
    nll_steps: int = 8  # steps of a fixed-step nll_solver (unused by dopri5)
    nll_rtol: float = 1e-5  # tolerances of a dopri5 nll_solver (and, / 100, of the solver error's reference)
    nll_atol: float = 1e-5
    lr: float = 2e-4  # Adam learning rate (Lipman: 2e-4)
    grad_clip: float = 1.0  # gradient-norm clipping (Tong et al.: 1.0)

    def __post_init__(self):
        check_unet_config(self)
        if not 0 <= self.sigma_min < 1:
            raise ValueError("'sigma_min' must be in [0, 1)")
        at_least(self, 1, "euler_steps", "nll_steps", "base_channels", "num_res_blocks")
        positive(self, "sinkhorn_blur", "rtol", "atol", "nll_rtol", "nll_atol", "lr", "grad_clip")


def exact_ot_pairing(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """The permutation j(i) minimising sum_i ||x0[j(i)] - x1[i]||^2 (an exact assignment): (B,) long."""
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(x1.flatten(1).double(), x0.flatten(1).double()) ** 2  # (B, B), rows: images
    _, cols = linear_sum_assignment(cost.cpu().numpy())
    return torch.as_tensor(cols, device=x0.device, dtype=torch.long)


def sinkhorn_pairing(x0: torch.Tensor, x1: torch.Tensor, blur: float) -> torch.Tensor:
    """A noise partner for each image, drawn from its row of the entropic OT plan (geomloss): (B,)."""
    from geomloss import SamplesLoss

    a, b = x1.flatten(1).double(), x0.flatten(1).double()  # (B, D) each
    solver = SamplesLoss("sinkhorn", p=2, blur=blur, debias=False, potentials=True, scaling=0.9,
                         backend="tensorized")
    f, g = (p.view(-1) for p in solver(a, b))  # dual potentials (B,), (B,) for the cost |a - b|^2 / 2
    cost = torch.cdist(a, b) ** 2 / 2
    # plan_ij = (1/B^2) exp((f_i + g_j - C_ij) / eps); a row's normalisation does not matter for a draw
    log_plan = (f[:, None] + g[None, :] - cost) / blur ** 2
    return torch.multinomial(log_plan.softmax(1).float(), 1).squeeze(1)


class FlowMatching(GenerativeModel):
    name = "flow_matching"
    title = "Flow matching (OT-CFM)"
    paper = ("Lipman, Chen, Ben-Hamu, Nickel & Le (2023), Flow Matching for Generative Modeling, ICLR; "
             "Liu, Gong & Liu (2023), Rectified Flow, ICLR; Tong et al. (2024), Improving and Generalizing "
             "Flow-Based Generative Models with Minibatch Optimal Transport, TMLR")
    family = "Flow"
    literature = None
    reported = {"fid": 6.35, "nll": 2.99, "nfe": 142,
                "source": "Lipman et al. 2023, Table 1 (FM w/ OT, dopri5); Tong et al. 2024 report "
                          "OT-CFM at FID 3.74 (adaptive)"}
    capabilities = Capabilities(density="bound", free_form_jacobian=True, sampling="iterative")
    Config = Config
    presets = {
        "tiny": dict(CPU_UNETS["tiny"], euler_steps=3, rtol=1e-2, atol=1e-2, nll_rtol=1e-2, nll_atol=1e-2, lr=1e-3),
        # The NLL by dopri5 at 1e-2: within 0.01 bits/dim of 1e-5 after 100 MNIST steps, a fifth of
        # the standard error of the 15 s the suite gives it (a 2-step midpoint solver was 0.4 off).
        "mnist": dict(CPU_UNETS["mnist"], euler_steps=10, rtol=1e-3, atol=1e-3, nll_rtol=1e-2, nll_atol=1e-2,
                      lr=2e-3),
        "cifar10": dict(CPU_UNETS["cifar10"], euler_steps=10, rtol=1e-3, atol=1e-3, nll_rtol=1e-2, nll_atol=1e-2,
                        lr=2e-3),
        "mnist_gpu": dict(euler_steps=100),  # the papers' CIFAR-10 network, on MNIST
        # their CIFAR-10 network and solver tolerances, 120 channels for their parameter count (35.7M)
        "cifar10_gpu": dict(base_channels=120, euler_steps=100),
    }

    def __init__(self, config: Config, data_shape):
        super().__init__(config, data_shape)
        self.net = UNet.from_config(config, data_shape)
        self.last_nfe = {"adaptive": 0, "nll": 0}  # measured by the latest solves (on the host)

    # --- the probability path ---------------------------------------------------------------------
    def interpolate(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t on the straight path from noise x0 (t = 0) to data x1 (t = 1); t (B,)."""
        t = t[:, None, None, None]
        return t * x1 + (1 - (1 - self.config.sigma_min) * t) * x0

    def target_velocity(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        """u_t = d x_t / dt, the same at every t: the path is a straight line."""
        return x1 - (1 - self.config.sigma_min) * x0

    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v(x, t): (B, C, H, W), () or (B,) in [0, 1] -> (B, C, H, W)."""
        return self.net(x, 1000 * t.to(x.dtype))  # t on the DDPM scale of the sinusoidal embedding

    def pair(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        """The noise draws reordered so that x0[i] is the partner of image x1[i] under the coupling."""
        if self.config.coupling == "exact_ot":
            return x0[exact_ot_pairing(x0, x1)]
        if self.config.coupling == "sinkhorn":
            return x0[sinkhorn_pairing(x0, x1, self.config.sinkhorn_blur)]
        return x0

    # --- training -----------------------------------------------------------------------------------
    def configure_optimizers(self):
        return {"model": torch.optim.Adam(self.parameters(), lr=self.config.lr)}

    def flow_matching_loss(self, x1: torch.Tensor) -> torch.Tensor:
        """The conditional flow-matching loss on a batch of images in [-1, 1] (B, C, H, W)."""
        x0 = self.pair(torch.randn_like(x1), x1)  # (B, C, H, W) noise, paired with the images
        t = torch.rand(x1.shape[0], device=x1.device)
        return F.mse_loss(self.velocity(self.interpolate(x0, x1, t), t), self.target_velocity(x0, x1))

    def loss(self, x):
        return {"model": self.flow_matching_loss(to_signed(x))}

    # --- sampling -----------------------------------------------------------------------------------
    def samplers(self):
        # `adaptive`: measured, the latest solve's drift evaluations (a batch shares the solver's steps).
        return {"euler": self.config.euler_steps, "adaptive": max(1, self.last_nfe["adaptive"])}

    def sampling_modules(self):
        return [self.net]

    def generate(self, n, sampler):
        x = torch.randn(n, *self.data_shape, device=self.device)  # x_0 ~ N(0, I)
        if sampler == "euler":
            steps = self.config.euler_steps
            for i in range(steps):  # x_{t + h} = x_t + h v(x_t, t), t = i / steps
                x = x + self.velocity(x, torch.tensor(i / steps, device=x.device)) / steps
        else:
            cfg = self.config
            x, self.last_nfe["adaptive"] = ode_sample(lambda t, z: self.velocity(z, t), x, 0.0, 1.0,
                                                      method="dopri5", rtol=cfg.rtol, atol=cfg.atol)
        return x.clamp(-1, 1)

    # --- likelihood ---------------------------------------------------------------------------------
    def solver(self, reference: bool = False) -> dict:
        """The NLL's solve as ``odeint`` arguments; ``reference``: the tight one its error is measured against."""
        cfg = self.config
        solver = {"method": cfg.nll_solver, "rtol": cfg.nll_rtol, "atol": cfg.nll_atol}
        if cfg.nll_solver != "dopri5":
            solver["options"] = {"step_size": 1.0 / cfg.nll_steps}
        return reference_solver(solver) if reference else solver

    def log_prob(self, z: torch.Tensor, trace: Literal["exact", "hutchinson"] = "hutchinson",
                 reference: bool = False) -> torch.Tensor:
        """log p_1(z) of points z on the data side (B, C, H, W): the flow run back to the N(0, I) prior."""
        drift = lambda t, x: self.velocity(x, t)  # noqa: E731  (the ode module's (t, x) order)
        log_p, _, nfe = ode_log_likelihood(drift, z, 1.0, 0.0, standard_normal_log_prob, trace,
                                           **self.solver(reference))
        self.last_nfe["nll"] = nfe
        return log_p

    def nll(self, x):
        return self.nll_with(x)

    def nll_with(self, x: torch.Tensor, reference: bool = False) -> torch.Tensor:
        """``nll(x)``, or with the reference solve."""
        log_prob = lambda z: self.log_prob(z, reference=reference)  # noqa: E731
        return discrete_nll_from_density(signed_log_prob(log_prob, dequantize(x)), self.num_dims)

    def solver_error(self, x):
        return solver_error(self.nll_with, x, self.num_dims, self.solver(reference=True))

    def dequantized_log_prob(self, y):  # the exact trace: the importance weights need exact densities
        return signed_log_prob(lambda z: self.log_prob(z, "exact"), y)

    def nll_protocol(self):
        cfg = self.config
        steps = {} if cfg.nll_solver == "dopri5" else {"solver_steps": cfg.nll_steps}
        tol = {"rtol": cfg.nll_rtol, "atol": cfg.nll_atol} if cfg.nll_solver == "dopri5" else {}
        return ode_nll_protocol("hutchinson", cfg.nll_solver, **steps, **tol, sigma_min=cfg.sigma_min)
