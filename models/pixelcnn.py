"""Gated PixelCNN: an autoregressive model of the 8-bit subpixels, one 256-way softmax each.

van den Oord, Kalchbrenner, Vinyals, Espeholt, Graves & Kavukcuoglu (2016), "Conditional Image
Generation with PixelCNN Decoders", NeurIPS.

    log P(x) = sum over subpixels, in raster order and R -> G -> B within a pixel,
               of log softmax(logits(x_<i))[x_i]

Two stacks of convolutions remove the "blind spot" of the first PixelCNN: a *vertical* stack whose
features at row r see the pixels of rows <= r (left and right), shifted down one row before it feeds the
*horizontal* stack, which sees the pixels to the left in the current row. Each layer is
``tanh(W_f * x) * sigmoid(W_g * x)``, with a residual connection in the horizontal stack. Colours:
the horizontal stack's features are split into C groups (R, G, B); at the current pixel, group c
sees input colours < c in the first layer (mask A) and feature groups <= c afterwards (mask B), so
the logits of colour c depend on the colours before it in the same pixel, never on itself.

What this small version changes from the paper:
    * unconditional (no class or embedding input), and far smaller: the paper's large models have
      20 layers of 384 feature maps with 5x5 filters; the CPU presets have 6 layers of 16 maps
      (receptive field 9 rows up), so that training, NLL and sampling fit a ~100 s budget;
    * the GPU presets (``mnist_gpu``, ``cifar10_gpu``) have the paper's 20 layers at a third of its
      width (128 maps, a head of 256) and 3x3 filters after a 7x7 first layer;
    * the first layer has a wider kernel (as PixelCNN's 7x7 mask-A layer) so that few layers
      still see far; a high learning rate (5e-3) and gradient-norm clipping for the short budget.
Resolution: the network is fully convolutional and its depth does not change with the image size
(the paper applies one architecture to 32x32 and 64x64 ImageNet); what grows with resolution is the
number of sequential sampling steps, C*H*W.

Sampling (one network pass per *subpixel*: NFE = C*H*W). It is exact and uses two caches that follow
from the architecture: the vertical stack only sees rows above, so it is run once per row (on the
few rows its receptive field reaches); per subpixel only the horizontal stack runs, on the pixels
of the current row that its receptive field reaches, and the output head on the current pixel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trilemma.contract.likelihood import bits_per_dim, categorical_nll, to_signed
from trilemma.contract.family import Capabilities, GenerativeModel

NUM_LEVELS = 256  # values of an 8-bit subpixel, one logit each


@dataclass
class Config:
    channels: int = 64  # p: feature maps of each stack (2p before the gate)
    layers: int = 8  # gated layers, the first one (mask A) included
    first_kernel: int = 7  # n of the first layer's n x n receptive field (odd)
    kernel: int = 3  # n of every later layer (odd)
    head_channels: int = 256  # hidden width of the ReLU-1x1-ReLU-1x1 output head
    lr: float = 1e-3  # Adam learning rate
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping


def colour_groups(n: int, colours: int) -> torch.Tensor:
    """Colour group of each of ``n`` features: contiguous blocks, R first. (n,)"""
    return torch.arange(n) * colours // n


def gate(a: torch.Tensor) -> torch.Tensor:
    """tanh(first half) * sigmoid(second half), along channels: (B, 2p, ...) -> (B, p, ...)."""
    f, g = a.chunk(2, dim=1)
    return torch.tanh(f) * torch.sigmoid(g)


class RowConv(nn.Conv2d):
    """A 1 x w convolution over the current pixel and the w-1 pixels to its left (zero padded on
    the left), whose weights at the current pixel are masked by colour group: output group g sees
    input group g' iff g' < g (mask "A") or g' <= g (mask "B"). w = 1 gives a masked 1x1 conv."""

    def __init__(self, cin: int, cout: int, width: int, in_groups, out_groups, mask: str):
        super().__init__(cin, cout, (1, width))
        allowed = out_groups[:, None] > in_groups[None, :] if mask == "A" else \
            out_groups[:, None] >= in_groups[None, :]  # (cout, cin)
        m = torch.ones(cout, cin, 1, width)
        m[:, :, 0, -1] = allowed.float()
        self.register_buffer("mask", m, persistent=False)  # fixed by the config: not state

    def forward(self, x):  # (B, cin, H, W) -> (B, cout, H, W)
        x = F.pad(x, (self.kernel_size[1] - 1, 0, 0, 0))
        return F.conv2d(x, self.weight * self.mask, self.bias)


class GatedLayer(nn.Module):
    """One layer of both stacks (the paper's Figure 2, without conditioning)."""

    def __init__(self, cin: int, p: int, k: int, colours: int, in_groups, mask: str):
        super().__init__()
        self.k, self.residual = k, mask == "B"  # the mask-A layer changes width: no residual
        groups = colour_groups(p, colours)
        # Vertical: a (k//2+1) x k kernel over the current row and the k//2 rows above it.
        self.v_conv = nn.Conv2d(cin, 2 * p, (k // 2 + 1, k))
        # Vertical -> horizontal link: rows above are fully known, so this 1x1 needs no mask.
        self.v_to_h = nn.Conv2d(2 * p, 2 * p, 1)
        self.h_conv = RowConv(cin, 2 * p, k // 2 + 1, in_groups, torch.cat([groups, groups]), mask)
        self.h_out = RowConv(p, p, 1, groups, groups, "B")

    def vertical(self, v):  # (B, cin, H, W) -> next vertical input (B, p, H, W), link (B, 2p, H, W)
        k = self.k
        pre = self.v_conv(F.pad(v, (k // 2, k // 2, k // 2, 0)))  # row r: rows r-k//2 .. r
        # Shift down one row, so that the link at row r has seen only rows < r.
        link = self.v_to_h(F.pad(pre, (0, 0, 1, 0))[:, :, :-1])
        return gate(pre), link

    def horizontal(self, h, link):  # (B, cin, H, W'), (B, 2p, H, W') -> (B, p, H, W')
        out = self.h_out(gate(self.h_conv(h) + link))
        return h + out if self.residual else out


class PixelCNN(GenerativeModel):
    name = "pixelcnn"
    paper = ("van den Oord, Kalchbrenner, Vinyals, Espeholt, Graves & Kavukcuoglu (2016), "
             "Conditional Image Generation with PixelCNN Decoders, NeurIPS")
    family = "AR"
    literature = "Gated PixelCNN"
    capabilities = Capabilities(density="exact", free_form_jacobian=False, sampling="autoregressive")
    Config = Config
    presets = {
        "tiny": dict(channels=12, layers=2, first_kernel=3, head_channels=16),
        # ~100 s on 2 CPU cores: MNIST ~0.5 s a step at batch 64, NLL of the 10k test images
        # ~30 s, 1000 samples ~40 s; CIFAR-10 ~1.4 s a step. Receptive field: 9 rows up.
        "mnist": dict(channels=16, layers=6, first_kernel=7, head_channels=32, lr=5e-3),
        "cifar10": dict(channels=16, layers=6, first_kernel=7, head_channels=32, lr=5e-3),
        # The paper's depth (20 layers) at a third of its width (128 of 384 maps), 3x3 filters.
        "mnist_gpu": dict(channels=128, layers=20, first_kernel=7, head_channels=256, lr=1e-3),
        "cifar10_gpu": dict(channels=128, layers=20, first_kernel=7, head_channels=256, lr=1e-3),
    }

    def __init__(self, config: Config, data_shape):
        super().__init__(config, data_shape)
        c, p = self.data_shape[0], config.channels
        if min(p, config.head_channels) < c:
            raise ValueError(f"pixelcnn: channels ({p}) and head_channels ({config.head_channels}) "
                             f"must be at least the number of colours ({c}): one group per colour")
        kernels = [config.first_kernel] + [config.kernel] * (config.layers - 1)
        self.layers = nn.ModuleList(
            [GatedLayer(c, p, kernels[0], c, torch.arange(c), "A")]
            + [GatedLayer(p, p, k, c, colour_groups(p, c), "B") for k in kernels[1:]])
        hidden = colour_groups(config.head_channels, c)
        self.head1 = RowConv(p, config.head_channels, 1, colour_groups(p, c), hidden, "B")
        # The last layer's logits are ordered (colour, level): logit c*256 + v belongs to colour c.
        self.head2 = RowConv(config.head_channels, c * NUM_LEVELS, 1, hidden,
                             torch.arange(c * NUM_LEVELS) // NUM_LEVELS, "B")
        # How far the receptive field reaches: up (vertical stack + the one-row shift) and left.
        self.reach_up = 1 + sum(k // 2 for k in kernels)
        self.reach_left = sum(k // 2 for k in kernels)

    # --- the network ----------------------------------------------------------------------------
    def vertical_stack(self, x):  # x (B, C, H, W) in [-1, 1] -> one link (B, 2p, H, W) per layer
        links, v = [], x
        for layer in self.layers:
            v, link = layer.vertical(v)
            links.append(link)
        return links

    def horizontal_stack(self, x, links):  # (B, C, H, W'), links -> features (B, p, H, W')
        h = x
        for layer, link in zip(self.layers, links):
            h = layer.horizontal(h, link)
        return h

    def head(self, h):  # (B, p, H, W) -> logits (B, 256, C, H, W)
        out = self.head2(F.relu(self.head1(F.relu(h))))  # (B, C*256, H, W)
        b, _, hh, ww = out.shape
        return out.view(b, -1, NUM_LEVELS, hh, ww).transpose(1, 2)

    def logits(self, x_uint8):  # (B, C, H, W) uint8 -> (B, 256, C, H, W)
        x = to_signed(x_uint8)
        return self.head(self.horizontal_stack(x, self.vertical_stack(x)))

    # --- training and likelihood ----------------------------------------------------------------
    def configure_optimizers(self):
        return {"model": torch.optim.Adam(self.parameters(), lr=self.config.lr)}

    def loss(self, x):  # bits/dim of the batch, logged as "loss"; clipped to Config.grad_clip
        return {"model": bits_per_dim(categorical_nll(self.logits(x), x).mean(), self.num_dims)}

    def nll(self, x):  # exact -log P(x) in nats, (B,)
        # In chunks: the logits are 256 floats per subpixel (800 MB for 1000 MNIST images), and
        # past ~128 images a CPU spends its time moving them rather than computing.
        return torch.cat([categorical_nll(self.logits(c), c) for c in x.split(128)])

    # --- sampling -------------------------------------------------------------------------------
    def samplers(self):
        c, h, w = self.data_shape
        return {"ancestral": c * h * w}  # one pass of the horizontal stack + head per subpixel

    @torch.no_grad()
    def generate(self, n, sampler):
        c, height, width = self.data_shape
        x = torch.zeros(n, c, height, width, device=self.device)  # [-1, 1]; unsampled never seen
        for i in range(height):
            # The vertical stack for row i sees rows i-reach_up .. i-1 only: run it on that band.
            top = max(0, i - self.reach_up)
            links = [link[:, :, -1:] for link in self.vertical_stack(x[:, :, top:i + 1])]  # (n, 2p, 1, W)
            for j in range(width):
                left = max(0, j - self.reach_left)  # the horizontal stack sees columns left .. j
                for ch in range(c):
                    h = self.horizontal_stack(x[:, :, i:i + 1, left:j + 1],
                                              [link[..., left:j + 1] for link in links])
                    logits = self.head(h[..., -1:])[:, :, ch, 0, 0]  # (n, 256)
                    level = torch.multinomial(F.softmax(logits, dim=1), 1).squeeze(1)  # (n,)
                    x[:, ch, i, j] = to_signed(level)
        return x.clamp(-1, 1)
