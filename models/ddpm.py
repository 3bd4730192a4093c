"""DDPM: a denoising diffusion probabilistic model.

Ho, Jain & Abbeel (2020), "Denoising Diffusion Probabilistic Models", NeurIPS; the DDIM sampler of
Song, Meng & Ermon (2021), "Denoising Diffusion Implicit Models", ICLR.

A fixed forward process adds Gaussian noise over T steps (linear betas); a U-Net eps(x_t, t) predicts
the noise under the "simple" loss at a uniform t; the reverse model p(x_{t-1} | x_t) has the posterior
mean at the predicted x_0 and the fixed variance beta~_t. Samplers: ``ancestral`` (T NFE) and ``ddim``
(eta = 0). The NLL is the paper's variational bound (eq. 5 with the discretized decoder of eq. 13),
its T - 1 KL terms estimated without bias from K stratified timesteps per image (``vlb_terms``).
The U-Net is the paper's PixelCNN++-like one (its own, not ``trilemma.models.unet``'s DDPM++), with
levels halved while both sides stay even and >= ``min_resolution`` (28 -> 28/14/7, 32 -> 32/16/8/4)
and attention at the level closest to ``attn_resolution``.

What the small version changes from the paper: T = 100 on the CPU presets with the betas scaled by
1000/T (the same total noise, as Nichol & Dhariwal 2021); a narrower U-Net (16 base channels, one
block per level, attention only in the middle block), no dropout or warm-up and a larger learning
rate; the GPU presets are the paper's CIFAR-10 model (128 channels, (1, 2, 2, 2), two blocks, attention
at 16x16, dropout 0.1, T = 1000, lr 2e-4: 35.7M parameters), whose NLL takes 20 stratified terms per
image rather than the full sum. The reverse mean clips the predicted x_0 to [-1, 1] (as the released
code) in the samplers and the bound alike, so the bound is that of the model sampled.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from trilemma.contract.likelihood import discretized_gaussian_nll, to_signed
from trilemma.contract.family import Capabilities, GenerativeModel
from trilemma.models.blocks import at_least, gaussian_kl, halvings, positive


@dataclass
class Config:
    base_channels: int = 128  # channels at full resolution (paper, CIFAR-10: 128)
    channel_mult: tuple = (1, 2, 2, 2)  # width multiplier per level; the last entry repeats for extra levels
    num_res_blocks: int = 2  # residual blocks per level on the way down (one more on the way up)
    attn_resolution: int = 16  # self-attention at the level closest to this resolution; 0: middle block only
    min_resolution: int = 4  # keep halving the image while it stays even and at least this large
    norm_groups: int = 32  # GroupNorm groups (fewer when a layer has fewer channels)
    dropout: float = 0.1  # dropout inside residual blocks (paper: 0.1 on CIFAR-10)
    timesteps: int = 1000  # T, diffusion steps; the ancestral sampler makes T network evaluations
    beta_start: float = 1e-4  # beta_1 of the linear schedule at T = 1000 (scaled by 1000/T)
    beta_end: float = 0.02  # beta_T of the linear schedule at T = 1000 (scaled by 1000/T)
    clip_denoised: bool = True  # clip the predicted x_0 to [-1, 1] in the reverse mean
    ddim_steps: int = 50  # S, steps of the deterministic DDIM sampler (eta = 0)
    nll_timesteps: int = 1000  # K, stratified KL terms per image in nll(); >= T - 1 evaluates all of them
    nll_strata: Literal["log", "uniform"] = "log"  # "log": strata log-spaced in t (low variance); "uniform": K equal strata
    lr: float = 2e-4  # Adam learning rate (paper: 2e-4)
    grad_clip: float = 1.0  # gradient-norm clipping (paper: 1.0)
    random_flip: bool = False  # random horizontal flips of training batches (paper: on for CIFAR-10)

    def __post_init__(self):
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise ValueError("'beta_start' and 'beta_end' must be 0 < beta_start <= beta_end < 1")
        at_least(self, 1, "base_channels", "num_res_blocks", "min_resolution", "norm_groups", "ddim_steps",
                 "nll_timesteps")
        at_least(self, 0, "attn_resolution", "grad_clip")
        positive(self, "lr")
        if not (self.channel_mult and all(isinstance(m, int) and m >= 1 for m in self.channel_mult)):
            raise ValueError("'channel_mult' must be a non-empty list of integers >= 1")
        if not 0 <= self.dropout < 1:
            raise ValueError("'dropout' must be in [0, 1)")
        scale = 1000.0 / max(self.timesteps, 1)
        beta_1, beta_T = self.beta_start * scale, self.beta_end * scale
        if self.timesteps < 2 or not 0 < beta_1 <= beta_T < 1:
            raise ValueError(f"'timesteps' = {self.timesteps} must be >= 2 with the scaled betas "
                             f"[{beta_1:g}, {beta_T:g}] inside (0, 1)")


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer sinusoidal embedding of (possibly fractional) timesteps: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / (half - 1))
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, temb_ch: int, groups: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = norm(c_in, groups), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temb = nn.Linear(temb_ch, c_out)
        self.norm2, self.conv2 = norm(c_out, groups), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity, as in the paper's code
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x, temb):  # x (B, c_in, H, W), temb (B, temb_ch)
        h = self.conv1(F.silu(self.norm1(x)))  # (B, c_out, H, W)
        h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):  # (B, C, H, W)
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=2)  # 3 x (B, HW, C)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, HW, C), one head as in the paper
        return x + self.proj(out.transpose(1, 2).reshape(b, c, h, w))


class UNet(nn.Module):
    """eps(x_t, t): (B, C, H, W), (B,) -> (B, C, H, W)."""

    def __init__(self, cfg: Config, data_shape: tuple[int, int, int]):
        super().__init__()
        c, h, w = data_shape
        ch, groups, temb_ch = cfg.base_channels, cfg.norm_groups, 4 * cfg.base_channels
        # Resolutions of the levels: halve while both sides stay even and >= min_resolution.
        res = [min(h, w) >> i for i in range(halvings(h, w, cfg.min_resolution) + 1)]
        mults = [cfg.channel_mult[min(i, len(cfg.channel_mult) - 1)] for i in range(len(res))]
        attn_res = min(res, key=lambda r: (abs(r - cfg.attn_resolution), r)) if cfg.attn_resolution else -1
        self.resolutions, self.ch = res, ch
        self.time_scale = 1000.0 / cfg.timesteps  # embed t on the paper's 0..1000 scale for any T
        self.temb = nn.Sequential(nn.Linear(ch, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch))
        self.conv_in = nn.Conv2d(c, ch, 3, padding=1)

        def block(c_in, c_out, r):
            layers = [ResBlock(c_in, c_out, temb_ch, groups, cfg.dropout)]
            if r == attn_res:
                layers.append(AttnBlock(c_out, groups))
            return nn.ModuleList(layers)

        # Down path: every block's output (and conv_in's, and each downsample's) feeds a skip connection.
        self.down, skips, c_cur = nn.ModuleList(), [ch], ch
        for i, r in enumerate(res):
            for _ in range(cfg.num_res_blocks):
                self.down.append(block(c_cur, ch * mults[i], r))
                c_cur = ch * mults[i]
                skips.append(c_cur)
            if i < len(res) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(c_cur, c_cur, 3, stride=2, padding=1)]))
                skips.append(c_cur)
        self.mid1 = ResBlock(c_cur, c_cur, temb_ch, groups, cfg.dropout)
        self.mid_attn = AttnBlock(c_cur, groups)
        self.mid2 = ResBlock(c_cur, c_cur, temb_ch, groups, cfg.dropout)
        # Up path: num_res_blocks + 1 blocks per level, each eating one skip, then nearest upsampling + conv.
        self.up = nn.ModuleList()
        for i, r in reversed(list(enumerate(res))):
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(block(c_cur + skips.pop(), ch * mults[i], r))
                c_cur = ch * mults[i]
            if i > 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"),
                                              nn.Conv2d(c_cur, c_cur, 3, padding=1)]))
        self.norm_out = norm(c_cur, groups)
        self.conv_out = nn.Conv2d(c_cur, c, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # start by predicting eps = 0
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x, t):  # x (B, C, H, W), t (B,) integer steps in 1..T
        temb = self.temb(timestep_embedding(t * self.time_scale, self.ch))  # (B, 4 ch)
        h = self.conv_in(x)  # (B, ch, H, W)
        hs = [h]
        for layers in self.down:
            for layer in layers:
                h = layer(h, temb) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, temb)), temb)  # (B, c_low, H_low, W_low)
        for layers in self.up:
            if isinstance(layers[0], ResBlock):
                h = torch.cat([h, hs.pop()], dim=1)
            for layer in layers:
                h = layer(h, temb) if isinstance(layer, ResBlock) else layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, C, H, W)


class DDPM(GenerativeModel):
    name = "ddpm"
    paper = "Ho, Jain & Abbeel (2020), Denoising Diffusion Probabilistic Models, NeurIPS"
    family = "EBM"  # the review files diffusion models under energy-based models
    literature = "Denoising Diffusion (DDPM)"
    capabilities = Capabilities(density="bound", free_form_jacobian=True, sampling="iterative")
    Config = Config
    presets = {
        "tiny": dict(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8, dropout=0.0,
                     timesteps=30, ddim_steps=5, nll_timesteps=4, lr=1e-3),
        "mnist": dict(base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, attn_resolution=0,
                      norm_groups=8, dropout=0.0, timesteps=100, ddim_steps=20, nll_timesteps=2, lr=2e-3),
        "cifar10": dict(base_channels=16, channel_mult=(1, 2, 2, 2), num_res_blocks=1, attn_resolution=0,
                        norm_groups=8, dropout=0.0, timesteps=100, ddim_steps=20, nll_timesteps=2, lr=2e-3,
                        random_flip=True),
        # The paper's CIFAR-10 model (see the docstring), and the same U-Net on MNIST's 28/14/7 levels.
        "mnist_gpu": dict(nll_timesteps=20),
        "cifar10_gpu": dict(nll_timesteps=20, random_flip=True),
    }

    def __init__(self, config: Config, data_shape: tuple[int, int, int]):
        super().__init__(config, data_shape)
        T = config.timesteps
        scale = 1000.0 / T
        beta_1, beta_T = config.beta_start * scale, config.beta_end * scale  # checked by the Config
        self.net = UNet(config, data_shape)
        # Schedules indexed by t = 0..T, with t = 0 the data (beta_0 = 0, abar_0 = 1); computed in float64.
        betas = torch.cat([torch.zeros(1), torch.linspace(beta_1, beta_T, T, dtype=torch.float64)])
        abar = torch.cumprod(1 - betas, dim=0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        post_var = betas * (1 - abar_prev) / (1 - abar)  # beta~_t; 0 at t = 1 (and nan at t = 0)
        post_var[0] = 0.0
        # sigma_t^2 of the reverse model: beta~_t, except at t = 1, where beta~_1 = 0 is replaced by beta~_2
        # as in the paper's code so that the decoder's Gaussian has a width (t = 0 is never used).
        var = post_var.clone()
        var[0], var[1] = 1.0, post_var[2]
        # The posterior mean of q(x_{t-1} | x_t, x_0) is coef_x0 x_0 + coef_xt x_t (Ho et al. eq. 7).
        buffers = dict(betas=betas, abar=abar, post_var=post_var, log_var=var.log(),
                       coef_x0=abar_prev.sqrt() * betas / (1 - abar),
                       coef_xt=(1 - betas).sqrt() * (1 - abar_prev) / (1 - abar))
        buffers["coef_x0"][0], buffers["coef_xt"][0] = 1.0, 0.0
        for name, value in buffers.items():  # derived from the config, so kept out of the state_dict
            self.register_buffer(name, value.float(), persistent=False)

    @staticmethod
    def _at(v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return v[t][:, None, None, None]  # (B,) -> (B, 1, 1, 1) for broadcasting over images

    # --- forward process and reverse mean ------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), reparametrized by eps."""
        return self._at(self.abar, t).sqrt() * x0 + (1 - self._at(self.abar, t)).sqrt() * eps

    def posterior_mean(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Mean of q(x_{t-1} | x_t, x_0)."""
        return self._at(self.coef_x0, t) * x0 + self._at(self.coef_xt, t) * xt

    def predict_x0(self, xt: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One network evaluation: predicted x_0 (clipped if configured) and the matching eps."""
        abar = self._at(self.abar, t)
        eps = self.net(xt, t)  # (B, C, H, W)
        x0 = (xt - (1 - abar).sqrt() * eps) / abar.sqrt()
        if self.config.clip_denoised:
            x0 = x0.clamp(-1, 1)
            eps = (xt - abar.sqrt() * x0) / (1 - abar).sqrt()  # keep eps consistent with the clipped x_0
        return x0, eps

    # --- training -----------------------------------------------------------------------------------
    def configure_optimizers(self):
        return {"model": torch.optim.Adam(self.parameters(), lr=self.config.lr)}

    def loss(self, x):
        x0 = to_signed(x)  # (B, C, H, W) in [-1, 1]
        if self.config.random_flip:
            flip = torch.rand(x0.shape[0], device=x0.device) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0)
        t = torch.randint(1, self.config.timesteps + 1, (x0.shape[0],), device=x0.device)
        eps = torch.randn_like(x0)
        return {"model": F.mse_loss(self.net(self.q_sample(x0, t, eps), t), eps)}  # L_simple (paper eq. 14)

    # --- sampling -----------------------------------------------------------------------------------
    def samplers(self):
        T = self.config.timesteps
        return {"ancestral": T, "ddim": min(self.config.ddim_steps, T)}  # one network call per step

    def generate(self, n, sampler):
        x = torch.randn(n, *self.data_shape, device=self.device)  # x_T ~ N(0, I)
        if sampler == "ancestral":
            for step in range(self.config.timesteps, 0, -1):  # t = T..1, one network call each
                t = torch.full((n,), step, device=x.device, dtype=torch.long)
                x0, _ = self.predict_x0(x, t)
                mean = self.posterior_mean(x0, x, t)
                noise = torch.randn_like(x) if step > 1 else torch.zeros_like(x)  # no noise at the last step
                x = mean + (0.5 * self._at(self.log_var, t)).exp() * noise
        else:
            # DDIM, eta = 0: S steps on a uniform grid from T down to 1, then to t = 0 (abar_0 = 1).
            S = self.samplers()["ddim"]
            T = self.config.timesteps
            steps = [T - (i * (T - 1)) // max(S - 1, 1) for i in range(S)] + [0]  # distinct, T..1, then 0
            for step, prev in zip(steps[:-1], steps[1:]):
                t = torch.full((n,), step, device=x.device, dtype=torch.long)
                x0, eps = self.predict_x0(x, t)
                abar_prev = self.abar[prev]
                x = abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * eps
        return x.clamp(-1, 1)

    def sampling_modules(self):
        return [self.net]

    # --- likelihood ---------------------------------------------------------------------------------
    @staticmethod
    def gaussian_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
        """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) summed over each image: (B,)."""
        return gaussian_kl(mean1, logvar1, mean2, logvar2).flatten(1).sum(1)

    def kl_term(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) at x_t = q_sample(x0, t, eps): (B,)."""
        xt = self.q_sample(x0, t, eps)
        x0_pred, _ = self.predict_x0(xt, t)
        log_var = self._at(self.log_var, t)
        q_logvar = torch.log(self._at(self.post_var, t))  # the same variance, so only the means differ
        return self.gaussian_kl(self.posterior_mean(x0, xt, t), q_logvar,
                                self.posterior_mean(x0_pred, xt, t), log_var)

    def stratified_timesteps(self, batch: int, k: int, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
        """K timesteps per image from {2..T}, one uniform in each of K strata, and their weights (the
        stratum sizes), so sum_k weight_k L_{t_k - 1} is unbiased for sum_t L_{t-1}: (B, K), (K,).
        The terms fall off roughly like 1/t^2, so ``nll_strata="log"`` spaces the strata in log t
        ({2..10}, {11..100} for K = 2, T = 100): the same cost, a several times smaller spread."""
        n_terms = self.config.timesteps - 1  # term i is L_{t-1} at t = i + 2
        k = min(k, n_terms)
        if self.config.nll_strata == "uniform":
            edges = [round(j * n_terms / k) for j in range(k + 1)]
        else:  # "log": edges at (n_terms + 1)^(j/K) - 1, from 0 to n_terms
            edges = [round((n_terms + 1) ** (j / k)) - 1 for j in range(k + 1)]
        for j in range(1, k + 1):  # make every stratum non-empty, keeping the last edge at n_terms
            edges[j] = max(edges[j], edges[j - 1] + 1)
        for j in range(k - 1, 0, -1):
            edges[j] = min(edges[j], edges[j + 1] - 1)
        edges = torch.tensor(edges)  # stratum j holds terms [edges[j], edges[j+1])
        sizes = edges[1:] - edges[:-1]  # (K,) all >= 1
        offsets = (torch.rand(batch, k, generator=generator) * sizes).long()  # uniform in each stratum
        return (2 + edges[:-1] + offsets).to(self.device), sizes.float().to(self.device)

    def vlb_terms(self, x: torch.Tensor, k: int | None = None, generator=None) -> dict[str, torch.Tensor]:
        """The bound's terms in nats per image: L_T = KL(q(x_T | x_0) || N(0, I)) in closed form, the
        KL terms L_{t-1} (t = 2..T, one x_t each) from ``stratified_timesteps``, and L_0, the Gaussian
        decoder integrated over each pixel's 8-bit bin. Noise is drawn from ``generator`` in this order:
        the decoder's eps, the strata, then one eps per KL term."""
        k = self.config.nll_timesteps if k is None else k
        x0 = to_signed(x)  # (B, C, H, W), the bin centres
        B, T = x0.shape[0], self.config.timesteps

        def rand():  # (B, C, H, W); drawn on the CPU from a given generator, so that tests can replay it
            if generator is None:
                return torch.randn_like(x0)
            return torch.randn(x0.shape, generator=generator).to(x0.device)

        # L_T: the prior term, in closed form.
        t_T = torch.full((B,), T, device=x0.device, dtype=torch.long)
        abar_T = self._at(self.abar, t_T)
        zeros = torch.zeros_like(x0)
        prior = self.gaussian_kl(abar_T.sqrt() * x0, torch.log(1 - abar_T), zeros, zeros)
        # L_0: the discretized Gaussian decoder p(x_0 | x_1).
        t_1 = torch.ones(B, device=x0.device, dtype=torch.long)
        x0_pred, _ = self.predict_x0(self.q_sample(x0, t_1, rand()), t_1)
        # At t = 1 the posterior mean is x_0 itself (coef_x0 = 1, coef_xt = 0): the decoder's mean is x0_pred.
        decoder = discretized_gaussian_nll(x, x0_pred, 0.5 * self._at(self.log_var, t_1))
        # L_{t-1}, t = 2..T: all of them when K >= T - 1, else a stratified estimate.
        ts, weights = self.stratified_timesteps(B, k, generator)  # (B, K), (K,)
        kl = torch.stack([self.kl_term(x0, ts[:, j], rand()) for j in range(ts.shape[1])], dim=1)  # (B, K)
        diffusion = (kl * weights).sum(1)
        return dict(prior=prior, decoder=decoder, diffusion=diffusion, total=prior + diffusion + decoder,
                    t=ts, kl=kl, weights=weights)

    def nll(self, x):
        return self.vlb_terms(x)["total"]

    def nll_protocol(self):
        T, K = self.config.timesteps, min(self.config.nll_timesteps, self.config.timesteps - 1)
        return {"bound": "variational (L_T + sum L_{t-1} + L_0, discretized Gaussian decoder)",
                "timesteps": T, "kl_terms_per_image": K,
                "estimator": "exact sum" if K >= T - 1 else f"{self.config.nll_strata} strata, one draw each",
                "clip_denoised": self.config.clip_denoised}
