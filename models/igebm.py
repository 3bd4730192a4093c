"""IGEBM: an energy-based model trained by contrastive divergence with short-run Langevin dynamics.

Paper: Yilun Du and Igor Mordatch, 2019, "Implicit Generation and Generalization in Energy-Based
Models", Advances in Neural Information Processing Systems (NeurIPS 32).

The model is one scalar energy E(x) from a spectrally normalised convolutional ResNet; the density
p(x) ~ exp(-E(x)) is never normalised, so there is no likelihood (density "none"). Training lowers
the energy of data and raises the energy of the model's own samples (contrastive divergence,
sec. 2.3 of the paper):

    L = E(x+) - E(x-) + alpha * (E(x+)^2 + E(x-)^2)

where x- comes from K steps of Langevin dynamics on E, started from a replay buffer of earlier
samples (95%) or from uniform noise (5%), and the alpha term keeps the energies near zero. Each
Langevin step adds the noise, then descends the clipped input gradient, as the paper's code does.

Class conditioning (``conditional``, the default): the review's CIFAR-10 figure (FID 37.9) is the
paper's conditional model, so the energy is E(x, y) of the data set's labels, with per-class biases and
gains in every residual block as in the paper's code (``parts.energy``); a batch's negative chains run
under its data's labels, as in the paper's training, and samples draw their classes uniformly.
``conditional=False`` is the unconditional model.

Sampling: the default sampler ("persistent_langevin") is the paper's evaluation procedure, from the
official code's FID script; "langevin" runs `sample_steps` steps from uniform noise; "replay_buffer"
continues chains of the training buffer. The sampler's details, what the presets change from the paper
and the networks: docs/families.md (igebm).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

from trilemma.contract.errors import TrilemmaError
from trilemma.contract.likelihood import dequantize
from trilemma.contract.family import Capabilities, GenerativeModel
from trilemma.models.blocks import halvings
from trilemma.models.parts.energy import EnergyNet


@dataclass
class Config:
    network: Literal["energy_net", "resnet32"] = "energy_net"  # "resnet32": the authors' CIFAR-10 network;
    #   "energy_net": parts.energy's (pre-activation blocks pooling first), shared with Flow CE and VAEBM
    channels: int = 128  # channels of the stem; doubled at each level, from the second on in resnet32 (paper: 128)
    max_channels: int = 256  # cap on the doubling (paper: 256)
    blocks_per_level: int = 2  # residual blocks per resolution, the first one downsamples (paper: 2)
    activation: Literal["leaky_relu", "swish"] = "leaky_relu"  # "leaky_relu" (slope 0.2) or "swish"; both appear in the paper's code
    spectral_norm: bool = True  # spectral normalisation of every layer, as in the paper (smooth energy)
    langevin_steps: int = 60  # K, Langevin steps per training iteration (paper: 60)
    step_size: float = 40.0  # x <- x + noise * N(0, I), then - step_size * clip(dE/dx) (paper: 10 on [0, 1])
    grad_clip_langevin: float = 0.005  # per-pixel clip of dE/dx (paper's code: proj_norm 0.01 on [0, 1])
    noise: float = 0.01  # standard deviation of the Langevin noise (paper: 0.005 on [0, 1])
    sample_steps: int = 60  # Langevin steps of the "langevin" sampler (from uniform noise)
    buffer_size: int = 10000  # replay buffer entries (paper: 10,000)
    restart_prob: float = 0.05  # fraction of chains restarted from uniform noise (paper: 5%)
    alpha: float = 1.0  # weight of the L2 energy regulariser E+^2 + E-^2 (paper: 1)
    lr: float = 1e-4  # Adam learning rate (paper: 1e-4)
    beta1: float = 0.0  # Adam beta1 (paper: 0.0; momentum destabilises EBM training)
    beta2: float = 0.999  # Adam beta2
    grad_clip: float = 1.0  # max global norm of the parameter gradient (0 disables; not in the paper)
    conditional: bool = True  # E(x, y) on the data set's labels (the literature figure's model)
    num_classes: int = 10  # classes of the data set's labels (conditional)
    # The evaluation sampler, "persistent_langevin" (the official test_inception.py's flag defaults):
    eval_buffer: int = 1000  # chains per block of images, a buffer of their own
    eval_batch: int = 512  # chains continued per round, drawn from the block with replacement
    eval_rounds: int = 200  # rounds per block (the script's 2 x repeat_scale 100)
    eval_steps: int = 20  # Langevin steps per round (its num_steps)
    eval_restart_prob: float = 0.01  # fraction of a round's chains restarted from uniform noise
    eval_relabel_prob: float = 0.1  # fraction of a round's chains given a new uniform class
    eval_settle_rounds: int = 10  # last rounds without restarts or new classes (its nomix; 0: none)
    eval_grad_clip_langevin: float = 0.025  # per-pixel clip of dE/dx (its proj_norm 0.05 on [0, 1])

    def __post_init__(self):
        for name in ("channels", "max_channels", "blocks_per_level", "langevin_steps", "sample_steps",
                     "buffer_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"'{name}' must be >= 1")
        for name in ("step_size", "grad_clip_langevin", "lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"'{name}' must be > 0")
        for name in ("noise", "alpha", "grad_clip"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"'{name}' must be >= 0")
        if not 0 <= self.restart_prob <= 1:
            raise ValueError("'restart_prob' must be in [0, 1]")
        for name in ("eval_buffer", "eval_batch", "eval_rounds", "eval_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"'{name}' must be >= 1")
        if not self.eval_grad_clip_langevin > 0:
            raise ValueError("'eval_grad_clip_langevin' must be > 0")
        if not (0 <= self.eval_restart_prob <= 1 and 0 <= self.eval_relabel_prob <= 1):
            raise ValueError("'eval_restart_prob' and 'eval_relabel_prob' must be in [0, 1]")
        if self.eval_batch > self.eval_buffer:
            raise ValueError("'eval_batch' must be <= 'eval_buffer'")
        if self.eval_rounds < -(-self.eval_buffer // self.eval_batch):  # the first rounds start every chain
            raise ValueError("'eval_rounds' must be >= eval_buffer / eval_batch (every chain is run)")
        if not 0 <= self.eval_settle_rounds <= self.eval_rounds:
            raise ValueError("'eval_settle_rounds' must be in [0, eval_rounds]")
        if self.num_classes < 2:
            raise ValueError("'num_classes' must be >= 2")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError("'beta1' and 'beta2' must be in [0, 1)")


# --- the authors' CIFAR-10 network (network="resnet32") -------------------------------------------

class CappedSpectralNorm(nn.Module):
    """Parametrization w -> w / max(sigma, 1), sigma the top singular value of w as (out, in * k * k),
    one power iteration per training forward: the authors' normalisation of a block's second convolution
    (``spectral_normed_weight(lower_bound=True)``), which only scales down, so a near-zero start stays."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("u", F.normalize(torch.randn(weight.shape[0]), dim=0))
        self.register_buffer("v", F.normalize(torch.randn(weight[0].numel()), dim=0))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        mat = weight.flatten(1)  # (out, in * k * k)
        if self.training:
            with torch.no_grad():
                self.v.copy_(F.normalize(mat.T @ self.u, dim=0))
                self.u.copy_(F.normalize(mat @ self.v, dim=0))
        return weight / (self.u @ mat @ self.v).clamp_min(1.0)


class AuthorsBlock(nn.Module):
    """The authors' residual block (``smart_res_block``): h = conv1(x + b1[y]), then
    conv2(act(h) + b2[y]) * (g[y] + g0), plus x or, where the width changes, a 3x3 convolution of it;
    average-pooled when it downsamples, then act. The convolutions have no biases; unconditional, the
    per-class tables are one row and g0 is absent."""

    def __init__(self, c_in: int, c_out: int, downsample: bool, act, sn: bool, num_classes: int):
        super().__init__()
        self.act, self.downsample, self.conditional = act, downsample, num_classes > 0
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        nn.init.normal_(self.conv2.weight, std=1e-10)  # the block starts as its skip path
        self.skip = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False) if c_in != c_out else nn.Identity()
        if sn:
            spectral_norm(self.conv1)
            parametrize.register_parametrization(self.conv2, "weight", CappedSpectralNorm(self.conv2.weight))
            if c_in != c_out:
                spectral_norm(self.skip)
        rows = max(num_classes, 1)
        self.bias1, self.bias2 = nn.Parameter(torch.zeros(rows, c_in)), nn.Parameter(torch.zeros(rows, c_out))
        self.gain = nn.Parameter(torch.ones(rows, c_out))
        self.gain_offset = nn.Parameter(torch.zeros(c_out)) if self.conditional else None  # the code's "cb"

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        def per_class(table):  # (B, C, 1, 1), or (1, C, 1, 1) unconditional
            return (table[labels] if self.conditional else table[:1])[:, :, None, None]
        gain = per_class(self.gain) + (self.gain_offset[:, None, None] if self.conditional else 0)
        h = self.conv1(x + per_class(self.bias1))  # (B, c_out, H, W)
        h = self.conv2(self.act(h) + per_class(self.bias2)) * gain + self.skip(x)
        if self.downsample:
            h = F.avg_pool2d(h, 2)  # (B, c_out, H/2, W/2)
        return self.act(h)


class ResNet32(nn.Module):
    """The authors' CIFAR-10 energy (openai/ebm_code_release ``models.ResNet32``): x (B, C, H, W) -> E (B,).

    A stem convolution to ``channels`` maps and act; one level per halving (``halvings``) of
    ``blocks_per_level`` blocks, the first pooling after its convolutions, at ``channels`` maps on the first
    level and doubled on each later one up to ``max_channels``; relu, a sum over positions and a linear
    head (not normalised). On 32x32 at 128, 256 and 2 it is the code's network, all its weights used."""

    def __init__(self, shape: tuple[int, int, int], channels: int, max_channels: int,
                 blocks_per_level: int, activation: str = "leaky_relu", sn: bool = True,
                 num_classes: int = 0):
        super().__init__()
        c, h, w = shape
        act = F.silu if activation == "swish" else (lambda t: F.leaky_relu(t, 0.2))
        self.act, self.num_classes = act, num_classes
        self.stem = nn.Conv2d(c, channels, 3, padding=1, bias=False)
        if sn:
            spectral_norm(self.stem)
        blocks, ch = [], channels
        for level in range(halvings(h, w)):
            out = min(ch * 2, max_channels) if level else ch
            blocks.append(AuthorsBlock(ch, out, True, act, sn, num_classes))
            blocks += [AuthorsBlock(out, out, False, act, sn, num_classes) for _ in range(blocks_per_level - 1)]
            ch = out
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(ch, 1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_classes and labels is None:
            raise ValueError("a class-conditional energy needs labels")
        h = self.act(self.stem(x))  # (B, channels, H, W)
        for block in self.blocks:
            h = block(h, labels)  # (B, ch, h', w')
        return self.head(F.relu(h).sum(dim=(2, 3))).squeeze(1)  # (B,): global sum pooling


CPU_EVALUATION = dict(eval_buffer=100, eval_batch=50, eval_rounds=8, eval_steps=10, eval_settle_rounds=2,
                      eval_grad_clip_langevin=0.005)


class IGEBM(GenerativeModel):
    name = "igebm"
    paper = ("Yilun Du and Igor Mordatch, 2019. Implicit Generation and Generalization in "
             "Energy-Based Models. NeurIPS 2019.")
    family = "EBM"
    literature = "IGEBM"
    # Conditional by default (Config.conditional; an instance's capabilities follow its config).
    capabilities = Capabilities(density="none", free_form_jacobian=True, sampling="mcmc", conditional=True)
    Config = Config
    presets = {
        # The paper's Langevin schedule (the Config defaults), on a GPU; on CIFAR-10 with the authors'
        # network, on MNIST with the shared one at the same widths.
        "mnist_gpu": dict(),
        "cifar10_gpu": dict(network="resnet32"),
        "tiny": dict(channels=8, max_channels=16, blocks_per_level=1, langevin_steps=3,
                     sample_steps=4, buffer_size=32, eval_buffer=8, eval_batch=4, eval_rounds=3,
                     eval_steps=2, eval_settle_rounds=1),
        # ~100 s of CPU training buys only a few hundred updates, so: a narrow net (one block per
        # level), 10 Langevin steps, a buffer of 500 so that each chain is continued many times,
        # and a 10x learning rate. The small net's input gradients are ~1e-3 per pixel, so the
        # step is larger (200) and the clip smaller (0.001), keeping the paper's largest move per
        # step (0.2 on [-1, 1]). The evaluation sampler spends 40 Langevin steps per image (8 rounds
        # of 10 steps for half of a block of 100 chains), not 2048, its clip 5x training's as in the
        # paper's script.
        "mnist": dict(channels=8, max_channels=32, blocks_per_level=1, langevin_steps=10,
                      step_size=200.0, grad_clip_langevin=0.001, sample_steps=40,
                      buffer_size=500, lr=1e-3, **CPU_EVALUATION),
        "cifar10": dict(channels=8, max_channels=64, blocks_per_level=1, langevin_steps=10,
                        step_size=200.0, grad_clip_langevin=0.001, sample_steps=40,
                        buffer_size=500, lr=1e-3, **CPU_EVALUATION),
    }

    def __init__(self, config: Config, data_shape: tuple[int, int, int]):
        super().__init__(config, data_shape)
        network = ResNet32 if config.network == "resnet32" else EnergyNet
        self.energy = network(self.data_shape, config.channels, config.max_channels,
                              config.blocks_per_level, config.activation, config.spectral_norm,
                              config.num_classes if config.conditional else 0)
        # Replay buffer of past negative samples, in [-1, 1]; a buffer so checkpoints hold it.
        # It starts as uniform noise, i.e. every chain's first visit is a restart.
        self.register_buffer("replay", torch.rand(config.buffer_size, *self.data_shape) * 2 - 1)

    def configure_optimizers(self):
        cfg = self.config
        return {"energy": torch.optim.Adam(self.energy.parameters(), lr=cfg.lr,
                                           betas=(cfg.beta1, cfg.beta2))}

    def random_labels(self, n: int) -> torch.Tensor | None:
        """Uniform classes (n,) for a conditional model's samples, else None."""
        if not self.config.conditional:
            return None
        return torch.randint(0, self.config.num_classes, (n,), device=self.device)

    def langevin(self, x: torch.Tensor, steps: int, noise: bool = True, labels: torch.Tensor | None = None,
                 clip: float | None = None) -> torch.Tensor:
        """Run `steps` Langevin steps on E(., labels) from x (B, C, H, W); returns detached samples in
        [-1, 1]. ``clip`` is the per-pixel gradient clip (default: training's).

        Each step is one forward and one backward pass of the energy network (one NFE). Only the
        input's gradient is taken, so the network's parameter gradients are untouched.
        """
        cfg = self.config
        clip = cfg.grad_clip_langevin if clip is None else clip
        x = x.detach()
        with torch.enable_grad():  # the harness samples under no_grad
            for _ in range(steps):
                if noise:  # the noise first, then the gradient step from the noisy point (the paper's code)
                    x = x + cfg.noise * torch.randn_like(x)
                x.requires_grad_(True)
                grad, = torch.autograd.grad(self.energy(x, labels).sum(), x)  # (B, C, H, W)
                # The per-pixel clip bounds a step's move by step_size * clip whatever the scale the
                # energy has reached.
                x = x.detach() - cfg.step_size * grad.clamp(-clip, clip)
                x = x.clamp(-1, 1)  # the chain stays in the image domain
        return x.detach()

    def persistent_langevin(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The paper's evaluation sampler (the module docstring): n images (n, C, H, W) in [-1, 1], in
        blocks of at most ``eval_buffer`` chains, and their classes (n,) (None if unconditional)."""
        cfg = self.config
        out, out_labels = [], []
        for start in range(0, n, cfg.eval_buffer):
            m = min(cfg.eval_buffer, n - start)  # chains of this block
            b = -(-cfg.eval_batch * m // cfg.eval_buffer)  # chains per round: eval_batch for a full block
            chains = torch.rand(m, *self.data_shape, device=self.device) * 2 - 1  # (m, C, H, W)
            labels = self.random_labels(m)  # (m,) or None
            fill = -(-m // b)  # the first rounds start every chain, in order (the script fills its buffer)
            for r in range(cfg.eval_rounds):
                if r < fill:
                    idx = torch.arange(r * b, min((r + 1) * b, m), device=self.device)
                else:
                    idx = torch.randint(0, m, (b,), device=self.device)  # with replacement, as the script
                x = chains[idx]  # (b, C, H, W)
                y = labels[idx] if labels is not None else None
                if fill <= r < cfg.eval_rounds - cfg.eval_settle_rounds:  # restarts and new classes
                    restart = torch.rand(len(idx), device=self.device) < cfg.eval_restart_prob
                    x = torch.where(restart[:, None, None, None], torch.rand_like(x) * 2 - 1, x)
                    if y is not None:
                        relabel = torch.rand(len(idx), device=self.device) < cfg.eval_relabel_prob
                        y = torch.where(relabel, self.random_labels(len(idx)), y)
                x = self.langevin(x, cfg.eval_steps, labels=y, clip=cfg.eval_grad_clip_langevin)
                # A chain drawn twice keeps its last run, image and class together (the script's order).
                order = torch.arange(len(idx), device=self.device)
                last = torch.full((m,), -1, device=self.device).scatter_reduce(0, idx, order, "amax")
                keep = last[idx] == order  # (b,)
                chains[idx[keep]] = x[keep]
                if labels is not None:
                    labels[idx[keep]] = y[keep]
            out.append(chains)
            out_labels.append(labels)
        return torch.cat(out), (torch.cat(out_labels) if self.config.conditional else None)

    def loss(self, x, labels=None):
        cfg = self.config
        b = x.shape[0]
        if cfg.conditional and labels is None:
            raise TrilemmaError("igebm is class-conditional (config.conditional): loss() needs labels=")
        labels = labels if cfg.conditional else None  # (B,) or None
        # Positive samples: dequantized data on [-1, 1] (continuous, so the energy is not trained
        # to be spiky on the 256 levels).
        x_pos = dequantize(x) * 2 - 1  # (B, C, H, W)

        # Negative samples: chains from the replay buffer, 5% restarted from uniform noise.
        idx = torch.randint(0, cfg.buffer_size, (b,), device=x.device)  # (B,)
        x_init = self.replay[idx]  # (B, C, H, W)
        restart = torch.rand(b, device=x.device) < cfg.restart_prob  # (B,)
        noise = torch.rand_like(x_init) * 2 - 1
        x_init = torch.where(restart[:, None, None, None], noise, x_init)
        x_neg = self.langevin(x_init, cfg.langevin_steps, labels=labels)  # (B, C, H, W), the data's classes
        self.replay[idx] = x_neg  # the chains continue next time they are drawn

        # Contrastive divergence with the L2 energy regulariser.
        both = torch.cat([labels, labels]) if labels is not None else None
        e_pos, e_neg = self.energy(torch.cat([x_pos, x_neg]), both).chunk(2)  # (B,), (B,)
        cd = e_pos.mean() - e_neg.mean()
        reg = (e_pos ** 2 + e_neg ** 2).mean()
        # The parameter gradient is clipped to Config.grad_clip by the harness (the default rule).
        return {"energy": cd + cfg.alpha * reg, "cd": cd, "reg": reg, "e_pos": e_pos.mean(),
                "e_neg": e_neg.mean()}

    def samplers(self):
        cfg = self.config
        # NFE = Langevin steps per image, each one forward + one backward pass of the energy network.
        persistent = round(cfg.eval_rounds * cfg.eval_batch * cfg.eval_steps / cfg.eval_buffer)
        return {"persistent_langevin": max(persistent, 1), "langevin": cfg.sample_steps,
                "replay_buffer": cfg.langevin_steps}

    @torch.no_grad()
    def generate(self, n, sampler):
        cfg = self.config
        if sampler == "persistent_langevin":
            x, _ = self.persistent_langevin(n)
        elif sampler == "langevin":
            x0 = torch.rand(n, *self.data_shape, device=self.device) * 2 - 1  # uniform noise
            x = self.langevin(x0, cfg.sample_steps, labels=self.random_labels(n))
        else:  # "replay_buffer"
            idx = torch.randint(0, cfg.buffer_size, (n,), device=self.device)
            x = self.langevin(self.replay[idx], cfg.langevin_steps, labels=self.random_labels(n))
        return x.clamp(-1, 1)

    def sampling_modules(self):
        return [self.energy]
