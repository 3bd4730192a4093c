"""The density of a continuous-time flow, shared by every family that defines one through an ODE.

For ``dx/dt = f(x, t)`` the instantaneous change of variables (Chen et al. 2018, "Neural Ordinary
Differential Equations", NeurIPS, thm. 1) gives, along a trajectory,

    d/dt log p_t(x(t)) = -tr(df/dx)(x(t), t),   so   log p_a(x(a)) = log p_b(x(b)) + int_a^b tr(df/dx) dt

for any two times a and b (either order): integrate the data point from ``a`` to the prior's time ``b``,
score it there, and add the integrated divergence. FFJORD (Grathwohl et al. 2019), the probability-flow
ODE of score SDEs (Song et al. 2021, app. D.2) and flow matching (Lipman et al. 2023) all use it; only the
drift and the direction of time differ.

The trace is computed exactly (one vector-Jacobian product per dimension, batched ``VJP_ROWS`` at a time:
small inputs, and the importance-weighted NLL, which needs an exact log density) or by the Hutchinson
estimator ``E_eps[eps^T (df/dx) eps]`` with Rademacher ``eps`` drawn once per solve (Grathwohl et al. 2019,
sec. 3.1), which is unbiased for the trace, so the log-density is an unbiased estimate of the exact one
given the solver's accuracy (what that makes of an NLL: ``trilemma.contract.likelihood``). The ODE is
solved by ``torchdiffeq``'s adaptive solvers; the number of drift evaluations (NFE) is counted and
returned. The solver's own error is measured, not assumed: :func:`solver_error` re-scores a batch with
a reference solve (tolerances ``REFERENCE_FACTOR`` times tighter) under the same random draws, and the
NLL measurement records it beside the figure.

Densities here are of the continuous variable the flow models; turn them into the NLL of the discrete
8-bit image with :mod:`trilemma.contract.likelihood` (dequantization, the data transform's Jacobian,
``discrete_nll_from_density``); :func:`signed_log_prob` does it for a flow on the [-1, 1] scale, and
:func:`ode_nll_protocol` is the protocol every such NLL records.
"""
from __future__ import annotations

from typing import Callable, Literal

import time

import torch

from trilemma.contract.likelihood import bits_per_dim, signed_transform

Drift = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # f(t: (), x: (B, ...)) -> (B, ...)


VJP_ROWS = 512  # rows of df/dx (times images) per batched vector-Jacobian product of an exact trace
REFERENCE_FACTOR = 100  # the solver error's reference solve: tolerances this many times tighter
ADAPTIVE = ("dopri8", "dopri5", "bosh3", "fehlberg2", "adaptive_heun")  # torchdiffeq's adaptive methods


def jacobian_rows(f: torch.Tensor, x: torch.Tensor, rows: torch.Tensor,
                  create_graph: bool = False) -> torch.Tensor:
    """Rows ``rows`` (n,) of each sample's Jacobian df/dx, ``(n, B, D)``, by one batched vector-Jacobian
    product (``is_grads_batched``: the basis vectors e_i run as a vmapped batch). ``f`` must have been
    computed from ``x`` with autograd recording; the graph is kept for further rows."""
    flat = f.flatten(1)  # (B, D)
    basis = torch.zeros(len(rows), *flat.shape, device=f.device, dtype=f.dtype)  # (n, B, D)
    basis[torch.arange(len(rows), device=f.device), :, rows] = 1
    (grads,) = torch.autograd.grad(flat, x, basis, is_grads_batched=True, create_graph=create_graph,
                                   retain_graph=True)
    return grads.flatten(2)  # (n, B, D): e_i^T df/dx per sample


def divergence(f: torch.Tensor, x: torch.Tensor, eps: torch.Tensor | None,
               create_graph: bool = True) -> torch.Tensor:
    """tr(df/dx) per sample, ``(B,)``: exact when ``eps`` is None, else Hutchinson's ``eps^T J eps``.

    ``f`` must have been computed from ``x`` with autograd recording; ``create_graph`` keeps the graph
    so the result can itself be differentiated (training a CNF), and is off for an evaluation. The
    exact trace takes the diagonal of df/dx in blocks of ``VJP_ROWS / B`` rows.
    """
    if eps is not None:
        (vjp,) = torch.autograd.grad(f, x, eps, create_graph=create_graph)
        return (vjp * eps).flatten(1).sum(1)
    b, d = f.shape[0], f[0].numel()
    total = torch.zeros(b, device=f.device, dtype=f.dtype)
    step = max(1, VJP_ROWS // b)
    for start in range(0, d, step):
        rows = torch.arange(start, min(start + step, d), device=f.device)
        block = jacobian_rows(f, x, rows, create_graph)  # (n, B, D)
        total = total + block[torch.arange(len(rows), device=f.device), :, rows].sum(0)  # d f_i / d x_i
    return total


def rademacher(like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Entries +-1 with equal probability, shaped like ``like``."""
    bits = torch.randint(0, 2, like.shape, generator=generator, device="cpu" if generator else like.device)
    return (bits.to(like.device, like.dtype) * 2 - 1)


def ode_log_likelihood(drift: Drift, x: torch.Tensor, t_data: float, t_prior: float,
                       prior_log_prob: Callable[[torch.Tensor], torch.Tensor],
                       trace: Literal["exact", "hutchinson"] = "hutchinson", method: str = "dopri5",
                       rtol: float = 1e-5, atol: float = 1e-5, create_graph: bool = False,
                       generator: torch.Generator | None = None,
                       options: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``log p(x)`` of data ``x`` at time ``t_data`` under the flow whose prior sits at ``t_prior``.

    Returns ``(log_p (B,), the point reached at t_prior, NFE)``. ``create_graph`` keeps the graph for a
    loss (FFJORD's training); otherwise it runs under ``enable_grad`` only for the trace. ``options``
    go to ``torchdiffeq.odeint`` (``first_step``; ``step_size`` of a fixed-step method).
    """
    from torchdiffeq import odeint

    eps = None if trace == "exact" else rademacher(x, generator)
    nfe = 0

    def dynamics(t, state):
        nonlocal nfe
        nfe += 1
        z, _ = state
        with torch.enable_grad():
            z = z if z.requires_grad else z.detach().requires_grad_(True)
            f = drift(t, z)
            div = divergence(f, z, eps, create_graph=create_graph)
        if not create_graph:
            f, div = f.detach(), div.detach()
        return f, div

    zero = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
    times = torch.tensor([t_data, t_prior], device=x.device, dtype=x.dtype)
    z_path, div_path = odeint(dynamics, (x, zero), times, method=method, rtol=rtol, atol=atol, options=options)
    z1, integral = z_path[-1], div_path[-1]  # int_{t_data}^{t_prior} tr(df/dx) dt
    return prior_log_prob(z1) + integral, z1, nfe


def ode_sample(drift: Drift, z: torch.Tensor, t_prior: float, t_data: float, method: str = "dopri5",
               rtol: float = 1e-5, atol: float = 1e-5, options: dict | None = None) -> tuple[torch.Tensor, int]:
    """Integrate prior draws ``z`` from ``t_prior`` to ``t_data``; returns the samples and the NFE."""
    from torchdiffeq import odeint

    nfe = 0

    def dynamics(t, x):
        nonlocal nfe
        nfe += 1
        return drift(t, x)

    times = torch.tensor([t_prior, t_data], device=z.device, dtype=z.dtype)
    with torch.no_grad():
        path = odeint(dynamics, z, times, method=method, rtol=rtol, atol=atol, options=options)
    return path[-1], nfe


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) per sample, ``(B,)``."""
    return -0.5 * (z ** 2 + torch.log(torch.tensor(2 * torch.pi, dtype=z.dtype))).flatten(1).sum(1)


def signed_log_prob(log_prob: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """``log p(y)`` (B,), detached, of dequantized images ``y`` in [0, 1)^D under a flow whose density
    ``log_prob(z)`` is of ``z = 2 y - 1`` on the [-1, 1] scale (the map's log-determinant, D log 2, added)."""
    z, logdet = signed_transform(y)
    return (log_prob(z) + logdet).detach()


def ode_nll_protocol(trace: Literal["exact", "hutchinson"], solver: str, **settings) -> dict:
    """``nll_protocol()`` of an ODE density: one uniform dequantization, the trace (one Rademacher draw
    for Hutchinson's), the solver and its ``settings``; the importance-weighted NLL takes the exact trace."""
    return {"dequantization": "uniform", "dequantization_draws": 1, "estimator": trace,
            "trace_draws": 1 if trace == "hutchinson" else 0, "solver": solver, **settings,
            "weighted_estimator": "exact", "weighted_trace_draws": 0}


def reference_solver(solver: dict) -> dict:
    """The reference of a solve given as ``odeint`` arguments: its tolerances (and a smallest step,
    ``options["min_step"]``) ``REFERENCE_FACTOR`` times tighter, with the same adaptive method, or
    dopri5 in place of a fixed-step one (which ignores them)."""
    tight = {"rtol": solver["rtol"] / REFERENCE_FACTOR, "atol": solver["atol"] / REFERENCE_FACTOR}
    if solver.get("method", "dopri5") not in ADAPTIVE:
        return {"method": "dopri5", **tight}
    options = dict(solver.get("options") or {})
    if "min_step" in options:
        options["min_step"] = options["min_step"] / REFERENCE_FACTOR
    return {**solver, **tight, "options": options}


def solver_error(nll: Callable[[torch.Tensor, bool], torch.Tensor], x: torch.Tensor, num_dims: int,
                 reference: dict, seed: int = 0) -> dict:
    """The ODE solver's error on the NLL of uint8 images ``x`` (B, C, H, W), in bits/dim.

    ``nll(x, False)`` is the figure's per-image NLL in nats (B,), ``nll(x, True)`` the same with the
    ``reference`` solve; both run from the same seed, so the dequantization and the trace's Rademacher
    draws agree and the difference is the solver's alone. ``solver_error_bpd`` is the error of the
    batch's mean (what the reported average carries), ``solver_error_max_bpd`` the largest per image.
    """
    devices = [x.device] if x.device.type == "cuda" else []
    start, scores = time.perf_counter(), []
    for use_reference in (False, True):
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            scores.append(nll(x, use_reference).detach().double().cpu())
    diff = bits_per_dim(scores[0] - scores[1], num_dims)  # (B,) the figure's solve less the reference
    settings = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in reference.items()
                         if k in ("method", "rtol", "atol"))
    if "min_step" in (reference.get("options") or {}):
        settings += f", min_step {reference['options']['min_step']:g}"
    return {"solver_error_bpd": float(diff.mean().abs()), "solver_error_max_bpd": float(diff.abs().max()),
            "solver_error_images": len(x), "solver_reference": settings,
            "solver_error_seconds": time.perf_counter() - start}
