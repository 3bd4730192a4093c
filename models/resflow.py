"""Residual Flow: invertible residual blocks with an unbiased estimate of their log-determinant.

Chen, Behrmann, Duvenaud & Jacobsen (2019), "Residual Flows for Invertible Generative Modeling", NeurIPS.

A block is y = x + g(x) with Lip(g) < 1, which makes it invertible (x = y - g(x) is a contraction, so
the fixed-point iteration converges: Behrmann et al. 2019, "Invertible Residual Networks") and gives

    log |det(I + J)| = sum_{k >= 1} (-1)^{k+1} tr(J^k) / k,    J = dg/dx.

g keeps Lip < 1 by spectral normalisation: each convolution's weight is divided by max(1, sigma / c),
with sigma the operator norm of the convolution itself (not of its reshaped kernel), found by power
iteration on persistent vectors of the layer's input shape, and c = ``coeff`` (0.98); its activations are
LipSwish, x sigmoid(beta x) / 1.1, 1-Lipschitz for every beta. In training a few iterations a step follow
the weights; in evaluation the iteration runs to convergence for the weights as they are (an EMA's
average, loaded weights), once per change of them, so the evaluated model keeps its bound. The series is
made finite without bias by a Russian roulette (the paper's eq. 6): draw N ~ Poisson(2), keep terms
k <= N + m (m ``exact_terms``, always kept) weighted 1 / P(N >= k - m), and estimate each trace by
v^T J^k v with v ~ N(0, I), one vector-Jacobian product per term. log p(y) is then estimated without bias,
and one dequantization draw makes the NLL an unbiased estimate of an upper bound on the discrete one
(``density="bound"``); nll() keeps 20 terms for sure, as the paper evaluates. ``dequantized_log_prob``
takes each block's exact log-determinant instead (its Jacobian by D vector-Jacobian products, then
log det), so that the importance-weighted NLL weights exact densities.

    y = (x + u) / 256, h = logit(a + (1 - 2a) y)     trilemma.contract.likelihood, with the log-det
    actnorm, then per scale: `blocks` x (residual block, actnorm); squeeze between scales
    then `fc_blocks` x (fully connected residual block, actnorm) on the last scale's output, flattened
    z = the result, log p(y) = log N(z; 0, I) + sum of log-dets

The memory-efficient gradient of the series (the paper's sec. 3.3, ``NeumannLogDet``), the multi-scale
layout, the inverse and what the presets change from the paper: docs/families.md (resflow).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from trilemma.contract.family import Capabilities, GenerativeModel
from trilemma.contract.likelihood import (bits_per_dim, dequantize, discrete_nll_from_density, logit_inverse,
                                          logit_transform)
from trilemma.models.blocks import ActNorm, halvings
from trilemma.models.ode import VJP_ROWS, jacobian_rows, standard_normal_log_prob

EVAL_SN_TOL = 1e-6  # evaluation: power iteration until sigma moves less than this (relative) in 10 steps
EVAL_SN_MAX_ITERS = 5000  # ...or this many iterations


@dataclass
class Config:
    hidden: int = 512  # channels inside each block's network g (paper: 512)
    blocks: int = 16  # residual blocks per scale (paper: 16)
    scales: int = 0  # scales, a squeeze between each two; 0: from the resolution; 1: a single scale
    fc_blocks: int = 0  # fully connected residual blocks after the last scale (paper: 4; 0: none)
    fc_hidden: int = 128  # hidden units of each fully connected block's g (paper: 128)
    coeff: float = 0.98  # Lipschitz bound of each convolution (paper: 0.98)
    sn_iterations: int = 2  # power iterations per training forward, on persistent vectors
    roulette: Literal["poisson", "geometric"] = "poisson"  # p(N) of the Russian roulette (paper: Poisson)
    poisson_rate: float = 2.0  # its rate (paper: 2)
    geometric_p: float = 0.5  # the geometric's success probability, when chosen
    exact_terms: int = 2  # m, series terms always kept in training (paper: 2; 0: all by the roulette)
    nll_exact_terms: int = 20  # m in nll() (paper: 20; 0: all by the roulette)
    alpha: float = 0.05  # a of the logit transform (paper: 1e-6 on MNIST, 0.05 on CIFAR-10)
    inverse_tol: float = 1e-5  # the fixed-point inverse stops when no pixel moves more than this
    inverse_max_iters: int = 100  # ...or after this many evaluations of g per block
    lr: float = 1e-3  # Adam learning rate (paper: 1e-3)
    warmup: int = 1000  # steps of linear learning-rate warm-up (paper: 1000)

    def __post_init__(self):
        for name in ("hidden", "blocks", "fc_hidden", "sn_iterations", "inverse_max_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"'{name}' must be >= 1")
        if self.scales < 0 or self.fc_blocks < 0:
            raise ValueError("'scales' and 'fc_blocks' must be >= 0")
        if not 0 < self.coeff < 1:
            raise ValueError("'coeff' must be in (0, 1): the blocks are invertible only when g contracts")
        if self.exact_terms < 0 or self.nll_exact_terms < 0 or self.warmup < 0:
            raise ValueError("'exact_terms', 'nll_exact_terms' and 'warmup' must be >= 0")
        if not (self.poisson_rate > 0 and 0 < self.geometric_p < 1):
            raise ValueError("'poisson_rate' must be > 0 and 'geometric_p' in (0, 1)")
        if not 0 < self.alpha < 0.5 or not self.inverse_tol > 0 or not self.lr > 0:
            raise ValueError("'alpha' must be in (0, 0.5), 'inverse_tol' and 'lr' > 0")


class SNConv2d(nn.Conv2d):
    """A stride-1 'same' convolution whose operator norm on (C, H, W) inputs is kept <= coeff."""

    def __init__(self, c_in: int, c_out: int, kernel: int, size: tuple[int, int], cfg: Config):
        super().__init__(c_in, c_out, kernel, padding=kernel // 2)
        self.coeff, self.iterations = cfg.coeff, cfg.sn_iterations
        self.register_buffer("u", F.normalize(torch.randn(1, c_out, *size).flatten(), dim=0).view(1, c_out, *size))
        self.register_buffer("v", torch.zeros(1, c_in, *size))
        self.started = False  # the first training call starts normalised (100 iterations), not the
        #   constructor: building the paper-sized model on a CPU would take minutes
        self.converged_for: tuple[torch.Tensor, torch.Tensor] | None = None  # (weight, u) of converge()

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.started = True  # loaded vectors carry on as the run that saved them (exact resume)

    @torch.no_grad()
    def power_iteration(self, n: int):
        """v <- C^T u / |.|, u <- C v / |.|: u and v approach the top singular vectors of the conv C."""
        for _ in range(n):
            v = F.conv_transpose2d(self.u, self.weight, padding=self.padding)
            self.v.copy_(v / v.norm().clamp_min(1e-12))
            u = F.conv2d(self.v, self.weight, padding=self.padding)
            self.u.copy_(u / u.norm().clamp_min(1e-12))

    @torch.no_grad()
    def converge(self):
        """Power iteration to convergence for the current weight, unless done for this weight and u.

        u^T C v approaches sigma from below, so a few iterations on vectors left from other weights (an
        EMA copies the live model's) under-estimate it and let the operator norm exceed ``coeff``.
        """
        done = self.converged_for
        if (done is not None and done[0].shape == self.weight.shape and done[0].device == self.weight.device
                and done[0].dtype == self.weight.dtype and torch.equal(done[0], self.weight)
                and torch.equal(done[1], self.u)):
            return
        sigma = self.sigma()
        for _ in range(EVAL_SN_MAX_ITERS // 10):
            self.power_iteration(10)
            sigma, previous = self.sigma(), sigma
            if abs(float(sigma - previous)) <= EVAL_SN_TOL * float(sigma):
                break
        self.converged_for = (self.weight.detach().clone(), self.u.clone())

    def sigma(self) -> torch.Tensor:
        return (self.u * F.conv2d(self.v, self.weight, padding=self.padding)).sum()  # u^T C v, with grad

    def normalized_weight(self) -> torch.Tensor:
        return self.weight / torch.clamp(self.sigma() / self.coeff, min=1.0)  # only ever scaled down

    def forward(self, x):
        if self.training:
            self.power_iteration(self.iterations if self.started else 100)
            self.started = True
        else:
            self.converge()
        return F.conv2d(x, self.normalized_weight(), self.bias, padding=self.padding)


class LipSwish(nn.Module):
    """x sigmoid(beta x) / 1.1 with a learned beta > 0: 1-Lipschitz (swish's slope stays below 1.1)."""

    def __init__(self):
        super().__init__()
        self.beta = nn.Parameter(torch.tensor(0.5))  # softplus(0.5) ~ 0.97, as the paper's code

    def forward(self, x):
        return x * torch.sigmoid(x * F.softplus(self.beta)) / 1.1


def roulette_weights(cfg: Config, exact: int) -> list[float]:
    """Draw N (global torch RNG) and return 1 / P(term k is kept) for the kept terms k = 1 .. N + exact."""
    if cfg.roulette == "poisson":
        lam = cfg.poisson_rate
        n = int(torch.poisson(torch.tensor([lam])))
        survival = lambda j: 1 - sum(math.exp(-lam) * lam ** i / math.factorial(i) for i in range(j))  # noqa: E731
    else:
        n = int(torch.empty(1).geometric_(cfg.geometric_p))  # N >= 1
        survival = lambda j: (1 - cfg.geometric_p) ** (j - 1)  # noqa: E731
    return [1.0 if k <= exact else 1.0 / survival(k - exact) for k in range(1, n + exact + 1)]


def power_series(gx, x, v, weights):
    """The roulette log-det estimate (B,) and the Neumann vector sum_k (-1)^k w_k v^T J^k, J = dgx/dx."""
    vjp, neumann, logdet = v, v, torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
    for k, w in enumerate(weights, 1):
        (vjp,) = torch.autograd.grad(gx, x, vjp, retain_graph=True)  # v^T J^k (B, C, H, W)
        logdet = logdet + (-1) ** (k + 1) / k * w * (vjp * v).flatten(1).sum(1)
        neumann = neumann + (-1) ** k * w * vjp
    return logdet, neumann


class NeumannLogDet(torch.autograd.Function):
    """(g(x), roulette log-det estimate); backward: g's own gradient plus the log-det's Neumann-series
    gradient, the latter computed in forward. The parameter part of it is summed over the batch here and
    scaled by the mean upstream gradient: the loss must weight every image's log-det alike (a mean NLL)."""

    @staticmethod
    def forward(ctx, x, v, weights, g, *params):
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            gx = g(x)
            logdet, neumann = power_series(gx, x, v, weights)
            # Holding the Neumann vector fixed, grad (neumann^T J v) is the Neumann-series gradient.
            (vjp,) = torch.autograd.grad(gx, x, neumann.detach(), create_graph=True)
            surrogate = (vjp * v).sum()
            grads = torch.autograd.grad(surrogate, (x, *params), retain_graph=True, allow_unused=True)
        ctx.x, ctx.gx, ctx.params, ctx.logdet_grads = x, gx, params, grads
        return gx.detach(), logdet.detach()

    @staticmethod
    def backward(ctx, grad_gx, grad_logdet):
        with torch.enable_grad():  # backpropagate g itself through the graph kept from forward
            g_grads = torch.autograd.grad(ctx.gx, (ctx.x, *ctx.params), grad_gx, allow_unused=True)
        per_image = grad_logdet.view(-1, *[1] * (ctx.x.dim() - 1))
        grads = [g_grads[0] + ctx.logdet_grads[0] * per_image]
        for dg, dl in zip(g_grads[1:], ctx.logdet_grads[1:]):  # dl is None where J does not depend on it
            grads.append(dg if dl is None else dg + dl * grad_logdet.mean())
        return (grads[0], None, None, None, *grads[1:])


class ResidualBlock(nn.Module):
    """y = x + g(x), Lip(g) <= coeff; forward returns y and the estimate of log det(I + dg/dx) (B,).

    g's kernels are 3-1-3 with ``cfg.hidden`` channels; a fully connected block (``fc``) is the same
    on inputs viewed as (B, C*H*W, 1, 1), its kernels 1-1-1 with ``cfg.fc_hidden`` units: a 1x1
    convolution of a 1x1 grid is a linear layer, its operator norm the matrix's spectral norm."""

    def __init__(self, c: int, size: tuple[int, int], cfg: Config, first: bool, fc: bool = False):
        super().__init__()
        self.cfg = cfg
        (k_in, k_mid, k_out), hidden = ((1, 1, 1), cfg.fc_hidden) if fc else ((3, 1, 3), cfg.hidden)
        layers = [] if first else [LipSwish()]
        layers += [SNConv2d(c, hidden, k_in, size, cfg), LipSwish(), SNConv2d(hidden, hidden, k_mid, size, cfg),
                   LipSwish(), SNConv2d(hidden, c, k_out, size, cfg)]
        self.g = nn.Sequential(*layers)

    def forward(self, x, exact: bool = False):
        if exact:
            gx, logdet = self.exact_logdet(x)
            return x + gx, logdet
        v = torch.randn_like(x)  # Hutchinson's probe, one per image
        if self.training:
            weights = roulette_weights(self.cfg, self.cfg.exact_terms)
            gx, logdet = NeumannLogDet.apply(x, v, weights, self.g, *self.g.parameters())
        else:
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                gx = self.g(xg)
                logdet, _ = power_series(gx, xg, v, roulette_weights(self.cfg, self.cfg.nll_exact_terms))
            gx, logdet = gx.detach(), logdet.detach()
        return x + gx, logdet

    def exact_logdet(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        """g(x) and log det(I + dg/dx) (B,) from the whole Jacobian: D vector-Jacobian products, then
        log det."""
        b, d = x.shape[0], x[0].numel()
        step = max(1, VJP_ROWS // b)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            gx = self.g(xg)
            jac = torch.cat([jacobian_rows(gx, xg, torch.arange(i, min(i + step, d), device=x.device))
                             for i in range(0, d, step)])  # (D, B, D): [i, b] is row i of image b's J
        eye = torch.eye(d, device=x.device, dtype=torch.float64)
        # Lip(g) < 1 keeps every eigenvalue of I + J in the right half-plane: det > 0.
        return gx.detach(), torch.linalg.slogdet(eye + jac.transpose(0, 1).double())[1].to(x.dtype)

    @torch.no_grad()
    def inverse(self, y):
        """x with x + g(x) = y by the fixed-point iteration, and the evaluations of g it took."""
        x, evals = y - self.g(y), 1
        while evals < self.cfg.inverse_max_iters:
            x_next, evals = y - self.g(x), evals + 1
            converged = bool(((x_next - x).abs() <= self.cfg.inverse_tol).all())
            x = x_next
            if converged:
                break
        return x, evals


class ResidualFlow(GenerativeModel):
    name = "resflow"
    paper = ("Chen, Behrmann, Duvenaud & Jacobsen (2019), Residual Flows for Invertible Generative "
             "Modeling, NeurIPS")
    family = "Flow"
    literature = "Residual Flow"
    # The Jacobian I + J is dense and unstructured (the review's "free-form"); only Lip(g) is bounded.
    capabilities = Capabilities(density="bound", free_form_jacobian=True, sampling="iterative")
    nfe_is_full_pass = False  # an NFE is one evaluation of one block's g, not of the whole flow
    Config = Config
    presets = {
        "tiny": dict(hidden=8, blocks=1, nll_exact_terms=4, warmup=0, inverse_tol=1e-4),
        # 2-core CPU, batch 64: one block of 16 channels per scale (3 scales at 28x28); 4 sure terms in
        # nll() instead of 20, so that the 10k test images fit the budget.
        "mnist": dict(hidden=16, blocks=1, alpha=1e-6, nll_exact_terms=4, lr=2e-3, warmup=20),
        "cifar10": dict(hidden=16, blocks=1, nll_exact_terms=4, lr=2e-3, warmup=20),
        # MNIST: a quarter of the paper's model (4 blocks per scale, no fully connected blocks); CIFAR-10:
        # its CIFAR-10 model (3 scales of 16 blocks, 4 fully connected ones); both with its NLL protocol.
        "mnist_gpu": dict(blocks=4, alpha=1e-6),
        "cifar10_gpu": dict(scales=3, blocks=16, fc_blocks=4),
    }

    def __init__(self, config: Config, data_shape):
        super().__init__(config, data_shape)
        c, h, w = self.data_shape
        self.num_scales = config.scales or halvings(h, w) + 1
        if h % 2 ** (self.num_scales - 1) or w % 2 ** (self.num_scales - 1):
            raise ValueError(f"resflow: {h}x{w} images cannot be squeezed {self.num_scales - 1} times")
        self.first_norm = ActNorm(c)
        self.scales = nn.ModuleList()  # per scale: (block, actnorm) pairs
        for scale in range(self.num_scales):
            if scale:
                c, h, w = 4 * c, h // 2, w // 2  # squeeze
            self.scales.append(nn.ModuleList(
                nn.ModuleList([ResidualBlock(c, (h, w), config, first=scale == 0 and i == 0), ActNorm(c)])
                for i in range(config.blocks)))
        # The fully connected blocks on the flattened last scale, each followed by an actnorm per dimension.
        d = c * h * w
        self.fc = nn.ModuleList(nn.ModuleList([ResidualBlock(d, (1, 1), config, first=False, fc=True), ActNorm(d)])
                                for _ in range(config.fc_blocks))
        self.latent_shape = (c, h, w)
        self.last_nfe = 0  # g evaluations of the latest generate() (host-side, like the iteration)

    def encode(self, y, exact: bool = False):
        """Dequantized y (B, C, H, W) -> z (B, *latent_shape) and log |det dz/dy| (B,): the blocks'
        log-dets estimated by the roulette, or ``exact``."""
        h, logdet = logit_transform(y, self.config.alpha)
        h, ld = self.first_norm(h)
        logdet = logdet + ld
        for scale, pairs in enumerate(self.scales):
            if scale:
                h = F.pixel_unshuffle(h, 2)  # squeeze: (B, 4C, H/2, W/2)
            for block, norm in pairs:
                h, ld_block = block(h, exact)
                h, ld_norm = norm(h)
                logdet = logdet + ld_block + ld_norm
        if self.fc:
            shape, h = h.shape, h.reshape(len(h), -1, 1, 1)  # (B, D, 1, 1)
            for block, norm in self.fc:
                h, ld_block = block(h, exact)
                h, ld_norm = norm(h)
                logdet = logdet + ld_block + ld_norm
            h = h.reshape(shape)
        return h, logdet

    def decode(self, z):
        """z (B, *latent_shape) -> y (B, C, H, W), ~[0, 1), and the evaluations of g it took."""
        h, evals = z, 0
        if self.fc:
            h = h.reshape(len(h), -1, 1, 1)  # (B, D, 1, 1)
            for block, norm in reversed(self.fc):
                h, n = block.inverse(norm.inverse(h))
                evals += n
            h = h.reshape(len(h), *self.latent_shape)
        for scale in reversed(range(self.num_scales)):
            for block, norm in reversed(self.scales[scale]):
                h, n = block.inverse(norm.inverse(h))
                evals += n
            if scale:
                h = F.pixel_shuffle(h, 2)  # unsqueeze
        h = self.first_norm.inverse(h)
        return (logit_inverse(h, self.config.alpha) + 1) / 2, evals

    def log_prob(self, y):  # log p(y) of the dequantized image (B,), an unbiased estimate
        z, logdet = self.encode(y)
        return standard_normal_log_prob(z) + logdet

    # --- the contract ---------------------------------------------------------------------------
    def configure_optimizers(self):
        return {"model": torch.optim.Adam(self.parameters(), lr=self.config.lr)}

    def lr_factor(self, role, step):  # linear warm-up
        return min(1.0, (step + 1) / max(1, self.config.warmup))

    def loss(self, x):  # bits/dim of the estimate, logged as "loss"
        # A mean over the batch: NeumannLogDet relies on it.
        return {"model": bits_per_dim(self.nll(x).mean(), self.num_dims)}

    def nll(self, x):
        # An unbiased estimate of the dequantized bound -log P(x) <= E_u[-log p(y)] + D log 256: one u, one
        # v and one N per block for the batch.
        return discrete_nll_from_density(self.log_prob(dequantize(x)), self.num_dims)

    def dequantized_log_prob(self, y):  # exact log-dets: the importance weights need exact densities
        z, logdet = self.encode(y, exact=True)
        return (standard_normal_log_prob(z) + logdet).detach()

    def nll_protocol(self):
        cfg = self.config
        return {"dequantization": "uniform", "dequantization_draws": 1, "estimator": "russian_roulette",
                "roulette": cfg.roulette, "exact_terms": cfg.nll_exact_terms, "trace_draws": 1,
                "logit_alpha": cfg.alpha, "weighted_estimator": "exact_logdet", "weighted_roulette": None,
                "weighted_exact_terms": None, "weighted_trace_draws": 0}

    def samplers(self):
        # Measured: the g evaluations of the latest generate(); before one, their upper bound.
        bound = (self.config.blocks * self.num_scales + self.config.fc_blocks) * self.config.inverse_max_iters
        return {"fixed_point": self.last_nfe or bound}

    def generate(self, n, sampler):
        y, self.last_nfe = self.decode(torch.randn(n, *self.latent_shape, device=self.device))
        return ((256 * y - 0.5) / 127.5 - 1).clamp(-1, 1)  # the level of y's bin, on the [-1, 1] scale
