"""IGEBM: an energy-based model trained by contrastive divergence with short-run Langevin dynamics.

Paper: Yilun Du and Igor Mordatch, 2019, "Implicit Generation and Generalization in Energy-Based
Models", Advances in Neural Information Processing Systems (NeurIPS 32).

The model is one scalar energy E(x) from a spectrally normalised convolutional ResNet; the density
p(x) ~ exp(-E(x)) is never normalised, so there is no likelihood (density "none"). Training lowers
the energy of data and raises the energy of the model's own samples (contrastive divergence,
sec. 2.3 of the paper):

    L = E(x+) - E(x-) + alpha * (E(x+)^2 + E(x-)^2)

where x- comes from K steps of Langevin dynamics on E, started from a replay buffer of earlier
samples (95%) or from uniform noise (5%), and the alpha term keeps the energies near zero.

Sampling: the default sampler ("langevin") starts from uniform noise and runs `sample_steps`
Langevin steps, so it measures what the energy function alone can generate. "replay_buffer"
continues random chains of the replay buffer for `langevin_steps` steps, as the paper's figures
partly do; its NFE counts only those steps, not the chain's history (each buffer entry has already
had many training-time steps), so it flatters the model. Each Langevin step is one forward and one
backward pass of the energy network (NFE = steps; one NFE costs about two forward passes).

What this small version changes from the paper:
    * images live in [-1, 1] (the paper used [0, 1]); step size, gradient clip and noise are quoted
      on this scale (the paper's 10, 0.01 and 0.005 become 40, 0.005 and 0.01, the Config defaults);
    * the CPU presets use a much narrower net with one block per level, 10 Langevin steps instead
      of 60, a buffer of 500 instead of 10,000 (each chain is continued often in a short run) and a
      larger learning rate (see `presets`);
    * the GPU presets (``mnist_gpu``, ``cifar10_gpu``) are the paper's CIFAR-10 model: 128 stem
      channels capped at 256, two blocks per level, 60 Langevin steps per update, a buffer of
      10,000 and lr 1e-4 (the Config defaults);
    * a downsampling block pools before its convolutions, not after (see `ResBlock`);
    * the parameter gradient is clipped by global norm; no class conditioning, no data
      augmentation of the buffer.

Resolution: like the paper's CIFAR-10 ResNet (32 -> 16 -> 8 -> 4) and its larger ImageNet ResNets,
one level per halving of the image, halving while the side is even and above 4 (28 -> 14 -> 7;
16 -> 8 -> 4; 64 -> ... -> 4); a level is a downsampling residual block followed by
`blocks_per_level - 1` plain ones, and channels double at each level up to `max_channels`. The
final feature map is summed over positions (global sum pooling, as in the paper) and mapped to E.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from trilemma.contract.likelihood import dequantize
from trilemma.contract.family import Capabilities, GenerativeModel
from trilemma.models.blocks import halvings


@dataclass
class Config:
    channels: int = 128  # channels of the stem; doubled at each level (paper: 128)
    max_channels: int = 256  # cap on the doubling (paper: 256)
    blocks_per_level: int = 2  # residual blocks per resolution, the first one downsamples (paper: 2)
    activation: Literal["leaky_relu", "swish"] = "leaky_relu"  # "leaky_relu" (slope 0.2) or "swish"; both appear in the paper's code
    spectral_norm: bool = True  # spectral normalisation of every layer, as in the paper (smooth energy)
    langevin_steps: int = 60  # K, Langevin steps per training iteration (paper: 60)
    step_size: float = 40.0  # x <- x - step_size * clip(dE/dx) + noise * N(0, I) (paper: 10 on [0, 1])
    grad_clip_langevin: float = 0.005  # per-pixel clip of dE/dx (paper's code: proj_norm 0.01 on [0, 1])
    noise: float = 0.01  # standard deviation of the Langevin noise (paper: 0.005 on [0, 1])
    sample_steps: int = 60  # Langevin steps of the default (from-noise) sampler
    buffer_size: int = 10000  # replay buffer entries (paper: 10,000)
    restart_prob: float = 0.05  # fraction of chains restarted from uniform noise (paper: 5%)
    alpha: float = 1.0  # weight of the L2 energy regulariser E+^2 + E-^2 (paper: 1)
    lr: float = 1e-4  # Adam learning rate (paper: 1e-4)
    beta1: float = 0.0  # Adam beta1 (paper: 0.0; momentum destabilises EBM training)
    beta2: float = 0.999  # Adam beta2
    grad_clip: float = 1.0  # max global norm of the parameter gradient (0 disables; not in the paper)


def _sn(layer: nn.Module, enabled: bool) -> nn.Module:
    return spectral_norm(layer) if enabled else layer


class ResBlock(nn.Module):
    """Pre-activation residual block, optionally halving the resolution with average pooling.

    The paper pools after the two convolutions; here a downsampling block pools first, so both of
    its convolutions run at the lower resolution (4x cheaper; every Langevin step pays for it).
    """

    def __init__(self, c_in: int, c_out: int, downsample: bool, act, sn: bool):
        super().__init__()
        self.act, self.downsample = act, downsample
        self.conv1 = _sn(nn.Conv2d(c_in, c_out, 3, padding=1), sn)
        self.conv2 = _sn(nn.Conv2d(c_out, c_out, 3, padding=1), sn)
        self.skip = _sn(nn.Conv2d(c_in, c_out, 1), sn) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample:
            x = F.avg_pool2d(x, 2)  # (B, c_in, H/2, W/2)
        h = self.conv2(self.act(self.conv1(self.act(x))))  # (B, c_out, H', W')
        return self.skip(x) + h


class EnergyNet(nn.Module):
    """x (B, C, H, W) in [-1, 1] -> energy (B,); low energy = likely."""

    def __init__(self, cfg: Config, data_shape: tuple[int, int, int]):
        super().__init__()
        c, h, _ = data_shape
        if cfg.activation == "leaky_relu":
            act = lambda t: F.leaky_relu(t, 0.2)  # noqa: E731
        elif cfg.activation == "swish":
            act = F.silu
        else:
            raise ValueError(f"activation must be 'leaky_relu' or 'swish', got {cfg.activation!r}")
        self.act = act
        self.stem = _sn(nn.Conv2d(c, cfg.channels, 3, padding=1), cfg.spectral_norm)
        blocks, ch = [], cfg.channels
        # One level per halving (see the module docstring): a downsampling block, then plain blocks.
        for _ in range(halvings(h, data_shape[2])):
            out = min(ch * 2, cfg.max_channels)
            blocks.append(ResBlock(ch, out, True, act, cfg.spectral_norm))
            blocks += [ResBlock(out, out, False, act, cfg.spectral_norm)
                       for _ in range(cfg.blocks_per_level - 1)]
            ch = out
        self.blocks = nn.Sequential(*blocks)
        self.head = _sn(nn.Linear(ch, 1), cfg.spectral_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(x))  # (B, ch, h0, w0)
        h = self.act(h).sum(dim=(2, 3))  # (B, ch): global sum pooling
        return self.head(h).squeeze(1)  # (B,)


class IGEBM(GenerativeModel):
    name = "igebm"
    paper = ("Yilun Du and Igor Mordatch, 2019. Implicit Generation and Generalization in "
             "Energy-Based Models. NeurIPS 2019.")
    family = "EBM"
    literature = "IGEBM"
    capabilities = Capabilities(density="none", free_form_jacobian=True, sampling="mcmc")
    Config = Config
    presets = {
        # The paper's CIFAR-10 ResNet and Langevin schedule (the Config defaults), on a GPU.
        "mnist_gpu": dict(),
        "cifar10_gpu": dict(),
        "tiny": dict(channels=8, max_channels=16, blocks_per_level=1, langevin_steps=3,
                     sample_steps=4, buffer_size=32),
        # ~100 s of CPU training buys only a few hundred updates, so: a narrow net (one block per
        # level), 10 Langevin steps, a buffer of 500 so that each chain is continued many times,
        # and a 10x learning rate. The small net's input gradients are ~1e-3 per pixel, so the
        # step is larger (200) and the clip smaller (0.001), keeping the paper's largest move per
        # step (0.2 on [-1, 1]).
        "mnist": dict(channels=8, max_channels=32, blocks_per_level=1, langevin_steps=10,
                      step_size=200.0, grad_clip_langevin=0.001, sample_steps=40,
                      buffer_size=500, lr=1e-3),
        "cifar10": dict(channels=8, max_channels=64, blocks_per_level=1, langevin_steps=10,
                        step_size=200.0, grad_clip_langevin=0.001, sample_steps=40,
                        buffer_size=500, lr=1e-3),
    }

    def __init__(self, config: Config, data_shape: tuple[int, int, int]):
        super().__init__(config, data_shape)
        self.energy = EnergyNet(config, self.data_shape)
        # Replay buffer of past negative samples, in [-1, 1]; a buffer so checkpoints hold it.
        # It starts as uniform noise, i.e. every chain's first visit is a restart.
        self.register_buffer("replay", torch.rand(config.buffer_size, *self.data_shape) * 2 - 1)

    def configure_optimizers(self):
        cfg = self.config
        return {"energy": torch.optim.Adam(self.energy.parameters(), lr=cfg.lr,
                                           betas=(cfg.beta1, cfg.beta2))}

    def langevin(self, x: torch.Tensor, steps: int, noise: bool = True) -> torch.Tensor:
        """Run `steps` Langevin steps on E from x (B, C, H, W); returns detached samples in [-1, 1].

        Each step is one forward and one backward pass of the energy network (one NFE). Only the
        input's gradient is taken, so the network's parameter gradients are untouched.
        """
        cfg = self.config
        x = x.detach()
        with torch.enable_grad():  # the harness samples under no_grad
            for _ in range(steps):
                x.requires_grad_(True)
                grad, = torch.autograd.grad(self.energy(x).sum(), x)  # (B, C, H, W)
                # The per-pixel clip bounds a step's move by step_size * grad_clip_langevin
                # whatever the scale the energy has reached.
                grad = grad.clamp(-cfg.grad_clip_langevin, cfg.grad_clip_langevin)
                x = x.detach() - cfg.step_size * grad
                if noise:
                    x = x + cfg.noise * torch.randn_like(x)
                x = x.clamp(-1, 1)  # the chain stays in the image domain
        return x.detach()

    def loss(self, x):
        cfg = self.config
        b = x.shape[0]
        # Positive samples: dequantized data on [-1, 1] (continuous, so the energy is not trained
        # to be spiky on the 256 levels).
        x_pos = dequantize(x) * 2 - 1  # (B, C, H, W)

        # Negative samples: chains from the replay buffer, 5% restarted from uniform noise.
        idx = torch.randint(0, cfg.buffer_size, (b,), device=x.device)  # (B,)
        x_init = self.replay[idx]  # (B, C, H, W)
        restart = torch.rand(b, device=x.device) < cfg.restart_prob  # (B,)
        noise = torch.rand_like(x_init) * 2 - 1
        x_init = torch.where(restart[:, None, None, None], noise, x_init)
        x_neg = self.langevin(x_init, cfg.langevin_steps)  # (B, C, H, W)
        self.replay[idx] = x_neg  # the chains continue next time they are drawn

        # Contrastive divergence with the L2 energy regulariser.
        e_pos, e_neg = self.energy(torch.cat([x_pos, x_neg])).chunk(2)  # (B,), (B,)
        cd = e_pos.mean() - e_neg.mean()
        reg = (e_pos ** 2 + e_neg ** 2).mean()
        # The parameter gradient is clipped to Config.grad_clip by the harness (the default rule).
        return {"energy": cd + cfg.alpha * reg, "cd": cd, "reg": reg, "e_pos": e_pos.mean(),
                "e_neg": e_neg.mean()}

    def samplers(self):
        cfg = self.config
        # NFE = Langevin steps, each one forward + one backward pass of the energy network.
        return {"langevin": cfg.sample_steps, "replay_buffer": cfg.langevin_steps}

    @torch.no_grad()
    def generate(self, n, sampler):
        cfg = self.config
        if sampler == "langevin":
            x0 = torch.rand(n, *self.data_shape, device=self.device) * 2 - 1  # uniform noise
            x = self.langevin(x0, cfg.sample_steps)
        else:  # "replay_buffer"
            idx = torch.randint(0, cfg.buffer_size, (n,), device=self.device)
            x = self.langevin(self.replay[idx], cfg.langevin_steps)
        return x.clamp(-1, 1)

    def sampling_modules(self):
        return [self.energy]
