"""VAEBM: an energy-based model on top of a VAE, sampled by Langevin dynamics in the VAE's noise space.

Xiao, Kreis, Kautz & Vahdat (2021), "VAEBM: A Symbiosis between Variational Autoencoders and
Energy-based Models", ICLR.

The model is the product of a VAE's density and an energy in data space,

    h(x, z) = p_vae(x | z) p(z) exp(-E(x)) / Z,

so the VAE supplies the modes and the energy removes the mass the VAE puts between them. Its mechanism,
kept here, is the reparameterised sampling: with z = eps_z (our VAE's prior is N(0, I)) and
x = T(eps) = mu(eps_z) + sigma eps_x, the joint becomes, in the space of the standard-normal noise
eps = (eps_z, eps_x),

    h(eps) ~ exp(-U(eps)),   U(eps) = E(T(eps)) + 1/2 ||eps||^2,

a smooth, well-conditioned target for short-run Langevin chains started at eps ~ N(0, I), i.e. at VAE
samples: eps <- eps - (eta / 2) dU/deps + sqrt(eta) N(0, I). Training (paper, eq. 8) first fits the
VAE, then holds it fixed and trains only the energy by the likelihood gradient of the joint,
dE(x+)/dpsi - dE(x-)/dpsi, with x+ data and x- = T(eps) at the end of a chain; the chains are short
and start afresh from the prior at each step (no replay buffer). Sampling is the same chain for
``sample_steps`` steps. Z is intractable, so there is no density (the paper reports none either).

The VAE is the project's ``vae`` family (``trilemma.models.vae``, its network and its own loss),
trained within this run's budget: ``loss`` trains it while ``self.progress`` is below
``vae_fraction`` and the energy afterwards. The energy network is IGEBM's spectrally normalised ResNet
(``trilemma.models.igebm.EnergyNet``).

What the small version changes from the paper:
    * the project's one-latent-layer convolutional VAE instead of a hierarchical NVAE, trained within
      the run's budget instead of pretrained (the schedule is part of the budget);
    * the energy network is narrow (the CPU presets: 8 stem channels, one block per level), with
      spectral normalisation of every layer in place of the paper's spectral regularisation, and IGEBM's
      L2 penalty alpha (E+^2 + E-^2) on the energies for stability (not in the paper);
    * ``sample_mean``: a sample is the decoder mean at the chain's final eps_z (as ``vae`` samples),
      not T(eps) with its per-pixel noise sigma eps_x, which would be noise in an FID set; the chain
      itself runs on the full eps;
    * the ``cifar10_gpu`` preset (and ``mnist_gpu``, the same on MNIST) widens the energy network (64 stem
      channels, 2 blocks per level) and the VAE; still a small fraction of the paper's NVAE plus energy
      network.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trilemma.contract.family import Capabilities, GenerativeModel, build_config
from trilemma.contract.likelihood import dequantize
from trilemma.models.igebm import IGEBM, EnergyNet
from trilemma.models.vae import VAE


@dataclass
class Config:
    latent_dim: int = 32  # the VAE's latent size
    vae_nf: int = 32  # the VAE's channels at full resolution (doubled at each stride-2 stage)
    vae_lr: float = 1e-3  # Adam learning rate of the VAE's networks
    vae_fraction: float = 0.5  # fraction of the budget that trains the VAE; the energy trains after it
    channels: int = 64  # the energy network's stem channels (doubled per level up to max_channels)
    max_channels: int = 256  # cap on the energy network's channels
    blocks_per_level: int = 2  # residual blocks per resolution of the energy network
    langevin_steps: int = 10  # K, Langevin steps of a training chain (short-run, from the prior)
    sample_steps: int = 16  # Langevin steps of the sampler
    step_size: float = 0.01  # eta: eps <- eps - eta / 2 dU/deps + sqrt(eta) N(0, I)
    sample_mean: bool = True  # a sample is the decoder mean at the final eps_z (False: T(eps) itself)
    alpha: float = 1.0  # weight of the L2 energy penalty E+^2 + E-^2 (IGEBM's; not in the paper)
    lr: float = 5e-5  # Adam learning rate of the energy network
    beta1: float = 0.0  # Adam beta1 of the energy network (momentum destabilises EBM training)
    grad_clip: float = 1.0  # max global norm of the energy's parameter gradient (0 disables)

    def __post_init__(self):
        for name in ("latent_dim", "vae_nf", "channels", "max_channels", "blocks_per_level",
                     "langevin_steps", "sample_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"'{name}' must be >= 1")
        if not 0 <= self.vae_fraction < 1:
            raise ValueError("'vae_fraction' must be in [0, 1)")
        for name in ("step_size", "vae_lr", "lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"'{name}' must be > 0")
        if self.alpha < 0 or self.grad_clip < 0 or not 0 <= self.beta1 < 1:
            raise ValueError("'alpha' and 'grad_clip' must be >= 0 and 'beta1' in [0, 1)")


class VAEBM(GenerativeModel):
    name = "vaebm"
    paper = ("Xiao, Kreis, Kautz & Vahdat (2021), VAEBM: A Symbiosis between Variational Autoencoders and "
             "Energy-based Models, ICLR")
    family = "EBM"
    literature = "VAEBM"
    capabilities = Capabilities(density="none", free_form_jacobian=True, sampling="mcmc")
    Config = Config
    presets = {
        "tiny": dict(latent_dim=8, vae_nf=8, channels=8, max_channels=16, blocks_per_level=1,
                     langevin_steps=3, sample_steps=4),
        # 2-core CPU, 40 s (72 steps on the loaded machine, 110 images/s): 70% of the budget for the VAE,
        # which is then still blurry (half of it gave 36 VAE steps and faint digits), the rest for the
        # energy with 5-step chains.
        "mnist": dict(latent_dim=32, vae_nf=32, vae_fraction=0.7, channels=8, max_channels=32,
                      blocks_per_level=1, langevin_steps=5, sample_steps=10, lr=1e-3, step_size=0.02),
        "cifar10": dict(latent_dim=128, vae_nf=32, vae_fraction=0.7, channels=8, max_channels=64,
                        blocks_per_level=1, langevin_steps=5, sample_steps=10, lr=1e-3, step_size=0.02),
        "mnist_gpu": dict(latent_dim=128, vae_nf=64, channels=64, max_channels=256, blocks_per_level=2,
                    langevin_steps=10, sample_steps=16, lr=1e-4, step_size=0.01),
        "cifar10_gpu": dict(latent_dim=128, vae_nf=64, channels=64, max_channels=256, blocks_per_level=2,
                    langevin_steps=10, sample_steps=16, lr=1e-4, step_size=0.01),
    }

    def __init__(self, config: Config, data_shape):
        super().__init__(config, data_shape)
        cfg = config
        self.vae = VAE(build_config(VAE, None, {"latent_dim": cfg.latent_dim, "nf": cfg.vae_nf,
                                                "lr": cfg.vae_lr}), self.data_shape)
        energy_cfg = build_config(IGEBM, None, {"channels": cfg.channels, "max_channels": cfg.max_channels,
                                                "blocks_per_level": cfg.blocks_per_level})
        self.energy = EnergyNet(energy_cfg, self.data_shape)

    # --- the joint in noise space ----------------------------------------------------------------
    def transform(self, eps_z: torch.Tensor, eps_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """T(eps): x = mu(z) + sigma eps_x with z = eps_z; returns x and the decoder mean, (B, C, H, W)."""
        mean, log_scale = self.vae.decoder(eps_z)
        return mean + log_scale.exp() * eps_x, mean

    def joint_energy(self, eps_z: torch.Tensor, eps_x: torch.Tensor) -> torch.Tensor:
        """U(eps) = E(T(eps)) + 1/2 ||eps||^2, (B,)."""
        x, _ = self.transform(eps_z, eps_x)
        prior = 0.5 * (eps_z.pow(2).sum(1) + eps_x.pow(2).flatten(1).sum(1))
        return self.energy(x) + prior

    def prior_noise(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randn(n, self.config.latent_dim, device=self.device),
                torch.randn(n, *self.data_shape, device=self.device))

    def langevin(self, eps_z, eps_x, steps: int, noise: bool = True):
        """``steps`` Langevin steps on U from (eps_z (B, latent), eps_x (B, C, H, W)); detached results.

        Each step is one forward and one backward pass of the decoder and the energy network (one NFE).
        Only the inputs' gradient is taken, so no parameter gradient is touched.
        """
        eta = self.config.step_size
        eps_z, eps_x = eps_z.detach(), eps_x.detach()
        with torch.enable_grad():  # the harness samples under no_grad
            for _ in range(steps):
                eps_z.requires_grad_(True)
                eps_x.requires_grad_(True)
                g_z, g_x = torch.autograd.grad(self.joint_energy(eps_z, eps_x).sum(), (eps_z, eps_x))
                eps_z, eps_x = eps_z.detach() - 0.5 * eta * g_z, eps_x.detach() - 0.5 * eta * g_x
                if noise:
                    eps_z = eps_z + eta ** 0.5 * torch.randn_like(eps_z)
                    eps_x = eps_x + eta ** 0.5 * torch.randn_like(eps_x)
        return eps_z.detach(), eps_x.detach()

    # --- training --------------------------------------------------------------------------------
    def configure_optimizers(self):
        cfg = self.config
        return {"vae": self.vae.configure_optimizers()["model"],
                "energy": torch.optim.Adam(self.energy.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))}

    def gradient_rule(self, role):
        if role == "vae":
            return self.vae.gradient_rule("model")  # the VAE's own clip (its Config's grad_clip)
        return super().gradient_rule(role)  # the energy: this Config's grad_clip

    def loss(self, x):
        cfg = self.config
        # Stage 1: the VAE, by its own loss (its negative ELBO).
        if self.progress < cfg.vae_fraction:
            terms = self.vae.loss(x)
            return {"vae": terms.pop("model"), **{f"vae_{k}": v for k, v in terms.items()}}

        # Stage 2: the energy, with the VAE held fixed. Negatives: short-run chains from the prior.
        x_pos = dequantize(x) * 2 - 1  # (B, C, H, W), continuous data on [-1, 1]
        eps_z, eps_x = self.langevin(*self.prior_noise(x.shape[0]), cfg.langevin_steps)
        with torch.no_grad():
            x_neg, _ = self.transform(eps_z, eps_x)  # (B, C, H, W)
        e_pos, e_neg = self.energy(torch.cat([x_pos, x_neg])).chunk(2)  # (B,), (B,)
        # The joint's likelihood gradient for the energy (paper, eq. 8), plus the L2 penalty.
        cd = e_pos.mean() - e_neg.mean()
        loss = cd + cfg.alpha * (e_pos ** 2 + e_neg ** 2).mean()
        return {"energy": loss, "ebm_cd": cd, "e_pos": e_pos.mean(), "e_neg": e_neg.mean()}

    # --- sampling --------------------------------------------------------------------------------
    def samplers(self):
        return {"langevin": self.config.sample_steps}  # NFE = Langevin steps from the VAE's prior

    @torch.no_grad()
    def generate(self, n, sampler):
        eps_z, eps_x = self.langevin(*self.prior_noise(n), self.config.sample_steps)
        x, mean = self.transform(eps_z, eps_x)
        return (mean if self.config.sample_mean else x).clamp(-1, 1)

    def sampling_modules(self):
        return [self.vae.decoder, self.energy]
