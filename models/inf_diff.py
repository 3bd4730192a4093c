"""∞-Diff: diffusion in function space, trained on random subsets of coordinates.

Bond-Taylor & Willcocks (2023), "∞-Diff: Infinite Resolution Diffusion with Subsampled Mollified
States", arXiv:2303.18242.

An image is a function on [0, 1]^2 seen at pixel centres. The diffusion runs on mollified states,
q(x_t | x_0) = N(sqrt(abar_t) T x_0, (1 - abar_t) T T*) with T a Gaussian blur, so every state is smooth
and a network on coordinates can denoise it at any resolution. Each step gives the network x_t at a
random subset of each image's pixels (``subsample``) and regresses the mollified noise there (the paper's
"mollified epsilon" MSE). Sampling runs the reverse process on the full grid of any resolution
(``generate_at``; ancestral or DDIM), then undoes the blur with the paper's Wiener filter. The blur is
exact in the DCT basis (reflecting boundaries); lengths are in pixels of the training grid, so the
noise has the same covariance at every resolution. The network is a small sparse neural operator
(``PointOperator``). Density: none (the paper reports no likelihood).

What the small version changes from the paper: 16 point channels and one point block per side instead
of 64 and three; a 14x14 (MNIST) or 16x16 (CIFAR-10) grid with a two-level U-Net of 16-32 channels
instead of a four-level one of 64-512 at 64x64; half the coordinates per step instead of a quarter;
1000 cosine steps sampled with 20 respaced ancestral or 10 DDIM steps; Adam 2e-3 instead of 1e-4; no
global latent (the official script also learns an encoder and a diffusion over its latent). The GPU
presets (the Config defaults) keep the paper's point part (64 channels, three point blocks, a quarter
of the coordinates) with a three-level grid U-Net of 64-128 channels at half the image's resolution,
sampled with 100 ancestral or 50 DDIM steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trilemma.contract.family import Capabilities, GenerativeModel
from trilemma.contract.likelihood import to_signed
from trilemma.models.blocks import at_least, positive
from trilemma.models.unet import UNet


@dataclass
class Config:
    channels: int = 64  # features per point (paper: 64)
    point_blocks: int = 3  # point blocks before and after the grid (paper: 3)
    kernel_radius: float = 3.0  # support of the kernel operator, in training pixels (paper: 7x7 kernel)
    grid_res: int = 16  # side of the fixed grid of the U-Net, whatever the image's resolution
    grid_channels: int = 64  # U-Net base channels
    grid_mult: tuple = (1, 2, 2)  # U-Net channel multipliers per level
    grid_blocks: int = 2  # U-Net residual blocks per level
    grid_attention: tuple = (8,)  # U-Net levels with self-attention (the middle block always has it)
    mollifier_std: float = 1.0  # sigma of the Gaussian mollifier, in training pixels (paper: 1.0)
    wiener_noise: float = 0.05  # inverse signal-to-noise ratio of the final Wiener deblurring (paper: 0.05)
    subsample: float = 0.25  # fraction of an image's coordinates used per training step (paper: 1/4)
    timesteps: int = 1000  # T, steps of the cosine schedule (paper: 1000)
    sample_steps: int = 100  # S, respaced steps of the ancestral sampler
    ddim_steps: int = 50  # steps of the deterministic DDIM sampler
    lr: float = 1e-4  # Adam learning rate (paper: 1e-4)
    grad_clip: float = 1.0  # gradient-norm clipping

    def __post_init__(self):
        at_least(self, 1, "channels", "point_blocks", "grid_res", "grid_channels", "grid_blocks", "timesteps")
        if not (self.grid_mult and all(isinstance(m, int) and m >= 1 for m in self.grid_mult)):
            raise ValueError("'grid_mult' must be a non-empty list of integers >= 1")
        if not (all(isinstance(m, int) and m >= 1 for m in self.grid_attention)):
            raise ValueError("'grid_attention' must be a list of integers >= 1")
        positive(self, "lr")
        at_least(self, 0, "wiener_noise", "grad_clip")
        if not 0 < self.subsample <= 1:
            raise ValueError("'subsample' must be in (0, 1]")
        if self.mollifier_std <= 0 or self.kernel_radius < 1:
            raise ValueError("'mollifier_std' must be > 0 and 'kernel_radius' >= 1 (training pixels)")
        if not 1 <= self.sample_steps <= self.timesteps or not 1 <= self.ddim_steps <= self.timesteps:
            raise ValueError("'sample_steps' and 'ddim_steps' must be in 1..timesteps")


# --- the mollifier: a Gaussian blur, diagonal in the Fourier basis of the symmetric extension --------
def gaussian_filter(x: torch.Tensor, sigma: float, inverse_snr: float | None = None) -> torch.Tensor:
    """Blur (B, C, r, r) by a Gaussian of std ``sigma`` pixels, reflecting at the borders; with
    ``inverse_snr``, the Wiener deconvolution g / (g^2 + inverse_snr^2) of that blur instead."""
    r = x.shape[-1]
    ext = torch.cat([x, x.flip(-1)], -1)
    ext = torch.cat([ext, ext.flip(-2)], -2)  # (B, C, 2r, 2r), periodic and symmetric: a DCT-II basis
    wy = 2 * math.pi * torch.fft.fftfreq(2 * r, device=x.device)  # radians per pixel
    wx = 2 * math.pi * torch.fft.rfftfreq(2 * r, device=x.device)
    g = torch.exp(-0.5 * sigma ** 2 * (wy[:, None] ** 2 + wx[None, :] ** 2))  # (2r, r + 1), gain 1 at DC
    if inverse_snr is not None:
        g = g / (g ** 2 + inverse_snr ** 2)
    return torch.fft.irfft2(torch.fft.rfft2(ext) * g, s=(2 * r, 2 * r))[..., :r, :r]


# --- points: values (B, N, C) at indices (B, N) of an r x r grid ---------------------------------------
def scatter(h: torch.Tensor, idx: torch.Tensor, r: int) -> torch.Tensor:
    """(B, N, C) at idx -> (B, C, r, r), zero where there is no point."""
    out = h.new_zeros(h.shape[0], r * r, h.shape[2])
    out.scatter_(1, idx[..., None].expand(-1, -1, h.shape[2]), h)
    return out.transpose(1, 2).reshape(h.shape[0], h.shape[2], r, r)


def gather(dense: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(B, C, r, r) -> its values at idx, (B, N, C)."""
    return dense.flatten(2).gather(2, idx[:, None].expand(-1, dense.shape[1], -1)).transpose(1, 2)


class KernelOperator(nn.Module):
    """Depthwise (K h)(x) = mean over the points y within `radius` of x of kappa(y - x) h(y)."""

    def __init__(self, ch: int, radius: float, hidden: int = 32):
        super().__init__()
        self.radius = radius
        self.kappa = nn.Sequential(nn.Linear(2, hidden), nn.GELU(), nn.Linear(hidden, ch))

    def forward(self, h, idx, mask, scale):  # h (B, N, C); mask (B, 1, r, r); scale = r / r0
        R = int(self.radius * scale)  # support in pixels of this grid
        d = torch.arange(-R, R + 1, device=h.device) / scale  # offsets in training pixels
        offsets = torch.stack(torch.meshgrid(d, d, indexing="ij"), -1)  # (k, k, 2)
        inside = (offsets.norm(dim=-1) <= self.radius).float()  # a round support
        weight = (self.kappa(offsets / self.radius) * inside[..., None]).permute(2, 0, 1)[:, None]  # (C, 1, k, k)
        total = F.conv2d(scatter(h, idx, mask.shape[-1]), weight, padding=R, groups=h.shape[2])
        count = F.conv2d(mask, inside[None, None], padding=R)  # points within the support
        return gather(total / count.clamp_min(1), idx)  # (B, N, C)


class PointBlock(nn.Module):
    def __init__(self, ch: int, emb_ch: int, radius: float):
        super().__init__()
        self.op = KernelOperator(ch, radius)
        self.norm = nn.LayerNorm(ch)
        self.emb = nn.Linear(emb_ch, ch)
        self.mlp = nn.Sequential(nn.Linear(ch, 2 * ch), nn.GELU(), nn.Linear(2 * ch, ch))
        nn.init.zeros_(self.mlp[-1].weight)  # each block starts as the identity
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, h, emb, geometry):  # (B, N, C), (B, emb_ch)
        a = self.norm(self.op(h, *geometry)) + self.emb(F.silu(emb))[:, None]
        return h + self.mlp(a)


class PointOperator(nn.Module):
    """(values of x_t at points, their indices in an r x r grid, r, c_noise) -> T eps at the points.

    A small version of the paper's sparse U-shaped neural operator: point blocks on the coordinate set
    (a depthwise integral-kernel operator whose kernel is an MLP of the offset, so the same at every
    resolution; the paper's sparse convolutions grow with it), the points interpolated to a fixed
    ``grid_res`` grid (Gaussian-weighted; the paper: inverse-distance kNN), the DDPM++ U-Net there (the
    paper's grid U-Net), read back bilinearly and merged with the point blocks' skips. The point
    operators scatter the points into a zero grid with a mask (as the paper's ``torch_dense`` backend),
    so a point never reads a coordinate outside the subset."""

    def __init__(self, cfg: Config, channels: int, r0: int):
        super().__init__()
        ch, self.r0, self.grid_res = cfg.channels, r0, cfg.grid_res
        self.unet = UNet((ch, cfg.grid_res, cfg.grid_res), base_channels=cfg.grid_channels,
                         channel_mult=cfg.grid_mult, num_res_blocks=cfg.grid_blocks,
                         attn_resolutions=cfg.grid_attention, dropout=0.0, norm_groups=8, out_channels=ch)
        emb_ch = 4 * cfg.grid_channels
        self.lift = nn.Linear(channels, ch)
        self.down = nn.ModuleList(PointBlock(ch, emb_ch, cfg.kernel_radius) for _ in range(cfg.point_blocks))
        self.merge = nn.ModuleList(nn.Linear(2 * ch, ch) for _ in range(cfg.point_blocks))
        self.up = nn.ModuleList(PointBlock(ch, emb_ch, cfg.kernel_radius) for _ in range(cfg.point_blocks))
        self.out = nn.Linear(ch, channels)
        nn.init.zeros_(self.out.weight)  # start by predicting zero noise
        nn.init.zeros_(self.out.bias)

    def to_grid(self, h, idx, mask, r):
        """Points -> the fixed grid: at each grid centre, the mean of the points weighted by a Gaussian
        of one grid cell's std. Separable in the pixel grid: (B, N, C) -> (B, C, G, G)."""
        G = self.grid_res
        centres = (torch.arange(r, device=h.device) + 0.5) / r
        grid = (torch.arange(G, device=h.device) + 0.5) / G
        a = torch.exp(-0.5 * ((grid[:, None] - centres[None]) * G) ** 2)  # (G, r)
        total = a @ scatter(h, idx, r) @ a.T  # (B, C, G, G)
        weight = a @ mask @ a.T  # (B, 1, G, G): how much point mass each grid centre sees
        return total / weight.clamp_min(1e-12)

    @staticmethod
    def from_grid(g, idx, r):
        """Bilinear values of the grid (B, C, G, G) at the points: (B, N, C)."""
        rows, cols = idx // r, idx % r
        xy = torch.stack([(cols + 0.5) / r, (rows + 0.5) / r], -1) * 2 - 1  # (B, N, 2) in [-1, 1]
        out = F.grid_sample(g, xy[:, :, None], mode="bilinear", padding_mode="border", align_corners=False)
        return out[..., 0].transpose(1, 2)  # (B, N, C)

    def forward(self, v, idx, r, c_noise):  # v (B, N, C_img), idx (B, N), c_noise (B,)
        mask = scatter(torch.ones_like(v[..., :1]), idx, r)  # (B, 1, r, r)
        geometry = (idx, mask, r / self.r0)
        emb = self.unet.embed(c_noise)  # (B, emb_ch), shared by the point blocks and the U-Net
        h, skips = self.lift(v), []
        for block in self.down:
            h = block(h, emb, geometry)
            skips.append(h)
        h = self.from_grid(self.unet(self.to_grid(h, idx, mask, r), c_noise), idx, r)
        for merge, block in zip(self.merge, self.up):
            h = block(merge(torch.cat([h, skips.pop()], -1)), emb, geometry)
        return self.out(h)  # (B, N, C_img)


class InfDiff(GenerativeModel):
    name = "inf_diff"
    title = "∞-Diff"
    paper = ("Bond-Taylor & Willcocks (2023), ∞-Diff: Infinite Resolution Diffusion with Subsampled "
             "Mollified States, arXiv:2303.18242")
    family = "EBM"  # the review files diffusion models under energy-based models
    literature = None
    capabilities = Capabilities(density="none", free_form_jacobian=True, sampling="iterative",
                                any_resolution=True)
    Config = Config
    presets = {
        "tiny": dict(channels=8, point_blocks=1, kernel_radius=1.5, grid_res=4, grid_channels=8,
                     grid_mult=(1,), grid_blocks=1, grid_attention=(), subsample=0.5, timesteps=20,
                     sample_steps=3, ddim_steps=2, lr=1e-3),
        "mnist": dict(channels=16, point_blocks=1, kernel_radius=2.0, grid_res=14, grid_channels=16,
                      grid_mult=(1, 2), grid_blocks=1, grid_attention=(), subsample=0.5,
                      sample_steps=20, ddim_steps=10, lr=2e-3),
        "cifar10": dict(channels=16, point_blocks=1, kernel_radius=2.0, grid_res=16, grid_channels=16,
                        grid_mult=(1, 2), grid_blocks=1, grid_attention=(), subsample=0.5,
                        sample_steps=20, ddim_steps=10, lr=2e-3),
        "mnist_gpu": dict(grid_res=14, grid_attention=(7,), subsample=0.5),
        "cifar10_gpu": dict(),
    }

    def __init__(self, config: Config, data_shape):
        super().__init__(config, data_shape)
        c, h, w = self.data_shape
        if h != w:
            raise ValueError(f"inf_diff samples square grids; got {h}x{w}")
        self.net = PointOperator(config, c, h)
        # Cosine schedule (Nichol & Dhariwal 2021, as the paper), abar indexed by t = 0..T, abar_0 = 1.
        T = config.timesteps
        f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        abar = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])
        self.register_buffer("abar", abar.float(), persistent=False)  # derived from the config

    # --- the mollified process, at any resolution -----------------------------------------------------
    def blur_std(self, r: int) -> float:
        return self.config.mollifier_std * r / self.data_shape[1]  # sigma in pixels of an r-grid

    def mollified_noise(self, n: int, r: int) -> torch.Tensor:
        """T xi on an r x r grid, xi white noise of per-pixel std r / r0 (white noise's cell averages
        have variance 1 / area), so T xi has the same covariance at every r: (n, C, r, r)."""
        xi = torch.randn(n, self.data_shape[0], r, r, device=self.device) * (r / self.data_shape[1])
        return gaussian_filter(xi, self.blur_std(r))

    def c_noise(self, t: torch.Tensor) -> torch.Tensor:
        return t.float() * (1000.0 / self.config.timesteps)  # the U-Net's embedding on a 0..1000 scale

    # --- training -----------------------------------------------------------------------------------
    def configure_optimizers(self):
        return {"model": torch.optim.Adam(self.parameters(), lr=self.config.lr)}

    def subset(self, batch: int, r: int) -> torch.Tensor:
        """A random subset of round(subsample r^2) distinct coordinates per image: (B, N) indices."""
        n = max(1, round(self.config.subsample * r * r))
        return torch.rand(batch, r * r, device=self.device).argsort(1)[:, :n]

    def diffuse(self, x, t, noise):
        """x_t = sqrt(abar_t) T x_0 + sqrt(1 - abar_t) T xi on the full training grid: (B, C, r, r)."""
        abar = self.abar[t][:, None, None, None]
        return abar.sqrt() * gaussian_filter(to_signed(x), self.blur_std(x.shape[-1])) + (1 - abar).sqrt() * noise

    def subsampled_loss(self, xt, noise, idx, t):
        """MSE of the predicted mollified noise at the coordinates idx, from x_t at idx only."""
        pred = self.net(gather(xt, idx), idx, xt.shape[-1], self.c_noise(t))  # (B, N, C)
        return F.mse_loss(pred, gather(noise, idx))

    def loss(self, x):
        B, r = x.shape[0], x.shape[-1]
        t = torch.randint(1, self.config.timesteps + 1, (B,), device=x.device)
        noise = self.mollified_noise(B, r)  # T xi, (B, C, r, r)
        return {"model": self.subsampled_loss(self.diffuse(x, t, noise), noise, self.subset(B, r), t)}

    # --- sampling -----------------------------------------------------------------------------------
    def samplers(self):
        return {"ancestral": self.config.sample_steps, "ddim": self.config.ddim_steps}

    def sampling_modules(self):
        return [self.net]

    def generate(self, n, sampler):
        return self.generate_at(n, self.data_shape[1], sampler)

    def generate_at(self, n, resolution, sampler=None):
        sampler = self.resolve_sampler(sampler)
        r, S, T = resolution, self.samplers()[sampler], self.config.timesteps
        idx = torch.arange(r * r, device=self.device).expand(n, -1)  # every pixel centre of the grid
        steps = [T - (i * (T - 1)) // max(S - 1, 1) for i in range(S)] + [0]  # S distinct, T..1, then 0
        x = self.mollified_noise(n, r)  # x_T = T xi (abar_T ~ 0)
        for step, prev in zip(steps[:-1], steps[1:]):
            a, a_prev = self.abar[step], self.abar[prev]
            t = torch.full((n,), step, device=self.device)
            eps = scatter(self.net(gather(x, idx), idx, r, self.c_noise(t)), idx, r)  # T eps, (n, C, r, r)
            y0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)  # the predicted T x_0
            if sampler == "ddim":
                eps = (x - a.sqrt() * y0) / (1 - a).sqrt()  # consistent with the clipped T x_0
                x = a_prev.sqrt() * y0 + (1 - a_prev).sqrt() * eps
            else:  # posterior q(x_prev | x_t, T x_0): its covariance is a multiple of T T*, like the noise
                beta = 1 - a / a_prev
                mean = (a_prev.sqrt() * beta * y0 + (1 - beta).sqrt() * (1 - a_prev) * x) / (1 - a)
                x = mean + (beta * (1 - a_prev) / (1 - a)).sqrt() * self.mollified_noise(n, r)
        # x is the sample of T x_0 (the last step lands on abar_0 = 1 with no noise): undo the blur.
        return gaussian_filter(x, self.blur_std(r), self.config.wiener_noise).clamp(-1, 1)
