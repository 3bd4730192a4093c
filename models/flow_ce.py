"""Flow Contrastive Estimation: an energy-based model and a flow trained against each other.

Gao, Nijkamp, Kingma, Xu, Dai & Wu (2020), "Flow Contrastive Estimation of Energy-Based Models", CVPR.

Two models of the dequantized image y in [0, 1)^D: an energy-based model with an explicit log-normaliser,
log p_theta(y) = -E_theta(2 y - 1) - c (c a learned scalar, as in noise-contrastive estimation), and a
normalizing flow q_alpha(y). The mechanism that defines FCE, kept here, is noise-contrastive estimation
with the flow as the noise distribution, and the flow trained adversarially against it (paper, eq. 4-6):
with the classifier D(y) = p_theta(y) / (p_theta(y) + q_alpha(y)), i.e. the logit
l(y) = log p_theta(y) - log q_alpha(y),

    V(theta, alpha) = E_data[log D(y)] + E_{y ~ q_alpha}[log (1 - D(y))],

the EBM ascends V (it learns to tell data from the flow's samples) and the flow descends it (its
samples, reparameterised y = g_alpha(eps), and its density both move to fool the EBM); at the game's
equilibrium both equal the data distribution. ``train_step`` takes one step of each, EBM first.

The flow is the project's Glow (``trilemma.models.glow``: actnorm, LU-decomposed 1x1 convolutions, affine
couplings, learned split priors; exact inverse and log-determinant); the energy network is IGEBM's
ResNet (``trilemma.models.igebm.EnergyNet``), without spectral normalisation, since the energy must
span the range of an image's log-density. The family's density is the flow's exact likelihood
(``nll``: dequantized bound, as for Glow). The paper also reports the EBM's likelihood, with its
normaliser estimated by importance sampling from the flow, log Z = log E_q[exp(log p~(y) - log q(y))];
``ebm_nll`` computes that (an estimate, not the family's reported density).

What the small version changes from the paper:
    * a small Glow and a narrow energy network in the CPU presets (Glow: 8 steps per level, 32-48
      channels; energy: 8 stem channels, one block per level);
    * ``flow_mle_fraction``: in the CPU presets the flow is first trained by maximum likelihood for a
      fraction of the budget (our addition, for a budget of tens of steps: NCE against a flow far from
      the data teaches the EBM little); 0 is the paper's joint training from the start;
    * c is set on the game's first batch so that the EBM and the flow give data the same mean
      log-density (the classifier starts undecided); both networks use Adam at one learning rate;
    * the flow's samples are clamped to the data's cube [0, 1] (``flow_sample``), where float32 would
      give a tail sample log q = -inf;
    * the ``cifar10_gpu`` preset (and ``mnist_gpu``, the same network on MNIST) is Glow at half of its paper's
      CIFAR-10 depth and width (16 steps per level, 256 channels, where Glow has 32 and 512) with a wider
      energy network: 12.9M parameters in all.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trilemma.contract.family import Capabilities, GenerativeModel, build_config
from trilemma.contract.likelihood import bits_per_dim, dequantize, discrete_nll_from_density
from trilemma.models.glow import Glow
from trilemma.models.igebm import IGEBM, EnergyNet


@dataclass
class Config:
    flow_hidden: int = 512  # channels of Glow's coupling networks
    flow_steps: int = 32  # K, Glow's flow steps per level
    channels: int = 64  # the energy network's stem channels (doubled per level up to max_channels)
    max_channels: int = 256  # cap on the energy network's channels
    blocks_per_level: int = 2  # residual blocks per resolution of the energy network
    lr: float = 1e-4  # Adam learning rate of the EBM (with c), and of the flow's maximum-likelihood stage
    game_flow_lr: float = 1e-5  # Adam learning rate of the flow in the game (a larger one diverged on MNIST)
    beta1: float = 0.5  # Adam beta1 of both (adversarial games prefer little momentum)
    flow_mle_fraction: float = 0.0  # fraction of the budget training the flow by maximum likelihood first
    grad_clip: float = 10.0  # max global gradient norm of each network (0 disables)
    ebm_nll_draws: int = 64  # flow samples of the importance-sampled normaliser in ebm_nll()

    def __post_init__(self):
        for name in ("flow_hidden", "flow_steps", "channels", "max_channels", "blocks_per_level",
                     "ebm_nll_draws"):
            if getattr(self, name) < 1:
                raise ValueError(f"'{name}' must be >= 1")
        if not self.lr > 0 or not self.game_flow_lr > 0:
            raise ValueError("'lr' and 'game_flow_lr' must be > 0")
        if not 0 <= self.beta1 < 1 or not 0 <= self.flow_mle_fraction < 1:
            raise ValueError("'beta1' and 'flow_mle_fraction' must be in [0, 1)")
        if self.grad_clip < 0:
            raise ValueError("'grad_clip' must be >= 0")


class FlowCE(GenerativeModel):
    name = "flow_ce"
    title = "Flow Contrastive (EBM)"
    paper = ("Gao, Nijkamp, Kingma, Xu, Dai & Wu (2020), Flow Contrastive Estimation of Energy-Based "
             "Models, CVPR")
    family = "EBM"
    literature = "Flow Contrastive (EBM)"
    # The density reported is the flow's, exact up to dequantization; sampling is one pass of the flow.
    capabilities = Capabilities(density="exact", free_form_jacobian=False, sampling="one_pass")
    Config = Config
    presets = {
        "tiny": dict(flow_hidden=16, flow_steps=2, channels=8, max_channels=16, blocks_per_level=1, lr=1e-3),
        # 2-core CPU, ~40 s: the flow by maximum likelihood for the first half, then the game.
        "mnist": dict(flow_hidden=32, flow_steps=8, channels=8, max_channels=32, blocks_per_level=1, lr=2e-3,
                      flow_mle_fraction=0.5),
        "cifar10": dict(flow_hidden=48, flow_steps=8, channels=8, max_channels=64, blocks_per_level=1,
                        lr=2e-3, flow_mle_fraction=0.5),
        "mnist_gpu": dict(flow_hidden=256, flow_steps=16, channels=64, max_channels=256,
                          blocks_per_level=2),
        "cifar10_gpu": dict(flow_hidden=256, flow_steps=16, channels=64, max_channels=256, blocks_per_level=2),
    }

    def __init__(self, config: Config, data_shape):
        super().__init__(config, data_shape)
        cfg = config
        self.flow = Glow(build_config(Glow, None, {"hidden": cfg.flow_hidden, "steps": cfg.flow_steps}),
                         self.data_shape)
        energy_cfg = build_config(IGEBM, None, {"channels": cfg.channels, "max_channels": cfg.max_channels,
                                                "blocks_per_level": cfg.blocks_per_level,
                                                "spectral_norm": False})
        self.energy = EnergyNet(energy_cfg, self.data_shape)
        self.log_norm = nn.Parameter(torch.zeros(()))  # c: the EBM's log-normaliser, learned (NCE)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))  # actnorm's data init done
        self.register_buffer("game_started", torch.zeros((), dtype=torch.bool))  # c set for the game

    # --- the two densities of y in [0, 1)^D ------------------------------------------------------
    def ebm_log_prob(self, y: torch.Tensor) -> torch.Tensor:
        """log p_theta(y) = -E(2 y - 1) - c, (B,)."""
        return -self.energy(2 * y - 1) - self.log_norm

    def flow_latents(self, n: int) -> list[torch.Tensor]:
        """Standard-normal latents shaped as Glow's ``encode`` returns them."""
        c, h, w = self.data_shape
        eps = []
        for level in range(self.flow.num_levels):
            c, h, w = c * 4, h // 2, w // 2
            if level < self.flow.num_levels - 1:
                c //= 2
            eps.append(torch.randn(n, c, h, w, device=self.device))
        return eps

    def flow_sample(self, n: int) -> torch.Tensor:
        """Reparameterised flow samples y = g(eps), (n, C, H, W), kept in the data's cube [0, 1].

        A tail latent can put y outside it (or overflow), where the logit transform's sigmoid saturates
        in float32 and log q is -inf; such pixels are clamped to the cube (their gradient is then zero),
        a small departure from the exact q for those few samples.
        """
        return torch.nan_to_num(self.flow.decode(self.flow_latents(n)), nan=0.5).clamp(0, 1)

    def logits(self, y: torch.Tensor) -> torch.Tensor:
        """The classifier's logit l(y) = log p_theta(y) - log q_alpha(y), (B,)."""
        return self.ebm_log_prob(y) - self.flow.log_prob(y)

    def value(self, y_data: torch.Tensor, y_flow: torch.Tensor) -> torch.Tensor:
        """V = E_data[log D] + E_q[log (1 - D)] (paper, eq. 4), a 0-dim tensor; <= 0, -2 log 2 undecided."""
        return F.logsigmoid(self.logits(y_data)).mean() + F.logsigmoid(-self.logits(y_flow)).mean()

    # --- training --------------------------------------------------------------------------------
    def configure_optimizers(self):
        cfg = self.config
        betas = (cfg.beta1, 0.999)
        ebm = [*self.energy.parameters(), self.log_norm]
        return {"energy": torch.optim.Adam(ebm, lr=cfg.lr, betas=betas),
                "flow": torch.optim.Adam(self.flow.parameters(), lr=cfg.lr, betas=betas)}

    def lr_factor(self, role, step):
        # The flow plays the game at game_flow_lr (its maximum-likelihood stage runs at lr).
        if role == "flow" and bool(self.game_started):
            return self.config.game_flow_lr / self.config.lr
        return 1.0

    def train_step(self, x, update):
        # Each network's gradient is clipped to Config.grad_clip by the harness (the default rule: the
        # energy's optimizer holds exactly the EBM's parameters and c, the flow's the flow's).
        cfg = self.config
        y = dequantize(x)  # (B, C, H, W) in [0, 1)
        if not self.initialized:  # actnorm's data-dependent initialisation
            self.flow.data_init(x)
            self.initialized.fill_(True)
        if self.progress < cfg.flow_mle_fraction:  # the flow by maximum likelihood (see the docstring)
            loss = bits_per_dim(self.flow.nll(x).mean(), self.num_dims)
            logs = update("flow", loss)
            return {"flow_mle_bpd": loss.detach(), **{f"flow_{k}": t for k, t in logs.items()}}

        if not self.game_started:  # c such that the classifier starts undecided on data
            with torch.no_grad():
                self.log_norm.copy_((-self.energy(2 * y - 1) - self.flow.log_prob(y)).mean())
            self.game_started.fill_(True)
        # The EBM ascends V against the flow's current samples (fixed for this step).
        with torch.no_grad():
            y_flow = self.flow_sample(x.shape[0])  # (B, C, H, W)
        v = self.value(y, y_flow)
        energy_logs = update("energy", -v)
        # The flow descends V through its density and its reparameterised samples y = g(eps), against
        # the EBM as it is after its step.
        v_flow = self.value(y, self.flow_sample(x.shape[0]))
        flow_logs = update("flow", v_flow)
        with torch.no_grad():  # the classifier's accuracy on data and on flow samples
            acc = 0.5 * ((self.logits(y) > 0).float().mean() + (self.logits(y_flow) < 0).float().mean())
        return {"value": v.detach(), "value_flow": v_flow.detach(), "accuracy": acc,
                **{f"energy_{k}": t for k, t in energy_logs.items()},
                **{f"flow_{k}": t for k, t in flow_logs.items()}}

    # --- likelihoods -----------------------------------------------------------------------------
    def nll(self, x):  # the flow's: an upper bound on -log P(x) in nats (B,), one dequantization draw
        return self.flow.nll(x)

    def nll_protocol(self):
        return {"model": "flow", "dequantization": "uniform", "dequantization_draws": 1}

    def dequantized_log_prob(self, y):  # the flow's (a Glow): the importance-weighted NLL is offered
        return self.flow.dequantized_log_prob(y)

    def ebm_nll(self, x: torch.Tensor) -> torch.Tensor:
        """The EBM's NLL (nats, (B,)) with log Z estimated by importance sampling from the flow:
        log Z = log mean_k exp(l(y_k)), y_k ~ q, ``ebm_nll_draws`` draws (an estimate, biased low in Z)."""
        k = self.config.ebm_nll_draws
        y_flow = self.flow_sample(k)
        log_z = torch.logsumexp(self.logits(y_flow), 0) - math.log(k)  # log of c's correction
        return discrete_nll_from_density(self.ebm_log_prob(dequantize(x)) - log_z, self.num_dims)

    # --- sampling --------------------------------------------------------------------------------
    def samplers(self):
        return {"one_pass": 1}  # one pass through the inverse flow

    @torch.no_grad()
    def generate(self, n, sampler):
        y = torch.nan_to_num(self.flow.decode(self.flow_latents(n)), nan=0.5)  # as Glow's sampler
        return ((256 * y - 0.5) / 127.5 - 1).clamp(-1, 1)  # the level of y's bin, on [-1, 1]

    def sampling_modules(self):
        return [self.flow]
