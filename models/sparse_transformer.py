"""Sparse Transformer with Distribution Augmentation: a decoder-only transformer over the subpixels.

Child, Gray, Radford & Sutskever (2019), "Generating Long Sequences with Sparse Transformers", arXiv
1904.10509; with Jun, Child, Chen, Schulman, Ramesh, Radford & Sutskever (2020), "Distribution
Augmentation for Generative Modeling", ICML.

The image is one sequence of n = C*H*W tokens in raster order (R -> G -> B within a pixel), each predicted
from the ones before by a 256-way softmax. What defines the Sparse Transformer is its strided factorised
attention with stride l = W*C (one image row of subpixels): half of each layer's heads attend to the
previous l positions, half to the same subpixel in every row above (``Block``), so every earlier
subpixel is two steps away, at O(n^1.5) per layer; the patterns are realised exactly by reshaping, not
by a dense mask (``strided_masks`` builds the dense ones for the tests). Distribution Augmentation:
each training image is, with probability ``aug_prob``, replaced by a symmetry of the square, whose
learned embedding is added at every position; samples and the NLL use the identity, so the NLL is the
exact -log P(x | identity). Architecture as the paper's: factorised row, column and channel position
embeddings, pre-norm blocks with output projections scaled by 1/sqrt(2 depth). Sampling: one step per
subpixel (NFE = n) with a key/value cache.

What the small version changes from the paper: 2 layers of width 32 / 48 with 4 heads on the CPU
presets (the paper's CIFAR-10 model: 128 layers of width 256, 2 heads, half-size feed-forward and
query-key projections, 59M parameters); ``cifar10_gpu`` is 128 layers of width 240 with 2 heads and a
feed-forward of twice the width (59.5M), ``mnist_gpu`` 8 layers of width 192; no dropout or gradient
checkpointing, no fused sparse kernels or fp16, Adam at a higher learning rate; DistAug with the 8
symmetries of the square only (no colour swaps or jigsaws), none for images that are not square.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from trilemma.contract.family import Capabilities, GenerativeModel
from trilemma.contract.likelihood import bits_per_dim, categorical_nll, to_signed
from trilemma.models.blocks import at_least, positive

NUM_LEVELS = 256  # values of an 8-bit subpixel; token 256 is the start token


@dataclass
class Config:
    width: int = 64  # d: the residual stream's features
    depth: int = 2  # transformer blocks
    heads: int = 4  # attention heads per block, half strided-row (A1), half strided-column (A2)
    mlp_ratio: int = 4  # the MLP's hidden width, in multiples of d
    augmentations: Literal["d4", "none"] = "d4"  # DistAug transformations: the square's 8 symmetries
    aug_prob: float = 0.5  # probability that a training image is transformed (identity otherwise)
    lr: float = 2e-3  # Adam learning rate
    warmup_steps: int = 50  # linear learning-rate warm-up (transformers diverge without one)
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping

    def __post_init__(self):
        at_least(self, 1, "width", "depth", "heads", "mlp_ratio")
        if self.heads % 2 or self.width % self.heads:
            raise ValueError("'heads' must be even (half per pattern) and divide 'width'")
        if not 0 <= self.aug_prob <= 1:
            raise ValueError("'aug_prob' must be in [0, 1]")
        positive(self, "lr")
        if self.warmup_steps < 0 or self.grad_clip < 0:
            raise ValueError("'warmup_steps' and 'grad_clip' must be >= 0")


def strided_masks(n: int, stride: int) -> torch.Tensor:
    """The two dense patterns (2, n, n) bool, [A1, A2]: mask[p, i, j] = query i may attend to key j."""
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    row = (j <= i) & (j >= i - stride)
    column = (j <= i) & ((i - j) % stride == 0)
    return torch.stack([row, column])


def dihedral(x: torch.Tensor, t: int) -> torch.Tensor:
    """Symmetry t of the square (0 = identity): t % 4 quarter turns, then a transpose if t >= 4."""
    x = torch.rot90(x, t % 4, dims=(-2, -1))
    return x.transpose(-2, -1) if t >= 4 else x


def attend(q, k, v):  # (B, h, 1, dh), (B, h, m, dh) x 2 -> (B, h, 1, dh): one query, no mask
    # Written out: for one query the fused kernel's set-up costs more than the arithmetic on a CPU.
    return ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1) @ v


class Block(nn.Module):
    """A pre-norm residual block: strided factorised attention, then a GELU MLP. Half the heads attend
    with A1(i) = {j : max(0, i - l) <= j <= i} (the previous row's worth of subpixels: a band within
    two row blocks), half with A2(i) = {j <= i : (i - j) mod l = 0} (causal, down each column of the
    (H, l) grid): the paper's eq. 15 with the two patterns as separate heads."""

    def __init__(self, d: int, heads: int, mlp_ratio: int, depth: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, mlp_ratio * d), nn.GELU(), nn.Linear(mlp_ratio * d, d))
        for out in (self.proj, self.mlp[2]):  # the paper's 1/sqrt(2N) scaling of residual outputs
            out.weight.data.mul_(1 / math.sqrt(2 * depth))

    def split(self, x):  # (B, n, d) -> q, k, v each (B, heads, n, d/heads)
        b, n, d = x.shape
        return self.qkv(self.ln1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)

    def merge(self, x, out):  # x (B, n, d), out (B, heads, n, dh) -> (B, n, d)
        x = x + self.proj(out.transpose(1, 2).flatten(2))
        return x + self.mlp(self.ln2(x))

    def forward(self, x, stride: int):  # (B, n, d) -> (B, n, d)
        q, k, v = self.split(x)
        b, hh, n, dh = q.shape
        rows, half = n // stride, hh // 2
        grid = lambda t: t.reshape(b, t.shape[1], rows, stride, dh)  # (B, h, H, l, dh)
        # A1: each row block attends to itself and the block before, through a band mask (l, 2l).
        qr, kr, vr = (grid(t[:, :half]) for t in (q, k, v))
        window = lambda t: torch.cat([F.pad(t, (0, 0, 0, 0, 1, 0))[:, :, :-1], t], dim=3)  # (B,h,H,2l,dh)
        a, c = torch.arange(stride)[:, None], torch.arange(2 * stride)[None, :]
        band = ((c >= a) & (c <= a + stride)).to(q.device).expand(rows, stride, 2 * stride).clone()
        band[0, :, :stride] = False  # above the first row block: padding
        row = F.scaled_dot_product_attention(qr, window(kr), window(vr), attn_mask=band)
        # A2: causal attention down each column of the (H, l) grid.
        qc, kc, vc = (grid(t[:, half:]).transpose(2, 3) for t in (q, k, v))  # (B, h, l, H, dh)
        col = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True).transpose(2, 3)
        return self.merge(x, torch.cat([row, col], dim=1).reshape(b, hh, n, dh))

    def step(self, x, cache, t: int, stride: int):  # one position x (B, 1, d) at index t, with a cache
        q, k, v = self.split(x)  # (B, heads, 1, dh)
        cache[0][:, :, t:t + 1], cache[1][:, :, t:t + 1] = k, v
        half = self.heads // 2
        kc, vc = cache[0][:, :, :t + 1], cache[1][:, :, :t + 1]
        lo = max(0, t - stride)
        row = attend(q[:, :half], kc[:, :half, lo:], vc[:, :half, lo:])
        col = attend(q[:, half:], kc[:, half:, t % stride::stride], vc[:, half:, t % stride::stride])
        return self.merge(x, torch.cat([row, col], dim=1))


class SparseTransformer(GenerativeModel):
    name = "sparse_transformer"
    title = "Sparse Transformer + DistAug"
    paper = ("Child, Gray, Radford & Sutskever (2019), Generating Long Sequences with Sparse Transformers, "
             "arXiv:1904.10509; Jun, Child, Chen, Schulman, Ramesh, Radford & Sutskever (2020), "
             "Distribution Augmentation for Generative Modeling, ICML")
    family = "AR"
    literature = "Sparse Trans. + DistAug"
    capabilities = Capabilities(density="exact", free_form_jacobian=False, sampling="autoregressive")
    Config = Config
    presets = {
        "tiny": dict(width=16, depth=2, heads=2, mlp_ratio=2, warmup_steps=0),
        # ~36k parameters (PixelCNN's mnist preset has 39k); a short warm-up, DistAug on a quarter of the batch.
        "mnist": dict(width=32, depth=2, heads=4, mlp_ratio=2, aug_prob=0.25, lr=3e-3, warmup_steps=10),
        "cifar10": dict(width=48, depth=2, heads=4, mlp_ratio=2, aug_prob=0.25, lr=3e-3, warmup_steps=10),
        "mnist_gpu": dict(width=192, depth=8, heads=6, lr=5e-4, warmup_steps=500),
        "cifar10_gpu": dict(width=240, depth=128, heads=2, mlp_ratio=2, lr=3e-4, warmup_steps=1000),
    }

    def __init__(self, config: Config, data_shape):
        super().__init__(config, data_shape)
        c, h, w = self.data_shape
        d = config.width
        self.stride = w * c  # l: one image row of subpixels
        square = h == w and config.augmentations == "d4"
        self.num_transforms = 8 if square else 1
        self.tokens = nn.Embedding(NUM_LEVELS + 1, d)
        # Factorised position embeddings (row, column, channel), and the DistAug transformation's.
        self.pos_row, self.pos_col, self.pos_chan = (nn.Parameter(0.02 * torch.randn(s, d)) for s in (h, w, c))
        self.transform = nn.Embedding(self.num_transforms, d)
        self.blocks = nn.ModuleList([Block(d, config.heads, config.mlp_ratio, config.depth)
                                     for _ in range(config.depth)])
        self.ln = nn.LayerNorm(d)
        self.out = nn.Linear(d, NUM_LEVELS)

    # --- the network ----------------------------------------------------------------------------
    def positions(self):  # (n, d): subpixel t = (i * W + j) * C + c
        pos = self.pos_row[:, None, None] + self.pos_col[None, :, None] + self.pos_chan[None, None]
        return pos.flatten(0, 2)

    def sequence_logits(self, x_uint8, transform=None):  # (B, C, H, W) uint8, (B,) -> (B, n, 256), tokens
        b = len(x_uint8)
        seq = x_uint8.permute(0, 2, 3, 1).reshape(b, -1).long()  # (B, n), channels innermost
        inp = torch.cat([seq.new_full((b, 1), NUM_LEVELS), seq[:, :-1]], dim=1)  # shifted right
        if transform is None:
            transform = seq.new_zeros(b)
        h = self.tokens(inp) + self.positions() + self.transform(transform)[:, None]  # (B, n, d)
        for block in self.blocks:
            h = block(h, self.stride)
        return self.out(self.ln(h)), seq

    def logits(self, x_uint8, transform=None):  # (B, C, H, W) uint8, (B,) long -> (B, 256, C, H, W)
        out, _ = self.sequence_logits(x_uint8, transform)
        c, h, w = self.data_shape
        return out.view(len(out), h, w, c, NUM_LEVELS).permute(0, 4, 3, 1, 2)

    # --- training and likelihood ----------------------------------------------------------------
    def configure_optimizers(self):
        return {"model": torch.optim.Adam(self.parameters(), lr=self.config.lr, betas=(0.9, 0.95))}

    def lr_factor(self, role, step):  # linear warm-up (transformers diverge without one)
        return min(1.0, (step + 1) / max(1, self.config.warmup_steps))

    def loss(self, x):  # bits/dim of the (augmented) batch, logged as "loss"; clipped to Config.grad_clip
        # DistAug: transform a random part of the batch, and tell the model which transformation.
        b = len(x)
        t = torch.randint(1, max(self.num_transforms, 2), (b,), device=x.device)
        t = torch.where(torch.rand(b, device=x.device) < self.config.aug_prob, t, 0) \
            if self.num_transforms > 1 else torch.zeros_like(t)
        x = torch.stack([dihedral(xi, int(ti)) for xi, ti in zip(x, t)])
        return {"model": bits_per_dim(categorical_nll(self.logits(x, t), x).mean(), self.num_dims)}

    def nll(self, x):  # exact -log P(x | identity) in nats, (B,)
        return torch.cat([categorical_nll(self.logits(c), c) for c in x.split(128)])

    def nll_protocol(self):
        return {"transformation": "identity"}

    # --- sampling -------------------------------------------------------------------------------
    def samplers(self):
        return {"ancestral": self.num_dims}  # one cached pass per subpixel

    @torch.no_grad()
    def generate(self, n, sampler):
        c, h, w = self.data_shape
        length = self.num_dims
        hh, dh = self.config.heads, self.config.width // self.config.heads
        caches = [(torch.zeros(n, hh, length, dh, device=self.device),
                   torch.zeros(n, hh, length, dh, device=self.device)) for _ in self.blocks]
        pos = self.positions() + self.transform.weight[0]  # (n_tokens, d), identity transformation
        token = torch.full((n,), NUM_LEVELS, dtype=torch.long, device=self.device)  # the start token
        seq = torch.zeros(n, length, dtype=torch.long, device=self.device)
        for t in range(length):
            x = (self.tokens(token) + pos[t])[:, None]  # (n, 1, d)
            for block, cache in zip(self.blocks, caches):
                x = block.step(x, cache, t, self.stride)
            logits = self.out(self.ln(x[:, 0]))  # (n, 256)
            token = torch.multinomial(F.softmax(logits, dim=1), 1).squeeze(1)
            seq[:, t] = token
        return to_signed(seq.view(n, h, w, c).permute(0, 3, 1, 2))
