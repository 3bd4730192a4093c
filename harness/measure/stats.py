"""FID and KID from features, computed once and fast, equal to torch-fidelity's definitions.

FID (Heusel et al. 2017): ``|mu_g - mu_r|^2 + tr(S_g) + tr(S_r) - 2 tr((S_g S_r)^(1/2))``. torch-fidelity
takes the eigenvalues of the 2048 x 2048 product ``S_g S_r``. With n < 2048 generated samples, S_g =
A^T A / (n - 1) for the centred features A (n x 2048) has rank below n, and the non-zero eigenvalues of
S_g S_r are those of the small symmetric matrix ``A S_r A^T / (n - 1)`` (n x n): the same value, exactly,
from a symmetric eigen-solver on a matrix a quarter of the size or less. Statistics are float64.

KID (Binkowski et al. 2018): the unbiased MMD^2 with the cubic polynomial kernel, averaged over random
subsets. torch-fidelity recomputes three m x m kernel matrices per subset; here the kernel matrices of
all features are computed once and each subset indexes into them. The subsets are drawn exactly as
torch-fidelity draws them (``np.random.RandomState(seed).choice``), so the numbers agree.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch


def fid_stats(features: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean and covariance (float64, unbiased) of ``(N, D)`` features."""
    x = features.double()
    mu = x.mean(0)
    centred = x - mu
    return {"mu": mu, "sigma": centred.T @ centred / (len(x) - 1)}


def frechet_distance(gen: torch.Tensor, ref_stats: dict[str, torch.Tensor]) -> float:
    """FID of generated features ``(n, D)`` against reference statistics (see the module docstring)."""
    x = gen.double().to(ref_stats["mu"].device)
    mu, sigma_r = x.mean(0), ref_stats["sigma"]
    centred = x - mu
    n, d = centred.shape
    diff = mu - ref_stats["mu"]
    trace_g = (centred ** 2).sum() / (n - 1)
    if n - 1 < d:  # the small symmetric problem: non-zero eigenvalues of S_g S_r
        small = centred @ sigma_r @ centred.T / (n - 1)  # (n, n), PSD
        eig = torch.linalg.eigvalsh((small + small.T) / 2)
    else:
        sigma_g = centred.T @ centred / (n - 1)
        eig = torch.linalg.eigvals(sigma_g @ sigma_r).real
    tr_covmean = eig.clamp_min(0).sqrt().sum()
    return float(diff @ diff + trace_g + torch.trace(sigma_r) - 2 * tr_covmean)


PRECOMPUTE_ELEMENTS = 2 * 10 ** 7  # a kernel matrix up to this size (160 MB in float64) is computed once


def kid(gen: torch.Tensor, ref: torch.Tensor, subset_size: int, subsets: int = 100, seed: int = 2020) -> dict[str, Any]:
    """KID mean and std over ``subsets`` random subsets of ``subset_size`` of each set.

    With the kernel matrices small enough to hold (``PRECOMPUTE_ELEMENTS``), each is computed once and
    every subset's sums are read off it with indicator vectors (sum over i, j in S of K[i, j] = w_S^T K
    w_S), all subsets in one matrix product; larger sets (50k references) compute each subset's kernels,
    as torch-fidelity does.
    """
    x, y = gen.double(), ref.double()
    d, m = x.shape[1], subset_size

    def kernel(a, b):  # torch-fidelity's defaults: (a.b / d + 1)^3
        return (a @ b.T / d + 1) ** 3

    rng = np.random.RandomState(seed)  # the subsets, drawn exactly as torch-fidelity draws them
    picks = [(rng.choice(len(x), m, replace=False), rng.choice(len(y), m, replace=False)) for _ in range(subsets)]
    if max(len(x), len(y)) ** 2 <= PRECOMPUTE_ELEMENTS:
        wx = torch.zeros(len(x), subsets, dtype=torch.float64)
        wy = torch.zeros(len(y), subsets, dtype=torch.float64)
        for i, (a, b) in enumerate(picks):
            wx[torch.from_numpy(a), i] = 1.0
            wy[torch.from_numpy(b), i] = 1.0
        k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
        xx = ((k_xx @ wx) * wx).sum(0) - k_xx.diagonal() @ wx  # off-diagonal sums, (subsets,)
        yy = ((k_yy @ wy) * wy).sum(0) - k_yy.diagonal() @ wy
        xy = ((k_xy @ wy) * wx).sum(0)
        values = ((xx + yy) / (m * (m - 1)) - 2 * xy / (m * m)).numpy()
    else:
        values = np.zeros(subsets)
        for i, (a, b) in enumerate(picks):
            fx, fy = x[torch.from_numpy(a)], y[torch.from_numpy(b)]
            kxx, kyy = kernel(fx, fx), kernel(fy, fy)
            off = kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()
            values[i] = float(off / (m * (m - 1)) - 2 * kernel(fx, fy).sum() / (m * m))
    return {"kid_mean": float(values.mean()), "kid_std": float(values.std()), "kid_subset_size": m,
            "kid_subsets": subsets}
