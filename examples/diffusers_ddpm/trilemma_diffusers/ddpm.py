"""DDPM as the diffusers library builds it: ``UNet2DModel`` and ``DDPMScheduler`` as a trilemma family.

Ho, Jain & Abbeel (2020), "Denoising Diffusion Probabilistic Models": a UNet predicts the noise added
by the forward process (the simple loss), and ancestral sampling runs the reverse chain. Everything
model-specific is diffusers' own: the UNet, ``DDPMScheduler.add_noise`` for the forward process and
``DDPMScheduler.step`` for each reverse step, so this file only adapts the interface.

It is an outside family (its own package, registered by the ``trilemma.models`` entry point of its
``pyproject.toml``), and it reads diffusers' own format: :meth:`DiffusersDDPM.from_pretrained` loads a
folder written by ``DDPMPipeline.save_pretrained`` (``unet/`` and ``scheduler/``, safetensors only),
so a DDPM trained anywhere with diffusers is measured through a suite entry's ``weights:``.

The small version: a UNet of 2 levels (width 16 at ``tiny``, 32 at ``mnist``; the paper's CIFAR-10
model has 4 levels of width 128 with attention at 16x16, 35.7M parameters) and 20 or 100 diffusion
steps instead of 1,000. No density is declared: the variational bound is not part of diffusers'
scheduler, and this file computes nothing of its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel

import trilemma
from trilemma.contract.likelihood import to_signed
from trilemma.contract.typed import require

# The UNet settings a loaded folder must share with the config (the rest are diffusers' defaults).
ARCHITECTURE = ("sample_size", "in_channels", "out_channels", "layers_per_block", "block_out_channels",
                "down_block_types", "up_block_types", "norm_num_groups")


@dataclass
class Config:
    width: int = 32  # channels of the UNet's first level, doubled at each lower one
    levels: int = 2  # UNet levels (resolutions)
    layers_per_block: int = 1  # ResNet blocks per level
    groups: int = 8  # group-norm groups (divides width)
    timesteps: int = 100  # diffusion steps T, of training and of the ancestral sampler
    beta_schedule: Literal["linear", "squaredcos_cap_v2"] = "linear"  # DDPM's linear, or the cosine one
    lr: float = 2e-4  # Adam learning rate
    grad_clip: float = 1.0  # gradient-norm clip (0: off), applied by the harness

    def __post_init__(self):
        for key in ("width", "levels", "layers_per_block", "groups", "timesteps"):
            require(getattr(self, key) >= 1, key, "at least 1", getattr(self, key))
        require(self.levels <= 6, "levels", "at most 6", self.levels)
        require(self.width <= 4096, "width", "at most 4096", self.width)
        require(self.timesteps <= 100_000, "timesteps", "at most 100000", self.timesteps)
        require(self.width % self.groups == 0, "groups", f"a divisor of width ({self.width})", self.groups)
        require(self.lr > 0, "lr", "> 0", self.lr)
        require(self.grad_clip >= 0, "grad_clip", ">= 0", self.grad_clip)


def make_unet(config: Config, data_shape: tuple[int, int, int]) -> UNet2DModel:
    """The noise-prediction UNet of ``config`` for images ``(C, H, W)``."""
    channels, height, _ = data_shape
    return UNet2DModel(sample_size=height, in_channels=channels, out_channels=channels,
                       layers_per_block=config.layers_per_block,
                       block_out_channels=tuple(config.width * 2 ** i for i in range(config.levels)),
                       down_block_types=("DownBlock2D",) * config.levels,
                       up_block_types=("UpBlock2D",) * config.levels, norm_num_groups=config.groups)


def make_scheduler(config: Config) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=config.timesteps, beta_schedule=config.beta_schedule)


@trilemma.register
class DiffusersDDPM(trilemma.GenerativeModel):
    name = "diffusers_ddpm"
    title = "DDPM (diffusers)"
    paper = ("Ho, Jain & Abbeel 2020, Denoising Diffusion Probabilistic Models (NeurIPS), as diffusers' "
             "UNet2DModel and DDPMScheduler")
    family = "EBM"  # the review files diffusion models under energy-based models
    reported = {"fid": 3.17, "nfe": 1000, "source": "Ho et al. 2020, Table 1 (CIFAR-10, L_simple)"}
    capabilities = trilemma.Capabilities(density="none", free_form_jacobian=True, sampling="iterative")
    Config = Config
    presets = {"tiny": {"width": 16, "timesteps": 20},
               "mnist": {"width": 32, "timesteps": 100},
               "cifar10": {"width": 64, "levels": 3, "timesteps": 100}}

    def __init__(self, config: Config, data_shape: tuple[int, int, int]):
        super().__init__(config, data_shape)
        self.unet = make_unet(config, data_shape)
        self.scheduler = make_scheduler(config)  # no weights: built from the config alone

    @classmethod
    def from_pretrained(cls, path, data_shape, config):
        """A folder of ``DDPMPipeline.save_pretrained`` (``unet/``, ``scheduler/``), safetensors only; its
        UNet and scheduler must be those ``config`` builds (a ValueError names the first that is not)."""
        unet = UNet2DModel.from_pretrained(str(path), subfolder="unet", use_safetensors=True,
                                           low_cpu_mem_usage=False)  # (without the accelerate package)
        scheduler = DDPMScheduler.from_pretrained(str(path), subfolder="scheduler")
        model = cls(config, data_shape)
        for key in ARCHITECTURE:
            theirs, ours = unet.config[key], model.unet.config[key]
            if (list(theirs) if isinstance(theirs, (list, tuple)) else theirs) != \
                    (list(ours) if isinstance(ours, (list, tuple)) else ours):
                raise ValueError(f"its unet's {key} is {theirs}, the config builds {ours}")
        for key, ours in (("num_train_timesteps", config.timesteps), ("beta_schedule", config.beta_schedule)):
            if scheduler.config[key] != ours:
                raise ValueError(f"its scheduler's {key} is {scheduler.config[key]!r}, the config's {ours!r}")
        model.unet.load_state_dict(unet.state_dict())
        return model

    def configure_optimizers(self):
        return {"model": torch.optim.Adam(self.unet.parameters(), lr=self.config.lr)}

    def loss(self, x: torch.Tensor):
        x0 = to_signed(x)  # (B, C, H, W) in [-1, 1]
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.config.timesteps, (len(x0),), device=x0.device)
        noisy = self.scheduler.add_noise(x0, noise, t)
        return {"model": F.mse_loss(self.unet(noisy, t).sample, noise)}

    def samplers(self):
        return {"ancestral": self.config.timesteps}

    @torch.no_grad()
    def generate(self, n: int, sampler: str) -> torch.Tensor:
        self.scheduler.set_timesteps(self.config.timesteps)
        x = torch.randn(n, *self.data_shape, device=self.device)  # x_T
        for t in self.scheduler.timesteps:  # T-1, ..., 0: one UNet call and one reverse step each
            x = self.scheduler.step(self.unet(x, t).sample, t, x).prev_sample
        return x.clamp(-1, 1)
