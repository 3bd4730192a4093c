"""FFJORD: a multiscale continuous normalizing flow, trained through an adaptive ODE solver.

Grathwohl, Chen, Bettencourt, Sutskever & Duvenaud (2019), "FFJORD: Free-form Continuous Dynamics for
Scalable Reversible Generative Models", ICLR.

A CNF block moves a point along dz/dt = f(z, t) with a free-form drift f (the paper's concatsquash
convolutions); the instantaneous change of variables gives its log-density, solved by
``trilemma.models.ode`` (adaptive dopri5, NFE measured). FFJORD's contribution is Hutchinson's trace
estimator, one vector-Jacobian product per evaluation with one Rademacher eps per image and solve, so
the trained and reported log-likelihood is an unbiased estimate of the exact one; with one uniform
dequantization the NLL is an estimated upper bound (``density="bound"``). ``nll`` takes the exact
trace on images of at most ``exact_trace_max_dims`` dims, ``dequantized_log_prob`` always (for the
importance-weighted NLL); the NLL's solver error against solves at 100 times tighter tolerances is
measured on a batch and recorded beside it (``solver_error``). The data go through the logit transform
(a = 1e-6 on MNIST, 0.05 on CIFAR-10, the paper's) into the multiscale architecture of the paper's code
(``FFJORD``'s docstring).

What the small version changes from the paper: backpropagation through the solver's steps instead of
the adjoint method (the same gradient up to the solver's accuracy; faster for a small model, more
memory); narrower drifts and fewer blocks on the CPU presets (the paper: 3 hidden layers of 64
channels, 2 blocks around each squeeze) with loose tolerances (the paper: 1e-5) and a larger learning
rate (1e-2 on MNIST against 1e-3); the end time fixed at T = 1 (the paper learns it). The GPU presets
are the paper's models with a training tolerance of 1e-4.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from trilemma.contract.family import Capabilities, GenerativeModel
from trilemma.contract.likelihood import (bits_per_dim, dequantize, discrete_nll_from_density, logit_inverse,
                                          logit_transform)
from trilemma.models.blocks import at_least, flow_scales, positive
from trilemma.models.ode import (ode_log_likelihood, ode_nll_protocol, ode_sample, reference_solver, solver_error,
                                 standard_normal_log_prob)


@dataclass
class Config:
    hidden: int = 64  # channels of each hidden layer of a drift network (paper: 64)
    depth: int = 3  # hidden layers per drift network (paper: 3)
    activation: Literal["softplus", "tanh"] = "softplus"  # between the concatsquash layers (paper: softplus)
    blocks: int = 2  # CNF blocks before and after each squeeze (paper: 2)
    scales: int = 0  # scales of the multiscale architecture; 0: from the resolution; 1: a single scale
    alpha: float = 0.05  # a of the logit transform (paper: 1e-6 on MNIST, 0.05 on CIFAR-10)
    solver: Literal["dopri5", "bosh3", "adaptive_heun"] = "dopri5"  # torchdiffeq's adaptive solvers
    rtol: float = 1e-5  # relative tolerance of the training solves (paper: 1e-5)
    atol: float = 1e-5  # absolute tolerance of the training solves (paper: 1e-5)
    test_rtol: float = 1e-5  # relative tolerance of sampling and nll() (paper: 1e-5)
    test_atol: float = 1e-5  # absolute tolerance of sampling and nll() (paper: 1e-5)
    exact_trace_max_dims: int = 16  # nll() takes the exact trace on images of at most this many dims
    #   (0: Hutchinson's estimate at every size)
    lr: float = 1e-3  # Adam learning rate (paper: 1e-3)

    def __post_init__(self):
        at_least(self, 1, "hidden", "depth", "blocks")
        if self.scales < 0:
            raise ValueError("'scales' must be >= 0 (0: from the resolution)")
        if not 0 < self.alpha < 0.5:
            raise ValueError("'alpha' must be in (0, 0.5)")
        positive(self, "rtol", "atol", "test_rtol", "test_atol", "lr")
        at_least(self, 0, "exact_trace_max_dims")


class ConcatSquashConv(nn.Module):
    """A 3x3 conv whose output channels time gates and shifts: conv(h) * sigmoid(W_g t + b_g) + W_b t."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.gate = nn.Linear(1, c_out)
        self.shift = nn.Linear(1, c_out, bias=False)

    def forward(self, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # (B, Cin, H, W), () -> (B, Cout, H, W)
        t = t.reshape(1, 1).to(h.dtype)
        gate = torch.sigmoid(self.gate(t)).view(1, -1, 1, 1)
        return self.conv(h) * gate + self.shift(t).view(1, -1, 1, 1)


class Drift(nn.Module):
    """f(z, t) of one CNF block: concatsquash convs, C -> hidden (x depth) -> C, activations between."""

    def __init__(self, channels: int, cfg: Config):
        super().__init__()
        widths = [channels] + [cfg.hidden] * cfg.depth + [channels]
        self.layers = nn.ModuleList(ConcatSquashConv(a, b) for a, b in zip(widths, widths[1:]))
        self.act = nn.Softplus() if cfg.activation == "softplus" else nn.Tanh()

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:  # the ode module's (t, x) order
        h = z
        for i, layer in enumerate(self.layers):
            h = layer(h, t)
            if i < len(self.layers) - 1:
                h = self.act(h)
        return h


class FFJORD(GenerativeModel):
    """Per scale (the paper's "ODENVP"): ``blocks`` CNFs; a squeeze (C, H, W) -> (4C, H/2, W/2);
    ``blocks`` CNFs; half the channels factored out to the N(0, I) prior; the last scale has CNFs only.
    Scales follow the resolution, one more while the side halves cleanly and stays >= 4 (28 -> 28, 14,
    7; 32 -> 4 scales, the paper's CIFAR-10 model). Sampling runs N(0, I) draws back through them."""

    name = "ffjord"
    paper = ("Grathwohl, Chen, Bettencourt, Sutskever & Duvenaud (2019), FFJORD: Free-form Continuous "
             "Dynamics for Scalable Reversible Generative Models, ICLR")
    family = "Flow"
    literature = "FFJORD"
    capabilities = Capabilities(density="bound", free_form_jacobian=True, sampling="iterative")
    Config = Config
    presets = {
        "tiny": dict(hidden=8, depth=1, blocks=1, scales=2, rtol=1e-2, atol=1e-2, test_rtol=1e-2,
                     test_atol=1e-2),
        # One CNF per stage (5 over MNIST's 3 scales), loose training tolerances, a large learning rate.
        "mnist": dict(hidden=16, depth=2, blocks=1, alpha=1e-6, rtol=0.1, atol=0.1, test_rtol=1e-3,
                      test_atol=1e-3, lr=1e-2),
        "cifar10": dict(hidden=16, depth=2, blocks=1, rtol=0.1, atol=0.1, test_rtol=1e-3, test_atol=1e-3,
                        lr=5e-3),
        # The paper's models (64 channels, 3 hidden layers, 2 CNFs per stage, rtol = atol = 1e-5), with
        # a looser training tolerance for a budget of hours, not days.
        "mnist_gpu": dict(alpha=1e-6, rtol=1e-4, atol=1e-4),
        "cifar10_gpu": dict(rtol=1e-4, atol=1e-4),
    }

    def __init__(self, config: Config, data_shape):
        super().__init__(config, data_shape)
        c, h, w = self.data_shape
        self.num_scales = flow_scales("ffjord", config.scales, h, w)
        # Per scale: the CNFs before the squeeze and those after it (none at the last scale).
        self.stages = nn.ModuleList()
        self.latent_shapes: list[tuple[int, int, int]] = []  # what each scale factors out, then the top
        for scale in range(self.num_scales):
            last = scale == self.num_scales - 1
            pre = nn.ModuleList(Drift(c, config) for _ in range(config.blocks))
            post = nn.ModuleList(Drift(4 * c, config) for _ in range(0 if last else config.blocks))
            self.stages.append(nn.ModuleList([pre, post]))
            if not last:
                c, h, w = 2 * c, h // 2, w // 2  # squeeze to 4C, factor out 2C
                self.latent_shapes.append((c, h, w))
        self.latent_shapes.append((c, h, w))
        # NFE of the latest solves, summed over the blocks (kept on the host: the solver counts there).
        self.last_nfe = {"density": sum(len(pre) + len(post) for pre, post in self.stages), "sample": 0}

    def tolerances(self) -> dict:
        cfg = self.config
        rtol, atol = (cfg.rtol, cfg.atol) if self.training else (cfg.test_rtol, cfg.test_atol)
        return {"method": cfg.solver, "rtol": rtol, "atol": atol}

    # --- the flow y <-> latents -----------------------------------------------------------------
    def encode(self, y: torch.Tensor, trace: Literal["exact", "hutchinson"] = "hutchinson",
               reference: bool = False):
        """Dequantized y (B, C, H, W) -> latents (one per scale, as ``latent_shapes``), log |det| (B,)
        (its trace part estimated unless ``trace="exact"``) and the NFE of the solves; ``reference``:
        with the tight solves the NLL's solver error is measured against."""
        h, logdet = logit_transform(y, self.config.alpha)
        solver = reference_solver(self.tolerances()) if reference else self.tolerances()
        no_prior = lambda z: torch.zeros(z.shape[0], device=z.device, dtype=z.dtype)  # noqa: E731
        latents, nfe = [], 0
        for scale, (pre, post) in enumerate(self.stages):
            if scale:  # factor out half of what the previous scale's post-squeeze CNFs produced
                z, h = h.chunk(2, 1)
                latents.append(z)
            for blocks in (pre, post):
                for drift in blocks:
                    # log p(h) = log p(h(1)) + int_0^1 tr(df/dh) dt: the integral is this block's log-det.
                    integral, h, n = ode_log_likelihood(drift, h, 0.0, 1.0, no_prior, trace,
                                                        create_graph=self.training, **solver)
                    logdet, nfe = logdet + integral, nfe + n
                if blocks is pre and len(post):
                    h = F.pixel_unshuffle(h, 2)  # squeeze: (B, 4C, H/2, W/2)
        latents.append(h)
        return latents, logdet, nfe

    def decode(self, latents: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
        """Latents as ``encode`` returns them -> y (B, C, H, W), ~[0, 1), and the NFE of the solves."""
        solver, nfe = self.tolerances(), 0
        h = latents[-1]
        for scale in reversed(range(self.num_scales)):
            pre, post = self.stages[scale]
            for blocks in (post, pre):
                for drift in reversed(blocks):
                    h, n = ode_sample(drift, h, 1.0, 0.0, **solver)
                    nfe += n
                if blocks is post and len(post):
                    h = F.pixel_shuffle(h, 2)  # unsqueeze
            if scale:
                h = torch.cat([latents[scale - 1], h], 1)
        return (logit_inverse(h, self.config.alpha) + 1) / 2, nfe

    def log_prob(self, y: torch.Tensor, trace: Literal["exact", "hutchinson"] = "hutchinson",
                 reference: bool = False):
        """log p(y) (B,) of the dequantized image, and the NFE."""
        latents, logdet, nfe = self.encode(y, trace, reference)
        return sum(standard_normal_log_prob(z) for z in latents) + logdet, nfe

    # --- the contract ---------------------------------------------------------------------------
    def configure_optimizers(self):
        return {"model": torch.optim.Adam(self.parameters(), lr=self.config.lr)}

    def loss(self, x):  # bits/dim of the estimate, logged as "loss", and the density solve's NFE
        log_p, nfe = self.log_prob(dequantize(x))  # Hutchinson's trace, one eps per image and block
        self.last_nfe["density"] = nfe
        return {"model": bits_per_dim(discrete_nll_from_density(log_p, self.num_dims).mean(), self.num_dims),
                "nfe": torch.tensor(float(nfe))}

    def nll_trace(self) -> str:
        return "exact" if self.num_dims <= self.config.exact_trace_max_dims else "hutchinson"

    def nll(self, x):
        return self.nll_with(x)

    def nll_with(self, x: torch.Tensor, reference: bool = False) -> torch.Tensor:
        """``nll(x)``, or with the reference solves."""
        # An estimate of the dequantized bound -log P(x) <= E_u[-log p(y)] + D log 256: one u per image,
        # and (Hutchinson) one eps per image and block.
        log_p, self.last_nfe["density"] = self.log_prob(dequantize(x), self.nll_trace(), reference)
        return discrete_nll_from_density(log_p, self.num_dims).detach()

    def solver_error(self, x):
        nfe = dict(self.last_nfe)  # samplers() reports the figure's solves, not the reference's
        error = solver_error(self.nll_with, x, self.num_dims, reference_solver(self.tolerances()))
        self.last_nfe = nfe
        return error

    def dequantized_log_prob(self, y):  # the exact trace: the importance weights need exact densities
        log_p, self.last_nfe["density"] = self.log_prob(y, "exact")
        return log_p.detach()

    def nll_protocol(self):
        cfg = self.config
        return ode_nll_protocol(self.nll_trace(), cfg.solver, rtol=cfg.test_rtol, atol=cfg.test_atol,
                                logit_alpha=cfg.alpha)

    def samplers(self):
        # Measured: the latest generate's drift evaluations summed over its blocks (a batch shares the
        # adaptive steps, so also per image); before any, the latest density solve's (the same ODEs).
        return {"ode": max(1, int(self.last_nfe["sample"] or self.last_nfe["density"]))}

    def generate(self, n, sampler):
        latents = [torch.randn(n, *shape, device=self.device) for shape in self.latent_shapes]
        y, self.last_nfe["sample"] = self.decode(latents)
        # y lies in the bin of level floor(256 y); that level's value on the [-1, 1] scale:
        return ((256 * y - 0.5) / 127.5 - 1).clamp(-1, 1)
