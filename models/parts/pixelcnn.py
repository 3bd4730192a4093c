"""The Gated PixelCNN as a network (van den Oord et al. 2016, "Conditional Image Generation with
PixelCNN Decoders"), shared by the autoregressive families and the VLAE's decoder.

    RowConv, GatedLayer   a 1 x w convolution masked by colour group; one layer of both stacks
    GatedStacks           the vertical and horizontal stacks (pixelcnn, pixeliqn, vlae)
    MaskedHead            the ReLU-1x1-ReLU-1x1 output head, colour c seeing groups <= c (all four)
    GatedPixelCNN         stacks + a 256-way head per subpixel, optionally conditioned through the
                          links, with the exact cached sampler (pixelcnn, vlae)
    check_config,         the range checks of these families' settings (sizes, odd kernels) and of
    check_colours         one feature group per colour

Colours: features are split into C contiguous groups (R, G, B); at the current pixel, group c sees
input colours < c in the first layer (mask A) and feature groups <= c afterwards (mask B). The
family files' docstrings describe the architecture and what each changes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trilemma.contract.likelihood import to_signed
from trilemma.models.blocks import at_least, positive

NUM_LEVELS = 256  # values of an 8-bit subpixel, one logit each


# --- checks of the families' settings, shared ---------------------------------------------------------
def check_config(cfg, sizes: tuple[str, ...]) -> None:
    """``__post_init__`` checks of a Config built on these layers: ``sizes`` >= 1, ``first_kernel`` and
    ``kernel`` odd (the masks assume a centre column), ``lr`` > 0 and ``grad_clip`` >= 0."""
    at_least(cfg, 1, *sizes)
    for key in ("first_kernel", "kernel"):
        if getattr(cfg, key) < 1 or getattr(cfg, key) % 2 == 0:
            raise ValueError(f"'{key}' must be an odd number >= 1")
    positive(cfg, "lr")
    at_least(cfg, 0, "grad_clip")


def check_colours(family: str, colours: int, **widths: int) -> None:
    """One feature group per colour: each of ``widths`` (Config keys and their values) must be >= C."""
    if min(widths.values()) < colours:
        given = " and ".join(f"{key} ({value})" for key, value in widths.items())
        raise ValueError(f"{family}: {given} must be at least the number of colours ({colours}): "
                         "one group per colour")


# --- the layers --------------------------------------------------------------------------------------
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


class GatedStacks(nn.ModuleList):
    """The gated layers: a mask-A layer of ``first_kernel`` on the C colours, then ``layers - 1``
    mask-B layers of ``kernel`` on p features. A family conditions them by adding a term to each
    layer's link (the location-dependent conditioning of the paper)."""

    def __init__(self, colours: int, p: int, layers: int, first_kernel: int, kernel: int):
        kernels = [first_kernel] + [kernel] * (layers - 1)
        groups = colour_groups(p, colours)
        super().__init__([GatedLayer(colours, p, kernels[0], colours, torch.arange(colours), "A")]
                         + [GatedLayer(p, p, k, colours, groups, "B") for k in kernels[1:]])
        # How far the receptive field reaches: up (vertical stack + the one-row shift) and left.
        self.reach_up = 1 + sum(k // 2 for k in kernels)
        self.reach_left = sum(k // 2 for k in kernels)

    def vertical(self, x):  # x (B, C, H, W) in [-1, 1] -> one link (B, 2p, H, W) per layer
        links, v = [], x
        for layer in self:
            v, link = layer.vertical(v)
            links.append(link)
        return links

    def horizontal(self, x, links):  # (B, C, H, W'), links -> features (B, p, H, W')
        h = x
        for layer, link in zip(self, links):
            h = layer.horizontal(h, link)
        return h


class MaskedHead(nn.Module):
    """ReLU, masked 1x1, ReLU, masked 1x1: features (B, p, H, W) -> (B, C*outputs, H, W), ordered
    (colour, output), the outputs of colour c seeing feature groups <= c at the current pixel."""

    def __init__(self, p: int, hidden: int, colours: int, outputs: int):
        super().__init__()
        groups = colour_groups(hidden, colours)
        self.head1 = RowConv(p, hidden, 1, colour_groups(p, colours), groups, "B")
        self.head2 = RowConv(hidden, colours * outputs, 1, groups,
                             torch.arange(colours * outputs) // outputs, "B")

    def forward(self, h):
        return self.head2(F.relu(self.head1(F.relu(h))))


def level_logits(out: torch.Tensor) -> torch.Tensor:
    """A 256-output head's (B, C*256, H, W) -> logits (B, 256, C, H, W)."""
    b, _, hh, ww = out.shape
    return out.view(b, -1, NUM_LEVELS, hh, ww).transpose(1, 2)


class GatedPixelCNN(nn.Module):
    """x (B, C, H, W) in [-1, 1] -> logits (B, 256, C, H, W) of each subpixel given the ones before
    it (raster order, R -> G -> B), plus, if given, one conditioning term per layer (B, 2p, H, W)."""

    def __init__(self, colours: int, p: int, layers: int, first_kernel: int, kernel: int,
                 head_channels: int):
        super().__init__()
        self.layers = GatedStacks(colours, p, layers, first_kernel, kernel)
        self.head = MaskedHead(p, head_channels, colours, NUM_LEVELS)
        self.reach_up, self.reach_left = self.layers.reach_up, self.layers.reach_left

    def forward(self, x, conditions=None):
        links = self.layers.vertical(x)
        if conditions is not None:
            links = [link + s for link, s in zip(links, conditions)]
        return level_logits(self.head(self.layers.horizontal(x, links)))

    @torch.no_grad()
    def sample(self, x, conditions=None):
        """Draw the subpixels of ``x`` (n, C, H, W) in [-1, 1] in order, in place; returns x.

        Exact, with two caches that follow from the architecture: the vertical stack only sees rows
        above, so it runs once per row on the rows its field reaches; per subpixel only the
        horizontal stack runs, on the columns its field reaches, and the head on the current pixel.
        """
        c, height, width = x.shape[1:]
        for i in range(height):
            top = max(0, i - self.reach_up)  # the vertical stack for row i sees rows top .. i-1
            links = [link[:, :, -1:] for link in self.layers.vertical(x[:, :, top:i + 1])]  # (n, 2p, 1, W)
            if conditions is not None:
                links = [link + s[:, :, i:i + 1] for link, s in zip(links, conditions)]
            for j in range(width):
                left = max(0, j - self.reach_left)  # the horizontal stack sees columns left .. j
                for ch in range(c):
                    h = self.layers.horizontal(x[:, :, i:i + 1, left:j + 1],
                                               [link[..., left:j + 1] for link in links])
                    logits = level_logits(self.head(h[..., -1:]))[:, :, ch, 0, 0]  # (n, 256)
                    level = torch.multinomial(F.softmax(logits, dim=1), 1).squeeze(1)  # (n,)
                    x[:, ch, i, j] = to_signed(level)
        return x
