"""Gated PixelCNN: an autoregressive model of the 8-bit subpixels, one 256-way softmax each.

van den Oord, Kalchbrenner, Vinyals, Espeholt, Graves & Kavukcuoglu (2016), "Conditional Image
Generation with PixelCNN Decoders", NeurIPS.

log P(x) is the sum over subpixels, in raster order and R -> G -> B within a pixel, of the log softmax
of their logits given the subpixels before. Two stacks remove the first PixelCNN's blind spot: a
vertical stack over the rows above, shifted down one row into a horizontal stack over the pixels to the
left; gated layers tanh(W_f * x) * sigmoid(W_g * x), a residual horizontal stack, and colour groups
masked so colour c sees only the colours before it (the network is
``trilemma.models.parts.pixelcnn.GatedPixelCNN``, VLAE's decoder too). Sampling is exact, one pass per
subpixel (NFE = C*H*W) with the network's row and column caches; the depth does not grow with the
image, the sampling steps do.

What this small version changes from the paper: unconditional; far smaller on the CPU presets (6 layers
of 16 maps, receptive field 9 rows up; the paper's large models: 20 layers of 384 maps, 5x5 filters)
with a wide first kernel (7x7, as PixelCNN's mask-A layer) so few layers still see far, and a high
learning rate (5e-3) with gradient-norm clipping; ``mnist_gpu`` has the paper's 20 layers at a third
of its width (128 maps, 3x3 filters), ``cifar10_gpu`` its size (384 maps, 5x5 filters, 116M parameters;
the paper states no count).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trilemma.contract.likelihood import bits_per_dim, categorical_nll, to_signed
from trilemma.contract.family import Capabilities, GenerativeModel
from trilemma.models.parts.pixelcnn import GatedPixelCNN, check_colours, check_config


@dataclass
class Config:
    channels: int = 64  # p: feature maps of each stack (2p before the gate)
    layers: int = 8  # gated layers, the first one (mask A) included
    first_kernel: int = 7  # n of the first layer's n x n receptive field (odd)
    kernel: int = 3  # n of every later layer (odd)
    head_channels: int = 256  # hidden width of the ReLU-1x1-ReLU-1x1 output head
    lr: float = 1e-3  # Adam learning rate
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping

    def __post_init__(self):
        check_config(self, ("channels", "layers", "head_channels"))


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
        # Receptive field: 9 rows up.
        "mnist": dict(channels=16, layers=6, first_kernel=7, head_channels=32, lr=5e-3),
        "cifar10": dict(channels=16, layers=6, first_kernel=7, head_channels=32, lr=5e-3),
        # MNIST: the paper's depth (20 layers) at a third of its width (128 of 384 maps), 3x3 filters;
        # CIFAR-10: its size, 384 maps with 5x5 filters.
        "mnist_gpu": dict(channels=128, layers=20, first_kernel=7, head_channels=256, lr=1e-3),
        "cifar10_gpu": dict(channels=384, layers=20, first_kernel=7, kernel=5, head_channels=256, lr=1e-3),
    }

    def __init__(self, config: Config, data_shape):
        super().__init__(config, data_shape)
        c, p = self.data_shape[0], config.channels
        check_colours("pixelcnn", c, channels=p, head_channels=config.head_channels)
        self.net = GatedPixelCNN(c, p, config.layers, config.first_kernel, config.kernel,
                                 config.head_channels)  # x (B, C, H, W) -> logits (B, 256, C, H, W)

    def logits(self, x_uint8):  # (B, C, H, W) uint8 -> (B, 256, C, H, W)
        return self.net(to_signed(x_uint8))

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

    def generate(self, n, sampler):
        x = torch.zeros(n, *self.data_shape, device=self.device)  # [-1, 1]; unsampled never seen
        return self.net.sample(x).clamp(-1, 1)
