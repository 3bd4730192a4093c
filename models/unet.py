"""The DDPM++ U-Net, shared by the continuous-time diffusion and flow families.

Song, Sohl-Dickstein, Kingma, Kumar, Ermon & Poole (2021), "Score-Based Generative Modeling through
Stochastic Differential Equations", ICLR, app. H.1: DDPM++ is the DDPM U-Net (Ho et al. 2020) with

    * BigGAN-type residual blocks for up- and down-sampling (Brock et al. 2019) instead of strided
      convolutions and nearest upsampling (``resblock_updown``);
    * every skip connection rescaled by 1/sqrt(2) (``skip_rescale``), as in ProGAN/StyleGAN;
    * the network conditioned on a continuous noise level: a sinusoidal ("positional") embedding of
      ``c_noise`` (DDPM++; the VP SDE feeds 999 t), or Gaussian Fourier features (NCSN++, for log sigma).

DDPM++ continuous (``ddpm_pp``), EDM (``edm``, which uses DDPM++ for its VP configuration), flow matching
(``flow_matching``) and consistency models (``consistency``) use it; the discrete DDPM keeps its own
paper-faithful U-Net (``trilemma.models.ddpm``). The number of levels follows the resolution
(``trilemma.models.blocks.halvings``): 32x32 gives 32/16/8/4 as the paper's CIFAR-10 model, 28x28
gives 28/14/7.
"""
from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from trilemma.models.blocks import halvings


# The U-Net of the CPU presets of the U-Net families (EDM, consistency, flow matching): narrow, one block
# per level, attention only in the middle block, no dropout; each family adds its own settings.
CPU_UNETS = {
    "tiny": dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0,
                 norm_groups=4),
    "mnist": dict(base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0,
                  norm_groups=8),
    "cifar10": dict(base_channels=16, channel_mult=(1, 2, 2, 2), num_res_blocks=1, attn_resolutions=(),
                    dropout=0.0, norm_groups=8),
}


def check_unet_config(cfg) -> None:
    """The U-Net's own Config fields, where a family's Config has them: a ValueError naming the first bad one."""
    for name in ("base_channels", "num_res_blocks", "min_resolution", "norm_groups"):
        if hasattr(cfg, name) and getattr(cfg, name) < 1:
            raise ValueError(f"'{name}' must be >= 1")
    if hasattr(cfg, "channel_mult") and not (cfg.channel_mult and all(isinstance(m, int) and m >= 1
                                                                      for m in cfg.channel_mult)):
        raise ValueError("'channel_mult' must be a non-empty list of integers >= 1")
    if hasattr(cfg, "attn_resolutions") and not all(isinstance(m, int) and m >= 1 for m in cfg.attn_resolutions):
        raise ValueError("'attn_resolutions' must be a list of integers >= 1")
    if hasattr(cfg, "dropout") and not 0 <= cfg.dropout < 1:
        raise ValueError("'dropout' must be in [0, 1)")


def positional_embedding(x: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Transformer sinusoidal embedding of a real scalar per sample: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device) / half)
    args = x.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class FourierEmbedding(nn.Module):
    """Gaussian Fourier features of a scalar (Tancik et al. 2020; NCSN++): fixed random frequencies."""

    def __init__(self, dim: int, scale: float = 16.0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(dim // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, dim)
        args = 2 * math.pi * x.float()[:, None] * self.freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    """BigGAN-type residual block, optionally resampling both paths (``up`` or ``down``)."""

    def __init__(self, c_in: int, c_out: int, emb_ch: int, groups: int, dropout: float,
                 up: bool = False, down: bool = False, skip_rescale: bool = True):
        super().__init__()
        self.up, self.down, self.skip_rescale = up, down, skip_rescale
        self.norm1, self.conv1 = _norm(c_in, groups), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_ch, c_out)
        self.norm2, self.conv2 = _norm(c_out, groups), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        nn.init.zeros_(self.conv2.weight)  # each block starts as (a rescaled) identity
        nn.init.zeros_(self.conv2.bias)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # (B, c_in, H, W), (B, emb_ch)
        h = self.conv1(self._resample(F.silu(self.norm1(x))))  # (B, c_out, H', W')
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        out = self.skip(self._resample(x)) + h
        return out / math.sqrt(2) if self.skip_rescale else out


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels, with a zero-initialised output projection."""

    def __init__(self, channels: int, groups: int, skip_rescale: bool = True):
        super().__init__()
        self.skip_rescale = skip_rescale
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=2)  # 3 x (B, HW, C)
        out = self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, c, h, w))
        return (x + out) / math.sqrt(2) if self.skip_rescale else x + out


def run_block(layers: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """One block's layers in turn: the residual blocks take the embedding too."""
    for layer in layers:
        h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
    return h


class UNet(nn.Module):
    """F(x, c_noise): (B, C, H, W), (B,) -> (B, C_out, H, W), the DDPM++ architecture above.

    ``channel_mult`` repeats its last entry for extra levels; attention sits at every level whose
    resolution is in ``attn_resolutions`` (and always in the middle block).
    """

    def __init__(self, data_shape: tuple[int, int, int], base_channels: int = 128,
                 channel_mult: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 4,
                 attn_resolutions: Sequence[int] = (16,), dropout: float = 0.1, norm_groups: int = 32,
                 embedding: Literal["positional", "fourier"] = "positional", min_resolution: int = 4,
                 out_channels: int | None = None, skip_rescale: bool = True, resblock_updown: bool = True):
        super().__init__()
        c, h, w = data_shape
        ch, emb_ch = base_channels, 4 * base_channels
        res = [min(h, w) >> i for i in range(halvings(h, w, min_resolution) + 1)]
        mults = [channel_mult[min(i, len(channel_mult) - 1)] for i in range(len(res))]
        self.resolutions, self.ch = res, ch
        self.fourier = FourierEmbedding(ch) if embedding == "fourier" else None
        self.emb = nn.Sequential(nn.Linear(ch, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        self.conv_in = nn.Conv2d(c, ch, 3, padding=1)
        kw = dict(emb_ch=emb_ch, groups=norm_groups, dropout=dropout, skip_rescale=skip_rescale)

        def level_block(c_in, c_out, r):
            layers = [ResBlock(c_in, c_out, **kw)]
            if r in attn_resolutions:
                layers.append(AttnBlock(c_out, norm_groups, skip_rescale))
            return nn.ModuleList(layers)

        # Down path: every block's output feeds a skip connection, as in DDPM.
        self.down, skips, c_cur = nn.ModuleList(), [ch], ch
        for i, r in enumerate(res):
            for _ in range(num_res_blocks):
                self.down.append(level_block(c_cur, ch * mults[i], r))
                c_cur = ch * mults[i]
                skips.append(c_cur)
            if i < len(res) - 1:
                down = ResBlock(c_cur, c_cur, down=True, **kw) if resblock_updown else \
                    nn.Conv2d(c_cur, c_cur, 3, stride=2, padding=1)
                self.down.append(nn.ModuleList([down]))
                skips.append(c_cur)
        self.mid = nn.ModuleList([ResBlock(c_cur, c_cur, **kw), AttnBlock(c_cur, norm_groups, skip_rescale),
                                  ResBlock(c_cur, c_cur, **kw)])
        # Up path: num_res_blocks + 1 blocks per level, each eating one skip, then an upsampling block.
        self.up = nn.ModuleList()
        for i, r in reversed(list(enumerate(res))):
            for _ in range(num_res_blocks + 1):
                self.up.append(level_block(c_cur + skips.pop(), ch * mults[i], r))
                c_cur = ch * mults[i]
            if i > 0:
                up = ResBlock(c_cur, c_cur, up=True, **kw) if resblock_updown else \
                    nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_cur, c_cur, 3, padding=1))
                self.up.append(nn.ModuleList([up]))
        self.norm_out = _norm(c_cur, norm_groups)
        self.conv_out = nn.Conv2d(c_cur, out_channels or c, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # the network starts by predicting zero
        nn.init.zeros_(self.conv_out.bias)

    @classmethod
    def from_config(cls, cfg, data_shape: tuple[int, int, int], **options) -> "UNet":
        """The U-Net of a family's Config: its U-Net fields (``min_resolution`` where it has one);
        ``options`` are the other keyword arguments of the constructor."""
        if hasattr(cfg, "min_resolution"):
            options.setdefault("min_resolution", cfg.min_resolution)
        return cls(data_shape, cfg.base_channels, cfg.channel_mult, cfg.num_res_blocks, cfg.attn_resolutions,
                   cfg.dropout, cfg.norm_groups, **options)

    def embed(self, c_noise: torch.Tensor) -> torch.Tensor:
        e = self.fourier(c_noise) if self.fourier is not None else positional_embedding(c_noise, self.ch)
        return self.emb(e)  # (B, 4 ch)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        emb = self.embed(c_noise.expand(x.shape[0]) if c_noise.ndim == 0 else c_noise)
        hs = [self.conv_in(x)]  # (B, ch, H, W), then every down block's output: the skips
        for layers in self.down:
            hs.append(run_block(layers, hs[-1], emb))
        h = run_block(self.mid, hs[-1], emb)
        for layers in self.up:
            if isinstance(layers[0], ResBlock) and not layers[0].up:  # a block that eats a skip
                h = torch.cat([h, hs.pop()], dim=1)
            h = run_block(layers, h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, C_out, H, W)
