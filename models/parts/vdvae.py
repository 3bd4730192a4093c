"""The VD-VAE network (Child 2021): a bottom-up encoder and a top-down path shared by inference and
generation, shared by the VD-VAE family and VAEBM (its hierarchical VAE).

    Block            the residual bottleneck of every part of the network
    DecBlock         one stochastic layer (latent group) of the top-down path
    Output           final state -> a discretized logistic mixture per subpixel
    HierarchicalVAE  encoder, top-down path and output, with the -ELBO
    sample_mixture   a draw of the output mixture

``trilemma.models.vdvae`` describes the design and what it changes from the paper. ``top_down`` takes
the standard-normal noise of every latent group (``eps``) where a caller moves it itself (VAEBM's
Langevin chains): z_l = p_mean + p_std * eps_l, a deterministic function of eps.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trilemma.contract.likelihood import discretized_mixture_logistic_nll, to_signed
from trilemma.models.blocks import gaussian_kl, halvings


def blocks_at(n: int, side: int, full: int) -> int:
    """Blocks at a resolution: about proportional to its side, as the paper's layout, at least 1."""
    return max(1, round(n * side / full))


class Block(nn.Module):
    """The residual bottleneck: GELU -> 1x1 -> GELU -> 3x3 -> GELU -> 3x3 -> GELU -> 1x1 (biases 0)."""

    def __init__(self, cin: int, mid: int, cout: int, use_3x3: bool, residual: bool = False,
                 zero_last: bool = False):
        super().__init__()
        k = 3 if use_3x3 else 1
        self.convs = nn.ModuleList([nn.Conv2d(cin, mid, 1), nn.Conv2d(mid, mid, k, padding=k // 2),
                                    nn.Conv2d(mid, mid, k, padding=k // 2), nn.Conv2d(mid, cout, 1)])
        for conv in self.convs:
            nn.init.zeros_(conv.bias)
        if zero_last:
            nn.init.zeros_(self.convs[-1].weight)
        self.residual = residual

    def scale_last(self, factor: float):  # the paper's 1/sqrt(depth) initialisation
        self.convs[-1].weight.data *= factor

    def forward(self, x):
        h = x
        for conv in self.convs:
            h = conv(F.gelu(h))
        return x + h if self.residual else h


class DecBlock(nn.Module):
    """One stochastic layer of the top-down path (see ``trilemma.models.vdvae``)."""

    def __init__(self, width: int, mid: int, zdim: int, use_3x3: bool, depth: int):
        super().__init__()
        self.zdim, self.width = zdim, width
        self.posterior = Block(2 * width, mid, 2 * zdim, use_3x3)
        self.prior = Block(width, mid, 2 * zdim + width, use_3x3, zero_last=True)
        self.z_proj = nn.Conv2d(zdim, width, 1)
        nn.init.zeros_(self.z_proj.bias)
        self.z_proj.weight.data *= math.sqrt(1 / depth)
        self.resnet = Block(width, mid, width, use_3x3, residual=True)
        self.resnet.scale_last(math.sqrt(1 / depth))

    def forward(self, x, acts=None, temperature: float = 1.0, eps=None):
        """State x (B, width, h, w) and encoder activations (or None: sample the prior, with the
        standard-normal noise ``eps`` (B, zdim, h, w) if given) -> new state, and this layer's KL per
        image (B,) (None when sampling)."""
        p_mean, p_logstd, dx = self.prior(x).split([self.zdim, self.zdim, self.width], dim=1)
        kl = None
        if acts is None:  # generation: z ~ p(z_l | z_<l), its std times the temperature
            noise = torch.randn_like(p_mean) if eps is None else eps
            z = p_mean + torch.exp(p_logstd) * temperature * noise
        else:  # inference: z ~ q(z_l | z_<l, x), from the state before the prior's update
            q_mean, q_logstd = self.posterior(torch.cat([x, acts], dim=1)).chunk(2, dim=1)
            z = q_mean + torch.exp(q_logstd) * torch.randn_like(q_mean)
            kl = gaussian_kl(q_mean, 2 * q_logstd, p_mean, 2 * p_logstd).flatten(1).sum(1)
        return self.resnet(x + dx + self.z_proj(z)), kl


class Output(nn.Module):
    """Final state (B, width, H, W) -> mixture parameters, each (B, K, C, H, W): a learned per-channel
    gain and bias, then a 1x1 convolution to logits, means and log-scales."""

    def __init__(self, width: int, shape: tuple[int, int, int], mixtures: int, min_log_scale: float):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1, width, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, width, 1, 1))
        self.conv = nn.Conv2d(width, 3 * mixtures * shape[0], 1)
        self.shape, self.mixtures, self.min_log_scale = shape, mixtures, min_log_scale

    def forward(self, x):
        out = self.conv(x * self.gain + self.bias)  # (B, 3 * K * C, H, W)
        logits, means, log_scales = out.view(len(x), 3, self.mixtures, *self.shape).unbind(1)
        return logits, means, log_scales.clamp_min(self.min_log_scale)


def sample_mixture(logits, means, log_scales) -> torch.Tensor:
    """A draw of the discretized mixture, each (B, K, C, H, W): a component per subpixel, then its
    logistic by the inverse CDF, clamped to [-1, 1] (the outer bins)."""
    k = torch.distributions.Categorical(logits=logits.movedim(1, -1)).sample().unsqueeze(1)  # (B, 1, C, H, W)
    mean, log_scale = means.gather(1, k).squeeze(1), log_scales.gather(1, k).squeeze(1)
    u = torch.rand_like(mean).clamp(1e-5, 1 - 1e-5)
    return (mean + torch.exp(log_scale) * (torch.log(u) - torch.log1p(-u))).clamp(-1, 1)


class HierarchicalVAE(nn.Module):
    """The encoder at every resolution (full, halved while ``halvings`` allows, then 1x1), the
    top-down decoder from 1x1 to full resolution (a learned initial state per resolution plus the
    coarser state upsampled, then its stochastic layers) and the output mixture."""

    def __init__(self, shape: tuple[int, int, int], width: int, bottleneck: float, zdim: int,
                 dec_blocks: int, enc_blocks: int, mixtures: int, min_log_scale: float):
        super().__init__()
        c, h, w = shape
        mid = int(width * bottleneck)
        # Resolutions, full to coarsest: halved while `halvings` allows, then 1x1.
        self.sizes = [(h >> k, w >> k) for k in range(halvings(h, w) + 1)] + [(1, 1)]
        self.zdim = zdim
        enc_counts = [blocks_at(enc_blocks, s[0], h) for s in self.sizes]
        dec_counts = [blocks_at(dec_blocks, s[0], h) for s in self.sizes]
        self.in_conv = nn.Conv2d(c, width, 3, padding=1)
        self.encoder = nn.ModuleList(
            nn.ModuleList(Block(width, mid, width, min(s) > 2, residual=True) for _ in range(n))
            for s, n in zip(self.sizes, enc_counts))
        for block in (b for stage in self.encoder for b in stage):
            block.scale_last(math.sqrt(1 / sum(enc_counts)))
        # The decoder's stages, coarsest first, each a learned initial state and its layers.
        self.biases = nn.ParameterList(torch.zeros(1, width, *s) for s in reversed(self.sizes))
        self.decoder = nn.ModuleList(
            nn.ModuleList(DecBlock(width, mid, zdim, min(s) > 2, sum(dec_counts)) for _ in range(n))
            for s, n in zip(reversed(self.sizes), reversed(dec_counts)))
        self.output = Output(width, shape, mixtures, min_log_scale)

    @property
    def stochastic_layers(self) -> int:
        return sum(len(stage) for stage in self.decoder)

    def latent_shapes(self) -> list[tuple[int, int, int]]:
        """The shape (zdim, h, w) of each stochastic layer's latents, top first (as ``top_down``'s eps)."""
        return [(self.zdim, *bias.shape[2:]) for bias, stage in zip(self.biases, self.decoder) for _ in stage]

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[-1, 1] images -> activations at every resolution, coarsest first (as the decoder reads them)."""
        h, acts = self.in_conv(x), []
        for size, stage in zip(self.sizes, self.encoder):
            if h.shape[2:] != size:  # halve, or average down to 1x1
                h = F.avg_pool2d(h, (h.shape[2] // size[0], h.shape[3] // size[1]))
            for block in stage:
                h = block(h)
            acts.append(h)
        return acts[::-1]

    def top_down(self, n: int, acts=None, temperature: float = 1.0, eps=None):
        """The decoder: -> mixture parameters (logits, means, log-scales), each (n, K, C, H, W), and
        the KL of every stochastic layer, top first (empty when sampling the prior, acts=None).
        ``eps``: when sampling, the standard-normal noise of every layer (``latent_shapes``), top first."""
        x, kls, j = None, [], 0
        for i, (bias, stage) in enumerate(zip(self.biases, self.decoder)):
            start = bias.expand(n, -1, -1, -1)
            x = start if x is None else start + F.interpolate(x, size=bias.shape[2:], mode="nearest")
            for layer in stage:
                noise = None if eps is None else eps[j]
                x, kl = layer(x, None if acts is None else acts[i], temperature, noise)
                kls.append(kl)
                j += 1
        return self.output(x), kls if acts is not None else []

    def negative_elbo(self, x: torch.Tensor) -> dict:
        """One-sample -ELBO of uint8 ``x`` in nats per image, (B,), with its reconstruction term and
        the closed-form KL of each stochastic layer (a list, top first)."""
        mixture, kls = self.top_down(len(x), self.encode(to_signed(x)))
        rec = discretized_mixture_logistic_nll(x, *mixture)  # -log p(x|z), (B,)
        kl = torch.stack(kls).sum(0)  # (B,)
        return {"loss": rec + kl, "rec": rec, "kl": kl, "kl_layers": kls}
