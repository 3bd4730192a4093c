"""PixelRNN (Row LSTM): an autoregressive model of the 8-bit subpixels with row-wise recurrent layers.

van den Oord, Kalchbrenner & Kavukcuoglu (2016), "Pixel Recurrent Neural Networks", ICML.

    log P(x) = sum over subpixels, in raster order and R -> G -> B within a pixel,
               of log softmax(logits(x_<i))[x_i]

This is the paper's **Row LSTM** (not the Diagonal BiLSTM). Each layer is an LSTM that runs down
the image one row at a time and computes a whole row at once. Its gates for row i are

    [o, f, i, g] = sigma(K_ss (*) h_{i-1}  +  K_is (*) x_i)        (tanh for g)
    c_i = f . c_{i-1} + i . g,      h_i = o . tanh(c_i)

with a 1 x 3 *state-to-state* convolution K_ss over the previous row's hidden state (the paper's
"3 x 1" kernel: columns j-1, j, j+1 of row i-1, all already generated, so unmasked) and a *masked*
1 x k input-to-state convolution K_is over the current row (columns j-k//2 .. j, masked at the
current pixel by colour). The receptive field is the paper's triangle above the pixel. Layers are
joined by residual connections (a masked 1x1 convolution of h_i, added to the layer's input); the
first layer is a k x k mask-A convolution and the output a ReLU-1x1-ReLU-1x1 head with a 256-way
softmax per subpixel. Colours as in PixelCNN: features split into C groups (R, G, B); at the
current pixel group c sees input colours < c (mask A, first layer) and groups <= c afterwards
(mask B). The masked convolutions are PixelCNN's (``trilemma.models.pixelcnn.RowConv``).

What the small version changes from the paper:
    * width and depth: the CPU presets have 2 Row LSTM layers of 24 features (the paper's
      CIFAR-10 Row LSTM, as we read its Table 5 / section 5, has 12 layers of h = 128); the
      ``_gpu`` presets have 6 layers of 64 / 128 features (half of that depth, at its width for
      CIFAR-10) so that the sequential row loop stays affordable;
    * a smaller first kernel (5x5 instead of 7x7 on MNIST), Adam at a high learning rate and
      gradient-norm clipping for the short budget (the paper used RMSProp).
The literature row's 3.00 bits/dim is the Diagonal BiLSTM's; the paper's Row LSTM scored 3.07.

Cost: training runs H sequential row steps per layer (each a convolution over a whole row), the
recurrence the paper traded against PixelCNN's parallelism. Sampling is exact and incremental, one
step per *subpixel* (NFE = C*H*W): at each step every layer computes only the current pixel's cell
(its input-to-state convolution on the few columns to the left, its state-to-state term read from a
per-row cache computed once from the finished row above), then the head at that pixel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trilemma.contract.family import Capabilities, GenerativeModel
from trilemma.contract.likelihood import bits_per_dim, categorical_nll, to_signed
from trilemma.models.pixelcnn import RowConv, colour_groups

NUM_LEVELS = 256  # values of an 8-bit subpixel, one logit each


@dataclass
class Config:
    hidden: int = 32  # h: features of every Row LSTM layer (its input, state and output)
    layers: int = 2  # Row LSTM layers
    first_kernel: int = 5  # k of the first k x k mask-A convolution (odd)
    kernel: int = 3  # k of the masked 1 x k input-to-state convolution (odd: columns j-k//2 .. j)
    head_channels: int = 64  # hidden width of the ReLU-1x1-ReLU-1x1 output head
    lr: float = 3e-3  # Adam learning rate
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping

    def __post_init__(self):
        for key in ("hidden", "layers", "head_channels"):
            if getattr(self, key) < 1:
                raise ValueError(f"'{key}' must be >= 1")
        for key in ("first_kernel", "kernel"):
            if getattr(self, key) < 1 or getattr(self, key) % 2 == 0:
                raise ValueError(f"'{key}' must be an odd number >= 1")
        if self.lr <= 0:
            raise ValueError("'lr' must be > 0")
        if self.grad_clip < 0:
            raise ValueError("'grad_clip' must be >= 0")


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


class RowLSTM(nn.Module):
    """One Row LSTM layer with its residual connection."""

    def __init__(self, h: int, k: int, colours: int):
        super().__init__()
        groups = colour_groups(h, colours)
        self.input_to_state = RowConv(h, 4 * h, k // 2 + 1, groups, groups.repeat(4), "B")
        self.state_to_state = nn.Conv1d(h, 4 * h, 3, padding=1)  # row i-1's h, columns j-1..j+1
        self.out = RowConv(h, h, 1, groups, groups, "B")

    @staticmethod
    def cell(gates, c_prev):  # (B, 4h, ...), (B, h, ...) -> h, c
        o, f, i, g = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c_prev + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c

    def forward(self, x):  # (B, h, H, W) -> (B, h, H, W)
        b, h, height, width = x.shape
        pre = self.input_to_state(x)  # (B, 4h, H, W): the masked part, for all rows at once
        state = c = x.new_zeros(b, h, width)
        rows = []
        for i in range(height):  # the recurrence: one whole row per step
            state, c = self.cell(pre[:, :, i] + self.state_to_state(state), c)
            rows.append(state)
        return x + self.out(torch.stack(rows, dim=2))


class PixelRNN(GenerativeModel):
    name = "pixelrnn"
    paper = ("van den Oord, Kalchbrenner & Kavukcuoglu (2016), Pixel Recurrent Neural Networks, ICML "
             "(the Row LSTM)")
    family = "AR"
    literature = "PixelRNN"
    capabilities = Capabilities(density="exact", free_form_jacobian=False, sampling="autoregressive")
    Config = Config
    presets = {
        "tiny": dict(hidden=12, layers=2, first_kernel=3, head_channels=16),
        "mnist": dict(hidden=24, layers=2, first_kernel=5, head_channels=32, lr=3e-3),
        "cifar10": dict(hidden=24, layers=2, first_kernel=5, head_channels=48, lr=3e-3),
        "mnist_gpu": dict(hidden=64, layers=6, first_kernel=7, head_channels=256, lr=1e-3),
        "cifar10_gpu": dict(hidden=128, layers=6, first_kernel=7, head_channels=512, lr=5e-4),
    }

    def __init__(self, config: Config, data_shape):
        super().__init__(config, data_shape)
        c, h = self.data_shape[0], config.hidden
        if min(h, config.head_channels) < c:
            raise ValueError(f"pixelrnn: hidden ({h}) and head_channels ({config.head_channels}) must be "
                             f"at least the number of colours ({c}): one group per colour")
        groups, hidden = colour_groups(h, c), colour_groups(config.head_channels, c)
        self.first = FirstConv(c, h, config.first_kernel, groups)
        self.layers = nn.ModuleList([RowLSTM(h, config.kernel, c) for _ in range(config.layers)])
        self.head1 = RowConv(h, config.head_channels, 1, groups, hidden, "B")
        # Logits ordered (colour, level): logit c*256 + v belongs to colour c.
        self.head2 = RowConv(config.head_channels, c * NUM_LEVELS, 1, hidden,
                             torch.arange(c * NUM_LEVELS) // NUM_LEVELS, "B")

    # --- the network ----------------------------------------------------------------------------
    def head(self, h):  # (B, h, H, W) -> logits (B, 256, C, H, W)
        out = self.head2(F.relu(self.head1(F.relu(h))))  # (B, C*256, H, W)
        b, _, hh, ww = out.shape
        return out.view(b, -1, NUM_LEVELS, hh, ww).transpose(1, 2)

    def features(self, x):  # x (B, C, H, W) in [-1, 1] -> (B, h, H, W)
        h = self.first(self.first.pad(x))
        for layer in self.layers:
            h = layer(h)
        return h

    def logits(self, x_uint8):  # (B, C, H, W) uint8 -> (B, 256, C, H, W)
        return self.head(self.features(to_signed(x_uint8)))

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
        hid, k0 = self.config.hidden, self.config.first_kernel
        reach = self.config.kernel // 2  # input-to-state columns left of the current pixel
        x = torch.zeros(n, c, height, width, device=self.device)  # [-1, 1]; unsampled never seen
        xp = self.first.pad(x)  # padded copy the first convolution reads (written as x is)
        p = k0 // 2
        zeros = x.new_zeros(n, hid, width)
        prev_h = [zeros] * len(self.layers)  # each layer's h and c of the finished row above (n, h, W)
        prev_c = [zeros] * len(self.layers)
        for i in range(height):
            # The state-to-state term of row i, from the complete row i-1: once per row.
            ss = [layer.state_to_state(hp) for layer, hp in zip(self.layers, prev_h)]  # (n, 4h, W)
            inputs = [x.new_zeros(n, hid, 1, width) for _ in range(len(self.layers) + 1)]
            row_h = [x.new_zeros(n, hid, width) for _ in self.layers]
            row_c = [x.new_zeros(n, hid, width) for _ in self.layers]
            for j in range(width):
                left = max(0, j - reach)
                for ch in range(c):
                    # Every layer's cell at (i, j) only; recomputed per colour as x[i, j] fills in.
                    inputs[0][..., j:j + 1] = self.first(xp[:, :, i:i + p + 1, j:j + 2 * p + 1])
                    for l, layer in enumerate(self.layers):
                        pre = layer.input_to_state(inputs[l][..., left:j + 1])[:, :, 0, -1]  # (n, 4h)
                        h_new, c_new = layer.cell(pre + ss[l][:, :, j], prev_c[l][:, :, j])
                        row_h[l][:, :, j], row_c[l][:, :, j] = h_new, c_new
                        inputs[l + 1][..., j] = inputs[l][..., j] + layer.out(h_new[:, :, None, None])[..., 0]
                    logits = self.head(inputs[-1][..., j:j + 1])[:, :, ch, 0, 0]  # (n, 256)
                    level = torch.multinomial(F.softmax(logits, dim=1), 1).squeeze(1)  # (n,)
                    x[:, ch, i, j] = xp[:, ch, i + p, j + p] = to_signed(level)
            prev_h, prev_c = row_h, row_c
        return x.clamp(-1, 1)
