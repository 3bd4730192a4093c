"""Bits/dim, dequantization and data-transform Jacobians: the one audited place for them.

Every NLL trilemma reports is the negative log-likelihood of the *discrete* 8-bit image ``x`` with
``D = C*H*W`` subpixels, each one of 256 values, in bits per subpixel:

    bits/dim = -log P(x) / (D ln 2)

A model scoring every image as uniform scores exactly 8 bits/dim.

Continuous densities (flows, and any model of real-valued pixels) see a uniformly dequantized image
``y = (x + u) / 256`` with ``u ~ U[0, 1)^D``, so ``y`` lies in the cell ``[x/256, (x+1)/256)`` of
volume ``256^-D``. Since ``P(x) = 256^-D E_u[p(y)]``, Jensen's inequality gives
``-log P(x) <= E_u[-log p(y)] + D log 256`` (Theis et al. 2016, "A note on the evaluation of generative
models"). Averaging ``p(y)`` over ``K`` draws before the log (:func:`importance_weighted_nll`) closes the
gap as ``K`` grows: an estimate of the discrete NLL itself, recorded with its draw count. When a flow
models ``z = f(y)`` rather than ``y``, ``log p(y) = log p(z) + log |det df/dy|``; the transforms below
return that log-determinant together with ``z``, so no model writes its own.

What a dequantized figure is, for every family (``Capabilities.density`` and the NLL's ``kind``):
    * one draw of ``u`` per image, averaged over the test images, is a Monte-Carlo estimate of the
      upper bound above: a **bound** (≤), reported with its standard error over the images. So is it
      when ``log p(y)`` is itself an unbiased Monte-Carlo estimate (Hutchinson's trace in FFJORD and in
      the probability-flow and flow-matching ODEs, Residual Flow's Russian-roulette log-determinant
      series): ``E[-log p_hat(y)] = -log p(y)``, so the figure still estimates the same bound without
      bias. A family whose ``log p(y)`` is exact declares ``density="exact"`` (and the harness marks
      its dequantized figure a bound); one that estimates it declares ``"bound"``, as the review does.
    * ``K > 1`` draws importance-weighted are an **estimate** (≈) of ``-log P(x)``, but only from an
      exact ``log p(y)``: the mean of ``exp`` of a noisy log is biased upward (Jensen again), which
      would pull the figure down, below the discrete NLL even. So ``dequantized_log_prob`` is exact
      where ``nll()`` estimates: the ODE families take the exact divergence (D vector-Jacobian
      products per drift evaluation) and Residual Flow each block's exact log-determinant (its
      Jacobian by D vector-Jacobian products, then log det), both up to the solver's or float
      accuracy; their ``nll_protocol()`` records it as ``weighted_estimator``. That costs about D
      times a one-draw figure's trace, per draw: on MNIST a few images (``eval.nll_images``), not a
      whole split (one loaded CPU thread, per image and draw, ``mnist`` presets untrained: Residual
      Flow ~1 s, FFJORD ~12 s, flow matching ~40 s, DDPM++ ~4 min).
    * ``"estimate"`` is left for a Monte-Carlo estimate of the exact ``-log P(x)`` whose one-draw figure
      does not sit systematically above its many-draw one (tests/test_nll_kinds.py checks every family).

Discrete likelihoods (a 256-way softmax, or a Gaussian, a logistic or a mixture of logistics integrated
over each pixel's bin) give ``-log P(x)`` directly, with no dequantization and no offset.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

NUM_BINS = 256  # 8-bit data
LOG_BINS = math.log(NUM_BINS)


# --- representations of a uint8 batch -----------------------------------------------------------
def to_signed(x: torch.Tensor) -> torch.Tensor:
    """uint8 in {0..255} -> float in [-1, 1] (the bin centres of the discretized likelihoods)."""
    return x.float() / 127.5 - 1.0


def from_signed(x: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] -> uint8, rounding to the nearest of the 256 levels (inverse of to_signed)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def dequantize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform dequantization: uint8 ``x`` -> ``y = (x + u) / 256`` in [0, 1), ``u ~ U[0, 1)``."""
    u = torch.rand(x.shape, device=x.device, generator=generator)
    return (x.float() + u) / NUM_BINS


# --- invertible data transforms applied after dequantization ------------------------------------
def logit_transform(y: torch.Tensor, alpha: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """RealNVP's (Dinh et al. 2017, sec. 4.1) ``z = logit(alpha + (1 - 2 alpha) y)``.

    Returns ``z`` and ``log |det dz/dy|`` per image, shape ``(B,)``.
    """
    s = alpha + (1 - 2 * alpha) * y
    z = torch.log(s) - torch.log1p(-s)
    logdet = math.log(1 - 2 * alpha) - torch.log(s) - torch.log1p(-s)
    return z, logdet.flatten(1).sum(1)


def logit_inverse(z: torch.Tensor, alpha: float = 0.05) -> torch.Tensor:
    """Inverse of :func:`logit_transform`, mapped to [-1, 1] for ``sample``."""
    y = (torch.sigmoid(z) - alpha) / (1 - 2 * alpha)
    return y * 2 - 1


def signed_transform(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``z = 2 y - 1``, the dequantized image on [-1, 1] (where diffusion and ODE models work):
    ``log |det dz/dy| = D log 2``."""
    d = y[0].numel()
    return 2 * y - 1, torch.full((y.shape[0],), d * math.log(2), device=y.device, dtype=y.dtype)


def centre_transform(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Glow's (Kingma & Dhariwal 2018) ``z = y - 1/2``: a shift, so ``log |det| = 0``."""
    return y - 0.5, torch.zeros(y.shape[0], device=y.device)


def discrete_nll_from_density(log_p_y: torch.Tensor, num_dims: int) -> torch.Tensor:
    """Upper bound on ``-log P(x)`` (nats) from ``log p(y)`` of the dequantized ``y`` in [0, 1)^D."""
    return -log_p_y + num_dims * LOG_BINS


def importance_weighted_nll(log_p: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, draws: int,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """``-log P(x)`` (nats, ``(B,)``) estimated from ``draws`` uniform dequantizations of uint8 ``x``.

    ``log_p(y)`` is the model's log density of dequantized images ``y`` in [0, 1)^D. With the uniform
    dequantizer as the proposal (its density is 1 on the cell), ``P(x) = 256^-D E_u[p(y)]``, so

        -log P(x) ~= D log 256 - log (1/K sum_k p(y_k)),  y_k = (x + u_k) / 256,

    the importance-weighted estimate (Burda et al. 2016, as Ho et al. 2019 use it for Flow++): by
    Jensen its expectation is still at or above ``-log P(x)``, but the gap shrinks as ``K`` grows and
    vanishes as ``K -> inf``, so it estimates the discrete NLL itself; ``K = 1`` is
    :func:`discrete_nll_from_density` of one draw. The draws run one after another (memory of one).
    """
    if draws < 1:
        raise ValueError(f"draws must be at least 1, got {draws}")
    log_ps = torch.stack([log_p(dequantize(x, generator)).double() for _ in range(draws)])  # (K, B)
    log_mean = torch.logsumexp(log_ps, dim=0) - math.log(draws)
    return discrete_nll_from_density(log_mean, x[0].numel())


# --- discrete likelihoods on the 256 levels ------------------------------------------------------
def _discretized_log_prob(x, mean, log_scale, log_cdf, cdf, log_pdf) -> torch.Tensor:
    """``log P(x)`` per subpixel for a continuous distribution on [-1, 1] integrated over each level's bin.

    The bins are ``centre +- 1/255``, the outer two extending to -inf and +inf. Every edge used in the
    arithmetic is finite and the tails are picked with ``torch.where``, so no gradient meets
    ``0 * inf`` at pixels 0 and 255. ``x``, ``mean`` and ``log_scale`` broadcast together.
    """
    centre = to_signed(x)
    inv = torch.exp(-log_scale)
    a_up = (centre + 1.0 / 255 - mean) * inv
    a_lo = (centre - 1.0 / 255 - mean) * inv
    mid = cdf(a_up) - cdf(a_lo)
    # Where the difference of CDFs underflows, the density at the centre times the bin width.
    log_mid = torch.where(mid > 1e-5, torch.log(mid.clamp_min(1e-12)),
                          log_pdf((centre - mean) * inv) - log_scale + math.log(2 / 255))
    return torch.where(x == 0, log_cdf(a_up), torch.where(x == 255, log_cdf(-a_lo), log_mid))


def _discretized_nll(x, mean, log_scale, log_cdf, cdf, log_pdf) -> torch.Tensor:
    """``-log P(x)`` per image of :func:`_discretized_log_prob`, summed over the subpixels."""
    return -_discretized_log_prob(x, mean, log_scale, log_cdf, cdf, log_pdf).flatten(1).sum(1)


def _logistic_log_pdf(z: torch.Tensor) -> torch.Tensor:
    return z - 2 * F.softplus(z)


def discretized_gaussian_nll(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """``-log P(x)`` in nats per image of a Gaussian on [-1, 1] integrated over each level's bin.

    The decoder likelihood of DDPM (Ho et al. 2020, eq. 13) and of the VAE here. ``mean`` and
    ``log_scale`` broadcast to ``x``'s shape.
    """
    return _discretized_nll(x, mean, log_scale, torch.special.log_ndtr, torch.special.ndtr,
                            lambda z: -0.5 * z ** 2 - 0.5 * math.log(2 * math.pi))


def discretized_logistic_nll(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """``-log P(x)`` in nats per image of a logistic on [-1, 1] integrated over each level's bin
    (PixelCNN++, Salimans et al. 2017, with one mixture component)."""
    return _discretized_nll(x, mean, log_scale, F.logsigmoid, torch.sigmoid, _logistic_log_pdf)


def discretized_mixture_logistic_nll(x: torch.Tensor, logit_probs: torch.Tensor, means: torch.Tensor,
                                     log_scales: torch.Tensor) -> torch.Tensor:
    """``-log P(x)`` in nats per image of a K-component mixture of discretized logistics per subpixel
    (PixelCNN++, Salimans et al. 2017, eq. 2).

    ``x`` is uint8 ``(B, C, H, W)``; ``logit_probs``, ``means`` and ``log_scales`` are
    ``(B, K, C, H, W)`` (broadcastable), the mixture along dim 1:

        P(x_i) = sum_k softmax(logit_probs)_k,i  P_logistic(x_i's bin; means_k,i, log_scales_k,i)

    Each subpixel has its own mixture weights, and the channels of a pixel are independent given the
    parameters: the paper's linear dependence of the green and blue means on the red (and green)
    value of the same pixel, with mixture weights shared by a pixel's channels, is left out. A
    caller that wants it can pass means already shifted by the earlier channels. With K = 1 this is
    :func:`discretized_logistic_nll`.
    """
    log_weights = F.log_softmax(logit_probs, dim=1)  # (B, K, C, H, W)
    log_comp = _discretized_log_prob(x.unsqueeze(1), means, log_scales, F.logsigmoid, torch.sigmoid,
                                     _logistic_log_pdf)  # (B, K, C, H, W)
    log_prob = torch.logsumexp(log_weights + log_comp, dim=1)  # (B, C, H, W)
    return -log_prob.flatten(1).sum(1)


def categorical_nll(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``-log P(x)`` in nats per image of a 256-way softmax per subpixel.

    ``logits`` is ``(B, 256, C, H, W)``, ``x`` uint8 ``(B, C, H, W)``.
    """
    nll = F.cross_entropy(logits, x.long(), reduction="none")  # (B, C, H, W)
    return nll.flatten(1).sum(1)


# --- reporting -----------------------------------------------------------------------------------
def bits_per_dim(nll_nats: torch.Tensor | float, num_dims: int):
    """Nats per image -> bits per subpixel."""
    return nll_nats / (num_dims * math.log(2))
