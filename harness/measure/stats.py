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

from typing import Any, Optional

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


class SubsetFID:
    """FID of any subset or resample of ``n`` generated features against fixed reference statistics,
    each for the cost of one small symmetric eigen-solve.

    For n - 1 < D the trace term of a subset comes from the n x n Gram matrices ``C S_r C^T`` and
    ``C C^T`` of the centred features (computed once and indexed, double-centred per subset); for
    n - 1 >= D from ``S_r^(1/2) S_g S_r^(1/2)`` (D x D). ``idx`` may repeat indices (a bootstrap
    resample); the covariance divides by ``len(idx) - 1`` as :func:`frechet_distance` does.
    """

    def __init__(self, x: torch.Tensor, ref_stats: dict[str, torch.Tensor]):
        self.mu_r, self.sigma_r = ref_stats["mu"], ref_stats["sigma"]
        self.mu0 = x.mean(0)
        self.c0 = x - self.mu0
        n, d = x.shape
        self.trace_r = torch.trace(self.sigma_r)
        self.small = n - 1 < d
        if self.small:
            self.gram_r = self.c0 @ self.sigma_r @ self.c0.T  # (n, n)
            self.gram = self.c0 @ self.c0.T
        else:
            self.root = _sqrt_psd(self.sigma_r)

    def __call__(self, idx: torch.Tensor) -> float:
        m = len(idx)
        shift = self.c0[idx].mean(0)
        diff = self.mu0 + shift - self.mu_r
        if self.small:
            def centred(g):  # double-centring: the Gram of the subset's own centred features
                g = g[idx][:, idx]
                return g - g.mean(0, keepdim=True) - g.mean(1, keepdim=True) + g.mean()
            small = centred(self.gram_r) / (m - 1)
            eig = torch.linalg.eigvalsh((small + small.T) / 2)
            trace_g = torch.trace(centred(self.gram)) / (m - 1)
        else:
            c = self.c0[idx] - shift
            sigma_g = c.T @ c / (m - 1)
            eig = torch.linalg.eigvalsh(self.root @ sigma_g @ self.root)
            trace_g = torch.trace(sigma_g)
        return float(diff @ diff + trace_g + self.trace_r - 2 * eig.clamp_min(0).sqrt().sum())


def bootstrap(gen: torch.Tensor, ref: torch.Tensor, ref_stats: dict[str, torch.Tensor], resamples: int = 50,
              level: float = 0.95, seed: int = 0, k: int = 3, kid: bool = True,
              prc: bool = True, subset_fid: Optional["SubsetFID"] = None) -> dict[str, Any]:
    """Percentile bootstrap intervals of FID, KID, precision and recall over the generated samples.

    Each of ``resamples`` draws the n generated features again with replacement and recomputes the
    metric on features already extracted (no sampling, no network):

    * FID against the fixed reference statistics (:class:`SubsetFID`: one n x n symmetric
      eigen-solve a resample).
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
    subset_fid = subset_fid or SubsetFID(x, ref_stats)
    draws: dict[str, list[float]] = {"fid": [subset_fid(idx) for idx in picks]}

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


# --- FID extrapolated to infinitely many samples ---------------------------------------------------

FID_INF_POINTS = 15  # subset sizes of the fit, as Chong & Forsyth use
FID_INF_MIN_FRACTION = 0.2  # the smallest subset, as a fraction of n
FID_INF_MIN_SAMPLES = 500  # below this the smallest subsets are too few for the 1/N fit


def fid_infinity(gen: torch.Tensor, ref_stats: dict[str, torch.Tensor], points: int = FID_INF_POINTS,
                 min_fraction: float = FID_INF_MIN_FRACTION, seed: int = 0,
                 subset_fid: Optional[SubsetFID] = None) -> dict[str, Any]:
    """FID∞: the FID of infinitely many generated samples, extrapolated (Chong & Forsyth 2020,
    "Effectively Unbiased FID and Inception Score and where to find them", CVPR).

    FID_N is biased upward, by an amount close to linear in 1/N. FID_N of a random subset of N of
    the n features is computed at ``points`` sizes from ``min_fraction * n`` to n (the features
    already extracted: one small eigen-solve each, :class:`SubsetFID`), a least-squares line is
    fitted in 1/N, and its intercept at 1/N = 0 is FID∞, with the intercept's standard error from the
    fit's residuals (it covers the subsets' draw, not the draw of the n samples themselves).
    """
    x = gen.double().to(ref_stats["mu"].device)
    n = len(x)
    if points < 3 or not 0 < min_fraction < 1 or int(min_fraction * n) < 2:
        raise ValueError(f"FID∞ needs at least 3 sizes from at least 2 samples (n = {n}, points = {points})")
    sizes = np.unique(np.linspace(int(min_fraction * n), n, points).astype(int))
    rng = np.random.RandomState(seed)
    subset_fid = subset_fid or SubsetFID(x, ref_stats)
    fids = np.array([subset_fid(torch.from_numpy(rng.permutation(n)[:size]).to(x.device)) for size in sizes])
    inv = 1.0 / sizes
    design = np.stack([np.ones_like(inv), inv], axis=1)
    (intercept, slope), *_ = np.linalg.lstsq(design, fids, rcond=None)
    residual = fids - design @ np.array([intercept, slope])
    dof = len(sizes) - 2
    cov = (residual @ residual / dof) * np.linalg.inv(design.T @ design) if dof > 0 else np.full((2, 2), np.nan)
    return {"fid_inf": float(intercept), "fid_inf_se": float(np.sqrt(cov[0, 0])), "fid_inf_slope": float(slope),
            "fid_inf_sizes": sizes.tolist(), "fid_inf_values": fids.tolist(),
            "fid_inf_method": f"Chong & Forsyth 2020: FID_N of random subsets at {len(sizes)} sizes N from "
                              f"{sizes[0]} to {sizes[-1]}, least squares in 1/N, extrapolated to 1/N = 0"}
