"""VAEBM: an energy-based model on a frozen hierarchical VAE, sampled by Langevin dynamics in the VAE's
noise space.

Xiao, Kreis, Kautz & Vahdat (2021), "VAEBM: A Symbiosis between Variational Autoencoders and
Energy-based Models", ICLR (code: github.com/NVlabs/VAEBM).

The model is h(x, z) ~ p_vae(x, z) exp(-E(x)). With every latent group reparameterised,
z_l = mu_l(z_<l) + sigma_l(z_<l) eps_l, and the decoder's draw x = T(eps_z, eps_x), the joint in the
space of the standard-normal noise eps = (eps_z of every group, eps_x) is

    h(eps) ~ exp(-U(eps)),   U(eps) = E(T(eps)) + 1/2 ||eps||^2,

on which short-run Langevin chains run from eps ~ N(0, I): eps <- eps - (eta / 2) dU/deps + sqrt(eta) N(0, I).
Two stages share the run's budget (``self.progress``): the first ``vae_fraction`` trains the VAE on
its -ELBO; then the VAE is frozen and only the energy trains, on E(x+) - E(x-) (paper, eq. 8) with
x+ data and x- = T(eps) at the end of a chain. A sample is T(eps) at the end of a ``sample_steps`` chain.

The VAE is VD-VAE's network (``trilemma.models.parts.vdvae``) with one discretized logistic per
subpixel, so T(eps) = mean + s * logit(Phi(eps_x)), the logistic's draw from normal noise, clamped to
[-1, 1]; the energy is IGEBM's ResNet (``trilemma.models.parts.energy``). What differs from the paper:
VD-VAE's hierarchy in place of NVAE's, trained in the run (not pretrained); spectral normalisation in
place of spectral regularisation, with IGEBM's L2 energy penalty; no replay buffer. The CPU presets
are small (4 latent groups on MNIST); ``cifar10_gpu`` is VD-VAE's CIFAR-10 layout (43 groups) widened
to the NVAE's parameter count, under an energy network of the paper's size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trilemma.contract.family import Capabilities, GenerativeModel
from trilemma.contract.likelihood import bits_per_dim, dequantize
from trilemma.contract.update import GradientRule
from trilemma.models.parts.energy import EnergyNet
from trilemma.models.parts.vdvae import HierarchicalVAE


@dataclass
class Config:
    vae_width: int = 64  # channels of the VAE's encoder and top-down state, at every resolution
    vae_bottleneck: float = 0.25  # a VAE block's middle width, as a fraction of vae_width
    vae_zdim: int = 8  # latent channels of each latent group (stochastic layer)
    vae_dec_blocks: int = 2  # latent groups at full resolution (fewer at coarser ones: VD-VAE's rule)
    vae_enc_blocks: int = 1  # encoder blocks at full resolution (the same rule)
    vae_lr: float = 1e-3  # AdamW learning rate of the VAE
    vae_weight_decay: float = 0.01  # AdamW weight decay of the VAE
    vae_grad_clip: float = 200.0  # max gradient norm of the VAE's loss (nats per subpixel); 0 disables
    vae_skip_threshold: float = 400.0  # skip a VAE update whose gradient norm is above this; 0 disables
    vae_min_log_scale: float = -7.0  # floor of the decoder's logistic log-scale on the [-1, 1] scale
    vae_fraction: float = 0.5  # fraction of the budget that trains the VAE; the energy trains after it
    channels: int = 64  # the energy network's stem channels (doubled per level up to max_channels)
    max_channels: int = 256  # cap on the energy network's channels
    blocks_per_level: int = 2  # residual blocks per resolution of the energy network
    langevin_steps: int = 10  # K, Langevin steps of a training chain (short-run, from the prior)
    sample_steps: int = 16  # Langevin steps of the sampler
    step_size: float = 0.01  # eta: eps <- eps - eta / 2 dU/deps + sqrt(eta) N(0, I)
    sample_mean: bool = False  # a sample is the decoder mean at the final eps_z (the official
    #   sampler's) instead of T(eps)
    alpha: float = 1.0  # weight of the L2 energy penalty E+^2 + E-^2 (IGEBM's; not in the paper)
    lr: float = 5e-5  # Adam learning rate of the energy network
    beta1: float = 0.0  # Adam beta1 of the energy network (momentum destabilises EBM training)
    grad_clip: float = 1.0  # max global norm of the energy's parameter gradient (0 disables)

    def __post_init__(self):
        for name in ("vae_width", "vae_zdim", "vae_dec_blocks", "vae_enc_blocks", "channels", "max_channels",
                     "blocks_per_level", "langevin_steps", "sample_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"'{name}' must be >= 1")
        if not 0 < self.vae_bottleneck <= 1 or self.vae_width * self.vae_bottleneck < 1:
            raise ValueError("'vae_bottleneck' must be in (0, 1] and leave a middle width of at least 1")
        if not 0 <= self.vae_fraction < 1:
            raise ValueError("'vae_fraction' must be in [0, 1)")
        for name in ("step_size", "vae_lr", "lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"'{name}' must be > 0")
        for name in ("alpha", "grad_clip", "vae_grad_clip", "vae_skip_threshold", "vae_weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"'{name}' must be >= 0")
        if not 0 <= self.beta1 < 1:
            raise ValueError("'beta1' must be in [0, 1)")


class VAEBM(GenerativeModel):
    name = "vaebm"
    paper = ("Xiao, Kreis, Kautz & Vahdat (2021), VAEBM: A Symbiosis between Variational Autoencoders and "
             "Energy-based Models, ICLR")
    family = "EBM"
    literature = "VAEBM"
    capabilities = Capabilities(density="none", free_form_jacobian=True, sampling="mcmc")
    Config = Config
    # The VAE of the CPU presets is VD-VAE's `mnist` preset (width 32, 4 latent groups on MNIST); the
    # GPU presets take VD-VAE's layouts, cifar10_gpu widened from 384 to 720 channels.
    presets = {
        "tiny": dict(vae_width=16, vae_zdim=4, vae_dec_blocks=1, channels=8, max_channels=16,
                     blocks_per_level=1, langevin_steps=3, sample_steps=4),
        "mnist": dict(vae_width=32, vae_dec_blocks=1, vae_lr=3e-3, vae_grad_clip=5.0, vae_skip_threshold=20.0,
                      vae_fraction=0.7, channels=8, max_channels=32, blocks_per_level=1, langevin_steps=5,
                      sample_steps=10, lr=1e-3, step_size=0.02),
        "cifar10": dict(vae_width=32, vae_dec_blocks=1, vae_grad_clip=5.0, vae_skip_threshold=20.0,
                        vae_fraction=0.7, channels=8, max_channels=64, blocks_per_level=1, langevin_steps=5,
                        sample_steps=10, lr=1e-3, step_size=0.02),
        "mnist_gpu": dict(vae_width=128, vae_zdim=16, vae_dec_blocks=12, vae_enc_blocks=6, vae_lr=5e-4,
                          lr=1e-4),
        "cifar10_gpu": dict(vae_width=720, vae_zdim=16, vae_dec_blocks=22, vae_enc_blocks=12, vae_lr=2e-4,
                            lr=1e-4),
    }

    def __init__(self, config: Config, data_shape):
        super().__init__(config, data_shape)
        cfg = config
        self.vae = HierarchicalVAE(self.data_shape, cfg.vae_width, cfg.vae_bottleneck, cfg.vae_zdim,
                                   cfg.vae_dec_blocks, cfg.vae_enc_blocks, 1, cfg.vae_min_log_scale)
        self.energy = EnergyNet(self.data_shape, cfg.channels, cfg.max_channels, cfg.blocks_per_level)
        # The stage of the last training step (1: the VAE, 2: the energy on the frozen VAE), in every
        # checkpoint and in the saved weights; the budget's fraction decides it at each step.
        self.register_buffer("stage", torch.tensor(1))

    # --- the joint in noise space ----------------------------------------------------------------
    def prior_noise(self, n: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """eps ~ N(0, I): one tensor per latent group, top first, each (n, zdim, h, w); and (n, C, H, W)."""
        eps_z = [torch.randn(n, *shape, device=self.device) for shape in self.vae.latent_shapes()]
        return eps_z, torch.randn(n, *self.data_shape, device=self.device)

    def transform(self, eps_z: list[torch.Tensor], eps_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """T(eps): the decoder's draw x in [-1, 1] and its mean, each (B, C, H, W)."""
        (_, means, log_scales), _ = self.vae.top_down(len(eps_x), eps=eps_z)  # each (B, 1, C, H, W)
        mean, scale = means[:, 0], log_scales[:, 0].exp()
        # The logistic's quantile function at Phi(eps_x): log Phi(e) - log(1 - Phi(e)), stable in both tails.
        logistic = torch.special.log_ndtr(eps_x) - torch.special.log_ndtr(-eps_x)
        return (mean + scale * logistic).clamp(-1, 1), mean  # the outer bins reach to infinity

    def joint_energy(self, eps_z: list[torch.Tensor], eps_x: torch.Tensor) -> torch.Tensor:
        """U(eps) = E(T(eps)) + 1/2 ||eps||^2 over every latent group and eps_x, (B,)."""
        x, _ = self.transform(eps_z, eps_x)
        prior = sum(0.5 * e.pow(2).flatten(1).sum(1) for e in (*eps_z, eps_x))
        return self.energy(x) + prior

    def langevin(self, eps_z: list[torch.Tensor], eps_x: torch.Tensor, steps: int, noise: bool = True):
        """``steps`` Langevin steps on U over every eps_z group and eps_x; detached results.

        Each step is one forward and one backward pass of the decoder and the energy network (one NFE).
        Only the inputs' gradient is taken, so no parameter gradient is touched.
        """
        eta = self.config.step_size
        eps = [e.detach() for e in (*eps_z, eps_x)]
        with torch.enable_grad():  # the harness samples under no_grad
            for _ in range(steps):
                eps = [e.requires_grad_(True) for e in eps]
                grads = torch.autograd.grad(self.joint_energy(eps[:-1], eps[-1]).sum(), eps)
                eps = [e.detach() - 0.5 * eta * g for e, g in zip(eps, grads)]
                if noise:
                    eps = [e + eta ** 0.5 * torch.randn_like(e) for e in eps]
        return eps[:-1], eps[-1]

    # --- training --------------------------------------------------------------------------------
    def configure_optimizers(self):
        cfg = self.config
        # VD-VAE's AdamW, fused for its found_inf input (a skipped update is decided on the device).
        return {"vae": torch.optim.AdamW(self.vae.parameters(), lr=cfg.vae_lr, betas=(0.9, 0.9),
                                         weight_decay=cfg.vae_weight_decay, fused=True),
                "energy": torch.optim.Adam(self.energy.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))}

    def gradient_rule(self, role):
        cfg = self.config
        if role == "vae":  # VD-VAE's clip and skip
            return GradientRule(clip=cfg.vae_grad_clip or None, skip_above=cfg.vae_skip_threshold or None)
        return super().gradient_rule(role)  # the energy: this Config's grad_clip

    def loss(self, x):
        cfg = self.config
        stage = 1 if self.progress < cfg.vae_fraction else 2
        self.stage.fill_(stage)
        self.vae.requires_grad_(stage == 1)  # frozen in stage 2, as the paper's

        # Stage 1: the VAE, by its -ELBO in nats per subpixel (VD-VAE's loss).
        if stage == 1:
            terms = self.vae.negative_elbo(x)
            logs = {f"vae_{k}_bpd": bits_per_dim(terms[k].mean().detach(), self.num_dims)
                    for k in ("loss", "rec", "kl")}
            return {"vae": terms["loss"].mean() / self.num_dims, "stage": self.stage.float(), **logs}

        # Stage 2: the energy, with the VAE frozen. Negatives: short-run chains from the prior.
        x_pos = dequantize(x) * 2 - 1  # (B, C, H, W), continuous data on [-1, 1]
        eps_z, eps_x = self.langevin(*self.prior_noise(x.shape[0]), cfg.langevin_steps)
        with torch.no_grad():
            x_neg, _ = self.transform(eps_z, eps_x)  # (B, C, H, W)
        e_pos, e_neg = self.energy(torch.cat([x_pos, x_neg])).chunk(2)  # (B,), (B,)
        # The joint's likelihood gradient for the energy (paper, eq. 8), plus the L2 penalty.
        cd = e_pos.mean() - e_neg.mean()
        loss = cd + cfg.alpha * (e_pos ** 2 + e_neg ** 2).mean()
        return {"energy": loss, "stage": self.stage.float(), "ebm_cd": cd, "e_pos": e_pos.mean(),
                "e_neg": e_neg.mean()}

    # --- sampling --------------------------------------------------------------------------------
    def samplers(self):
        return {"langevin": self.config.sample_steps}  # NFE = Langevin steps from the VAE's prior

    @torch.no_grad()
    def generate(self, n, sampler):
        eps_z, eps_x = self.langevin(*self.prior_noise(n), self.config.sample_steps)
        x, mean = self.transform(eps_z, eps_x)
        return mean.clamp(-1, 1) if self.config.sample_mean else x

    def sampling_modules(self):
        return [self.vae.biases, self.vae.decoder, self.vae.output, self.energy]
