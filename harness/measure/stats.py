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


# --- bootstrap intervals over the generated samples --------------------------------------------------

def _percentile_interval(values: np.ndarray, level: float) -> list[float]:
    alpha = (1 - level) / 2
    return [float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))]


def _sqrt_psd(sigma: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a PSD matrix (eigenvalues clamped at 0)."""
    eig, vec = torch.linalg.eigh((sigma + sigma.T) / 2)
    return (vec * eig.clamp_min(0).sqrt()) @ vec.T


def bootstrap(gen: torch.Tensor, ref: torch.Tensor, ref_stats: dict[str, torch.Tensor], resamples: int = 50,
              level: float = 0.95, seed: int = 0, k: int = 3, kid: bool = True,
              prc: bool = True) -> dict[str, Any]:
    """Percentile bootstrap intervals of FID, KID, precision and recall over the generated samples.

    Each of ``resamples`` draws the n generated features again with replacement and recomputes the
    metric on features already extracted (no sampling, no network):

    * FID against the fixed reference statistics: the trace term of each resample from the n x n
      Gram matrices ``C S_r C^T`` and ``C C^T`` of the generated features (computed once and indexed,
      double-centred per resample), so a resample costs one n x n symmetric eigen-solve; for n >= D,
      ``S_r^(1/2) S_g S_r^(1/2)`` (D x D) instead.
    * KID: the unbiased MMD^2 of the whole generated and reference sets (cubic kernel), resampling
      *both* sets, so its spread covers the generated draw as well as the references (the subsets' std
      of :func:`kid` covers the references only when the subset is all generated samples).
    * precision: the mean of each generated sample's "inside a reference ball" indicator; recall: the
      share of references inside the ball of some resampled generated sample, the balls' radii (k-th
      neighbour distances) those of the full generated set, since a duplicate would have radius 0.

    Returns ``{"<metric>_percentile": [lo, hi], "<metric>_sd": sd, "<metric>_mean", "resamples",
    "level", "method"}``. FID is biased upward in n, and a resample (about 63 % distinct samples) more
    so: its percentiles can sit wholly above the estimate (FID 24.7 of 60 images; resamples 29-33), so
    the interval to print is the normal one around the estimate, ``estimate ± z sd``
    (:func:`normal_intervals`); the percentiles and the resamples' mean are kept to show the bias.
    """
    rng = np.random.RandomState(seed)
    x = gen.double().to(ref_stats["mu"].device)
    n, d = x.shape
    picks = [torch.from_numpy(rng.randint(0, n, n)).to(x.device) for _ in range(resamples)]
    out: dict[str, Any] = {"resamples": resamples, "level": level,
                           "method": "percentile bootstrap over the generated samples"}
    draws: dict[str, list[float]] = {"fid": []}

    # FID: per resample the mean, the trace of S_g and the trace of (S_g S_r)^(1/2).
    mu0 = x.mean(0)
    c0 = x - mu0
    trace_r = torch.trace(ref_stats["sigma"])
    if n - 1 < d:
        gram_r = c0 @ ref_stats["sigma"] @ c0.T  # (n, n)
        gram = c0 @ c0.T
    else:
        root = _sqrt_psd(ref_stats["sigma"])
    for idx in picks:
        shift = c0[idx].mean(0)
        diff = mu0 + shift - ref_stats["mu"]
        if n - 1 < d:
            def centred(g):  # double-centring: the Gram of the resample's own centred features
                g = g[idx][:, idx]
                return g - g.mean(0, keepdim=True) - g.mean(1, keepdim=True) + g.mean()
            small = centred(gram_r) / (n - 1)
            eig = torch.linalg.eigvalsh((small + small.T) / 2)
            trace_g = torch.trace(centred(gram)) / (n - 1)
        else:
            c = c0[idx] - shift
            sigma_g = c.T @ c / (n - 1)
            eig = torch.linalg.eigvalsh(root @ sigma_g @ root)
            trace_g = torch.trace(sigma_g)
        draws["fid"].append(float(diff @ diff + trace_g + trace_r - 2 * eig.clamp_min(0).sqrt().sum()))

    y = ref.double().to(x.device)
    m = len(y)
    if kid and max(n, m) ** 2 <= PRECOMPUTE_ELEMENTS:
        kernel = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731  (as :func:`kid`)
        k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
        draws["kid"] = []
        for idx in picks:
            jdx = torch.from_numpy(rng.randint(0, m, m)).to(x.device)
            wx = torch.bincount(idx, minlength=n).double()  # how often each sample was drawn
            wy = torch.bincount(jdx, minlength=m).double()
            # Off-diagonal sums over the n (m) drawn positions: w^T K w minus each position with itself.
            xx = (wx @ k_xx @ wx - wx @ k_xx.diagonal()) / (n * (n - 1))
            yy = (wy @ k_yy @ wy - wy @ k_yy.diagonal()) / (m * (m - 1))
            draws["kid"].append(float(xx + yy - 2 * (wx @ k_xy @ wy) / (n * m)))

    if prc:
        xf, yf = x.float(), y.float()
        radius_x = torch.cdist(xf, xf).kthvalue(k + 1, dim=1).values  # (n,), the point itself excluded
        radius_y = torch.cdist(yf, yf).kthvalue(k + 1, dim=1).values  # (m,)
        d_xy = torch.cdist(xf, yf)  # (n, m)
        inside_ref = (d_xy <= radius_y[None]).any(1).double()  # (n,): generated sample is "precise"
        covers = d_xy <= radius_x[:, None]  # (n, m): generated sample i's ball holds reference j
        draws["precision"] = [float(inside_ref[idx].mean()) for idx in picks]
        draws["recall"] = [float(covers[idx].any(0).double().mean()) for idx in picks]
        out["precision_full"] = float(inside_ref.mean())
        out["recall_full"] = float(covers.any(0).double().mean())

    for key, values in draws.items():
        values = np.asarray(values)
        out[f"{key}_percentile"] = _percentile_interval(values, level)
        out[f"{key}_sd"], out[f"{key}_mean"] = float(values.std(ddof=1)), float(values.mean())
    return out


def normal_intervals(estimates: dict[str, float], boot: dict[str, Any]) -> dict[str, Any]:
    """``boot`` with ``<metric>_ci = estimate ± z sd`` (z of ``boot["level"]``) for each estimated metric."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + boot["level"] / 2)
    out = dict(boot, method=f"normal bootstrap interval: estimate ± {z:.2f} sd of {boot['resamples']} "
                            f"resamples of the generated samples")
    for key, value in estimates.items():
        if f"{key}_sd" in boot and value is not None:
            out[f"{key}_ci"] = [value - z * boot[f"{key}_sd"], value + z * boot[f"{key}_sd"]]
    return out
