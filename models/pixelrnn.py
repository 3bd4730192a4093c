"""PixelRNN: an autoregressive model of the 8-bit subpixels with two-dimensional LSTM layers.

van den Oord, Kalchbrenner & Kavukcuoglu (2016), "Pixel Recurrent Neural Networks", ICML.

log P(x) is the sum over subpixels, in raster order and R -> G -> B within a pixel, of a 256-way log
softmax given the subpixels before. The layer is the paper's Diagonal BiLSTM (section 3.2, the
literature row's 3.00 bits/dim) by default, or its Row LSTM (section 3.1, 3.07; ``layer: row_lstm``):
LSTMs whose gates sum a masked input-to-state convolution K_is and an unmasked state-to-state one K_ss
(``DiagonalBiLSTM``, ``RowLSTM`` say how each reaches its context). Residual connections as section 3.3
(2h features between layers), a k x k mask-A first layer, a ReLU-1x1-ReLU-1x1 head, and PixelCNN's
colour masks (``trilemma.models.parts.pixelcnn``). Training runs W + H - 1 sequential diagonal steps per
layer (H for the Row LSTM); sampling is exact and incremental, one step per subpixel (NFE = C*H*W),
each computing every layer's cell at the current pixel.

Sizes: ``cifar10_gpu`` is the paper's CIFAR-10 model (12 layers of h = 128, a 7x7 first layer, 1024
features in the output layers; ours has 7.77M parameters, 6.99M with the Row LSTM, the paper states
none). The other presets keep 2h = 24 features over 2 layers (mnist, cifar10) and 2h = 64 over 6
layers (mnist_gpu), with a 5x5 first layer on the CPU. Adam at a high learning rate with
gradient-norm clipping for the short budget (the paper: RMSProp).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from trilemma.contract.family import Capabilities, GenerativeModel
from trilemma.contract.likelihood import bits_per_dim, categorical_nll, to_signed
from trilemma.models.parts.pixelcnn import (NUM_LEVELS, MaskedHead, RowConv, check_colours, check_config,
                                             colour_groups, level_logits)


@dataclass
class Config:
    layer: Literal["diagonal_bilstm", "row_lstm"] = "diagonal_bilstm"  # the recurrent layer (3.2 or 3.1)
    hidden: int = 16  # h: features per LSTM gate and state; the maps between layers have 2h
    layers: int = 2  # LSTM layers
    first_kernel: int = 5  # k of the first k x k mask-A convolution (odd)
    kernel: int = 3  # Row LSTM only: k of its masked 1 x k input-to-state convolution (odd)
    head_channels: int = 64  # hidden width of the ReLU-1x1-ReLU-1x1 output head
    lr: float = 3e-3  # Adam learning rate
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping

    def __post_init__(self):
        check_config(self, ("hidden", "layers", "head_channels"))


def lstm_cell(gates, c_prev, dim: int = 1):  # gates (.., 4h, ..) along dim, c_prev (.., h, ..) -> h, c
    h = gates.shape[dim] // 4
    o, f, i = torch.sigmoid(gates.narrow(dim, 0, 3 * h)).chunk(3, dim)
    c = f * c_prev + i * torch.tanh(gates.narrow(dim, 3 * h, h))
    return o * torch.tanh(c), c


def diagonals(height: int, width: int, device=None):
    """The skew of section 3.2 (Figure 3: row i offset by i, an H x (W + H - 1) map) as an order of
    the pixels: the skewed map's columns left to right, each top to bottom without its offset
    positions, so diagonal t (the pixels i + j = t) is one run. Returns the raster index of each pixel
    in that order (HW,) and the runs' lengths (H + W - 1 of them)."""
    i, j = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    t = (i + j).flatten()
    return torch.argsort(t * height + i.flatten()).to(device), torch.bincount(t).tolist()


def skew(x, order):  # (N, H*W, ...) in raster order -> the same in diagonal order
    return x[:, order]


def unskew(y, order):  # the inverse of skew
    return y[:, torch.argsort(order)]


class FirstConv(nn.Conv2d):
    """The k x k mask-A convolution, stored as its (k//2 + 1) x k upper part: the rows above in
    full, the current row up to the current pixel, whose own weights see only earlier colours."""

    def __init__(self, cin: int, cout: int, k: int, out_groups):
        super().__init__(cin, cout, (k // 2 + 1, k))
        m = torch.ones(cout, cin, k // 2 + 1, k)
        m[:, :, -1, k // 2 + 1:] = 0  # right of the current pixel
        m[:, :, -1, k // 2] = (out_groups[:, None] > torch.arange(cin)[None, :]).float()
        self.register_buffer("mask", m, persistent=False)

    def forward(self, x):  # (B, C, H', W') padded by pad() -> (B, cout, H'-k//2, W'-2(k//2))
        return F.conv2d(x, self.weight * self.mask, self.bias)

    def pad(self, x):  # (B, C, H, W) -> (B, C, H + k//2, W + 2 (k//2)): zeros above, left, right
        p = self.kernel_size[1] // 2
        return F.pad(x, (p, p, p, 0))


class DiagonalBiLSTM(nn.Module):
    """One Diagonal BiLSTM layer with its residual connection; both directions in one pass, each
    step one batched matrix product per direction over every row of the batch.

    The map is skewed (row i offset by i), so each diagonal of the image is a column; K_is is 1x1 and
    K_ss a 2 x 1 convolution over the previous column, so the state at (i, j) reads (i-1, j) and
    (i, j-1) and a step computes a whole diagonal. The right-to-left direction runs on the mirrored
    map, its output shifted down one row before the two are added, so row i sees the rows above whole:
    every earlier subpixel but the last of the row just above, which the first layer's reach brings in."""

    def __init__(self, h: int, colours: int):
        super().__init__()
        groups, wide = colour_groups(h, colours), colour_groups(2 * h, colours)
        self.h = h
        self.input_to_state = RowConv(2 * h, 8 * h, 1, wide, groups.repeat(8), "B")  # (left, right) x 4 gates
        # K_ss per direction, (2h, 4h): the 2 x 1 kernel's taps, the state at row i-1 then at row i of
        # the previous diagonal, stacked along its input (no bias: the input-to-state term has one).
        self.state_to_state = nn.Parameter(torch.empty(2, 2 * h, 4 * h).uniform_(-1, 1) / (2 * h) ** 0.5)
        self.out = RowConv(h, 2 * h, 1, groups, wide, "B")

    def forward(self, x):  # (B, 2h, H, W) -> (B, 2h, H, W)
        b, _, height, width = x.shape
        h = self.h
        order, lengths = diagonals(height, width, x.device)
        pre = self.input_to_state(x)  # (B, 8h, H, W): the masked part, everywhere at once
        pre = torch.cat([pre[:, :4 * h], pre[:, 4 * h:].flip(-1)], 1)  # right-to-left: the mirrored map
        pre = skew(pre.view(b, 2, 4 * h, height * width).permute(1, 3, 0, 2), order)  # (2, HW, B, 4h)
        # The recurrence, one diagonal (a skewed column) per step. state: the last diagonal's
        # (2, n, B, h), rows lo-1 .. hi of this one once padded with the zero states outside the image.
        state = c = x.new_zeros(2, 0, b, h)
        states = []
        for t, p in enumerate(pre.split(lengths, 1)):  # p (2, n, B, 4h): rows lo .. hi, i + j = t
            n, pad = p.shape[1], (0, 0, 0, 0, int(t < width), int(t < height))
            state, c = F.pad(state, pad), F.pad(c, pad)[:, 1:]  # (2, n + 1, B, h), (2, n, B, h)
            taps = torch.cat([state[:, :-1], state[:, 1:]], -1)  # K_ss's 2 x 1 taps: rows i-1 and i
            gates = torch.baddbmm(p.reshape(2, n * b, 4 * h), taps.view(2, n * b, 2 * h), self.state_to_state)
            state, c = lstm_cell(gates, c.reshape(2, n * b, h), dim=-1)
            state, c = state.view(2, n, b, h), c.view(2, n, b, h)
            states.append(state)
        out = unskew(torch.cat(states, 1), order).permute(2, 0, 3, 1).reshape(b, 2 * h, height, width)
        left, right = out[:, :h], out[:, h:].flip(-1)
        right = F.pad(right, (0, 0, 1, 0))[:, :, :-1]  # down one row: row i sees rows < i through it
        return x + self.out(left + right)

    # --- sampling: one pixel at a time ----------------------------------------------------------
    def cell_at(self, d: int, pre, above, before, c_before):  # direction d's cell, (n, 4h), (n, h) x 3
        return lstm_cell(pre + torch.cat([above, before], 1) @ self.state_to_state[d], c_before)

    def new_cache(self, n: int, width: int, like):
        zeros = like.new_zeros(n, self.h, width)
        return {"above": zeros, "right": zeros}  # left / right-to-left states of the row above

    def begin_row(self, cache):
        cache["h"], cache["c"] = torch.zeros_like(cache["above"]), torch.zeros_like(cache["above"])

    def pixel(self, cache, inp, j: int):  # this layer's input row (n, 2h, 1, W), filled to j -> (n, 2h)
        pre = self.input_to_state(inp[..., j:j + 1])[:, :4 * self.h, 0, 0]  # (n, 4h)
        before, c_before = (cache["h"][:, :, j - 1], cache["c"][:, :, j - 1]) if j else \
            (torch.zeros_like(pre[:, :self.h]), torch.zeros_like(pre[:, :self.h]))
        h, c = self.cell_at(0, pre, cache["above"][:, :, j], before, c_before)
        cache["h"][:, :, j], cache["c"][:, :, j] = h, c
        return inp[:, :, 0, j] + self.out((h + cache["right"][:, :, j])[:, :, None, None])[:, :, 0, 0]

    def end_row(self, cache, inp):  # the finished row (n, 2h, 1, W): its right-to-left scan
        pre = self.input_to_state(inp)[:, 4 * self.h:, 0]  # (n, 4h, W)
        right = torch.zeros_like(cache["right"])
        h = c = torch.zeros_like(right[:, :, 0])  # nothing to the right of the last column
        for j in reversed(range(inp.shape[-1])):
            h, c = self.cell_at(1, pre[:, :, j], cache["right"][:, :, j], h, c)
            right[:, :, j] = h
        cache["above"], cache["right"] = cache["h"], right


class RowLSTM(nn.Module):
    """One Row LSTM layer with its residual connection: one step per row; K_is a masked 1 x k
    convolution over the current row and K_ss a 1 x 3 convolution over the row above (the paper's
    "3 x 1"), the paper's triangular receptive field, which misses context to the upper right."""

    def __init__(self, h: int, k: int, colours: int):
        super().__init__()
        groups, wide = colour_groups(h, colours), colour_groups(2 * h, colours)
        self.h, self.reach = h, k // 2  # input-to-state columns left of the current pixel
        self.input_to_state = RowConv(2 * h, 4 * h, k // 2 + 1, wide, groups.repeat(4), "B")
        self.state_to_state = nn.Conv1d(h, 4 * h, 3, padding=1)  # row i-1's h, columns j-1..j+1
        self.out = RowConv(h, 2 * h, 1, groups, wide, "B")

    def forward(self, x):  # (B, 2h, H, W) -> (B, 2h, H, W)
        b, _, height, width = x.shape
        pre = self.input_to_state(x).unbind(2)  # H x (B, 4h, W): the masked part, for all rows at once
        state = c = x.new_zeros(b, self.h, width)
        rows = []
        for i in range(height):  # the recurrence: one whole row per step
            state, c = lstm_cell(pre[i] + self.state_to_state(state), c)
            rows.append(state)
        return x + self.out(torch.stack(rows, dim=2))

    # --- sampling: one pixel at a time ----------------------------------------------------------
    def new_cache(self, n: int, width: int, like):
        zeros = like.new_zeros(n, self.h, width)
        return {"h": zeros, "c": zeros}  # the row above's states

    def begin_row(self, cache):  # the state-to-state term of the row, from the finished row above
        cache["ss"] = self.state_to_state(cache["h"])  # (n, 4h, W)
        cache["c_above"] = cache["c"]
        cache["h"], cache["c"] = torch.zeros_like(cache["h"]), torch.zeros_like(cache["c"])

    def pixel(self, cache, inp, j: int):  # this layer's input row (n, 2h, 1, W), filled to j -> (n, 2h)
        pre = self.input_to_state(inp[..., max(0, j - self.reach):j + 1])[:, :, 0, -1]  # (n, 4h)
        h, c = lstm_cell(pre + cache["ss"][:, :, j], cache["c_above"][:, :, j])
        cache["h"][:, :, j], cache["c"][:, :, j] = h, c
        return inp[:, :, 0, j] + self.out(h[:, :, None, None])[:, :, 0, 0]

    def end_row(self, cache, inp):
        pass  # the row's states are already in the cache


class PixelRNN(GenerativeModel):
    name = "pixelrnn"
    paper = ("van den Oord, Kalchbrenner & Kavukcuoglu (2016), Pixel Recurrent Neural Networks, ICML "
             "(the Diagonal BiLSTM)")
    family = "AR"
    literature = "PixelRNN"
    capabilities = Capabilities(density="exact", free_form_jacobian=False, sampling="autoregressive")
    Config = Config
    presets = {
        "tiny": dict(hidden=6, layers=2, first_kernel=3, head_channels=16),
        "mnist": dict(hidden=12, layers=2, first_kernel=5, head_channels=32, lr=3e-3),
        "cifar10": dict(hidden=12, layers=2, first_kernel=5, head_channels=48, lr=3e-3),
        "mnist_gpu": dict(hidden=32, layers=6, first_kernel=7, head_channels=256, lr=1e-3),
        "cifar10_gpu": dict(hidden=128, layers=12, first_kernel=7, head_channels=1024, lr=5e-4),
    }

    def __init__(self, config: Config, data_shape):
        super().__init__(config, data_shape)
        c, h = self.data_shape[0], config.hidden
        check_colours("pixelrnn", c, hidden=h, head_channels=config.head_channels)
        self.first = FirstConv(c, 2 * h, config.first_kernel, colour_groups(2 * h, c))
        self.layers = nn.ModuleList([DiagonalBiLSTM(h, c) if config.layer == "diagonal_bilstm"
                                     else RowLSTM(h, config.kernel, c) for _ in range(config.layers)])
        self.head = MaskedHead(2 * h, config.head_channels, c, NUM_LEVELS)  # (B, 2h, ..) -> (B, C*256, ..)

    # --- the network ----------------------------------------------------------------------------
    def features(self, x):  # x (B, C, H, W) in [-1, 1] -> (B, 2h, H, W)
        h = self.first(self.first.pad(x))
        for layer in self.layers:
            h = layer(h)
        return h

    def logits(self, x_uint8):  # (B, C, H, W) uint8 -> (B, 256, C, H, W)
        return level_logits(self.head(self.features(to_signed(x_uint8))))

    # --- training and likelihood ----------------------------------------------------------------
    def configure_optimizers(self):
        return {"model": torch.optim.Adam(self.parameters(), lr=self.config.lr)}

    def loss(self, x):  # bits/dim of the batch, logged as "loss"; clipped to Config.grad_clip
        return {"model": bits_per_dim(categorical_nll(self.logits(x), x).mean(), self.num_dims)}

    def nll(self, x):  # exact -log P(x) in nats, (B,); chunks keep the 256 logits per subpixel small
        return torch.cat([categorical_nll(self.logits(c), c) for c in x.split(128)])

    # --- sampling -------------------------------------------------------------------------------
    def samplers(self):
        c, h, w = self.data_shape
        return {"ancestral": c * h * w}  # one pass of every layer's cell + the head per subpixel

    @torch.no_grad()
    def generate(self, n, sampler):
        c, height, width = self.data_shape
        p = self.config.first_kernel // 2
        x = torch.zeros(n, c, height, width, device=self.device)  # [-1, 1]; unsampled never seen
        xp = self.first.pad(x)  # padded copy the first convolution reads (written as x is)
        caches = [layer.new_cache(n, width, x) for layer in self.layers]
        for i in range(height):
            for layer, cache in zip(self.layers, caches):
                layer.begin_row(cache)
            rows = [x.new_zeros(n, 2 * self.config.hidden, 1, width) for _ in range(len(self.layers) + 1)]
            for j in range(width):
                for ch in range(c):
                    # Every layer at (i, j) only; recomputed per colour as x[i, j] fills in.
                    rows[0][..., j:j + 1] = self.first(xp[:, :, i:i + p + 1, j:j + 2 * p + 1])
                    for l, (layer, cache) in enumerate(zip(self.layers, caches)):
                        rows[l + 1][:, :, 0, j] = layer.pixel(cache, rows[l], j)
                    logits = level_logits(self.head(rows[-1][..., j:j + 1]))[:, :, ch, 0, 0]  # (n, 256)
                    level = torch.multinomial(F.softmax(logits, dim=1), 1).squeeze(1)  # (n,)
                    x[:, ch, i, j] = xp[:, ch, i + p, j + p] = to_signed(level)
            for l, (layer, cache) in enumerate(zip(self.layers, caches)):
                layer.end_row(cache, rows[l])
        return x.clamp(-1, 1)
