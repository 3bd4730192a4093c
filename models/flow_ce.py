"""Flow Contrastive Estimation: an energy-based model and a flow trained against each other.

Gao, Nijkamp, Kingma, Xu, Dai & Wu (2020), "Flow Contrastive Estimation of Energy-Based Models", CVPR.

Two models of the dequantized image y: an EBM with a learned log-normaliser c, log p_theta(y) =
-E_theta(2 y - 1) - c, and a normalizing flow q_alpha(y). FCE is noise-contrastive estimation with the
flow as the noise, the flow trained adversarially against it (eq. 4-6): with the logit l(y) = log
p_theta(y) - log q_alpha(y), the EBM ascends V = E_data[log D] + E_q[log (1 - D)] and the flow (through
reparameterised samples and its density) descends it; ``train_step`` takes one step of each, EBM first.
The flow is the project's Glow (``parts.glow``), the energy IGEBM's ResNet (``parts.energy``) without
spectral normalisation. The density is the EBM's, as the review's row reports it: log Z estimated by
importance sampling from the flow (``log_normaliser``), the NLL importance-weighted over dequantizations
(``density="estimate"``). Samples are the flow's, one pass, as the paper's FID.

What the small version changes from the paper: a small Glow (8 steps per level, 32-48 channels) and a
narrow energy network on the CPU presets; ``flow_mle_fraction`` (our addition; 0 is the paper's joint
training) first trains the flow by maximum likelihood for part of the budget, as NCE against a flow far
from the data teaches the EBM little; c is set on the game's first batch so the classifier starts
undecided; one Adam learning rate for both; the flow's training samples are clamped to [0, 1]; the
normaliser from 4096 flow draws (256 on the CPU presets). The GPU presets are Glow at half its paper's
CIFAR-10 depth and width (16 steps per level, 256 channels) with a wider energy network, 12.9M
parameters in all.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trilemma.contract.family import Capabilities, GenerativeModel
from trilemma.contract.likelihood import bits_per_dim, dequantize, importance_weighted_nll
from trilemma.models.blocks import at_least
from trilemma.models.parts.energy import EnergyNet
from trilemma.models.parts.glow import GlowFlow

NORMALISER_CHUNK = 256  # flow draws per pass of the normaliser's estimate


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
    ebm_nll_draws: int = 4096  # flow draws of the EBM's importance-sampled normaliser (nll)
    nll_dequantization_draws: int = 8  # uniform dequantizations per image, importance-weighted (nll)

    def __post_init__(self):
        at_least(self, 1, "flow_hidden", "flow_steps", "channels", "max_channels", "blocks_per_level",
                 "ebm_nll_draws", "nll_dequantization_draws")
        if not self.lr > 0 or not self.game_flow_lr > 0:
            raise ValueError("'lr' and 'game_flow_lr' must be > 0")
        if not 0 <= self.beta1 < 1 or not 0 <= self.flow_mle_fraction < 1:
            raise ValueError("'beta1' and 'flow_mle_fraction' must be in [0, 1)")
        at_least(self, 0, "grad_clip")


class FlowCE(GenerativeModel):
    name = "flow_ce"
    title = "Flow Contrastive (EBM)"
    paper = ("Gao, Nijkamp, Kingma, Xu, Dai & Wu (2020), Flow Contrastive Estimation of Energy-Based "
             "Models, CVPR")
    family = "EBM"
    literature = "Flow Contrastive (EBM)"
    # The EBM's density (log Z estimated) and unconstrained energy network; the flow's one-pass samples.
    capabilities = Capabilities(density="estimate", free_form_jacobian=True, sampling="one_pass")
    Config = Config
    presets = {
        "tiny": dict(flow_hidden=16, flow_steps=2, channels=8, max_channels=16, blocks_per_level=1, lr=1e-3,
                     ebm_nll_draws=64, nll_dequantization_draws=2),
        # The flow by maximum likelihood for the first half of the budget, then the game.
        "mnist": dict(flow_hidden=32, flow_steps=8, channels=8, max_channels=32, blocks_per_level=1, lr=2e-3,
                      flow_mle_fraction=0.5, ebm_nll_draws=256),
        "cifar10": dict(flow_hidden=48, flow_steps=8, channels=8, max_channels=64, blocks_per_level=1,
                        lr=2e-3, flow_mle_fraction=0.5, ebm_nll_draws=256),
        "mnist_gpu": dict(flow_hidden=256, flow_steps=16, channels=64, max_channels=256,
                          blocks_per_level=2),
        "cifar10_gpu": dict(flow_hidden=256, flow_steps=16, channels=64, max_channels=256, blocks_per_level=2),
    }

    def __init__(self, config: Config, data_shape):
        super().__init__(config, data_shape)
        cfg = config
        self.flow = GlowFlow(self.data_shape, cfg.flow_hidden, cfg.flow_steps)  # Glow's defaults otherwise
        self.energy = EnergyNet(self.data_shape, cfg.channels, cfg.max_channels, cfg.blocks_per_level,
                                spectral_norm=False)
        self.log_norm = nn.Parameter(torch.zeros(()))  # c: the EBM's log-normaliser, learned (NCE)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))  # actnorm's data init done
        self.register_buffer("game_started", torch.zeros((), dtype=torch.bool))  # c set for the game
        self._normaliser = None  # (weights' key, log_normaliser()'s estimate) for the current weights
        self._flow_nats = [0.0, 0]  # the flow's NLL summed over the images nll() scored, and their count

    # --- the two densities of y in [0, 1)^D ------------------------------------------------------
    def ebm_log_prob(self, y: torch.Tensor) -> torch.Tensor:
        """log p_theta(y) = -E(2 y - 1) - c, (B,)."""
        return -self.energy(2 * y - 1) - self.log_norm

    def flow_sample(self, n: int) -> torch.Tensor:
        """Reparameterised flow samples y = g(eps), (n, C, H, W), kept in the data's cube [0, 1].

        A tail latent can put y outside it (or overflow), where the logit transform's sigmoid saturates
        in float32 and log q is -inf; such pixels are clamped to the cube (their gradient is then zero),
        a small departure from the exact q for those few samples.
        """
        return torch.nan_to_num(self.flow.decode(self.flow.latents(n)), nan=0.5).clamp(0, 1)

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

    # --- likelihood: the EBM's, its normaliser estimated from the flow ----------------------------
    def _weights_key(self) -> tuple:
        """Identifies the current weights: a tensor's version moves with each in-place update (an
        optimizer step, an EMA update, a loaded checkpoint), its address with a copy or a move."""
        return tuple((t.data_ptr(), t._version) for t in self.state_dict(keep_vars=True).values())

    @torch.no_grad()
    def log_normaliser(self) -> dict[str, float]:
        """log Z_c = log E_q[exp(l(y))], y ~ q: the EBM's log-normaliser beyond c, by importance sampling
        from ``ebm_nll_draws`` exact (unclamped) draws of the flow, estimated once per set of weights.

        Returns ``log_z`` (nats), its delta-method standard error ``se`` (sd of the weights over their
        mean, / sqrt K), the effective number of draws ``ess`` ((sum w)^2 / sum w^2) and ``dropped``, the
        draws whose weight float32 could not compute (an inverse that overflowed), counted as zero.
        """
        key = self._weights_key()
        if self._normaliser is not None and self._normaliser[0] == key:
            return self._normaliser[1]
        k = self.config.ebm_nll_draws
        chunks = []
        for start in range(0, k, NORMALISER_CHUNK):
            y = self.flow.decode(self.flow.latents(min(NORMALISER_CHUNK, k - start)))  # (n, C, H, W) ~ q
            chunks.append(self.logits(y).double())  # log importance weights l = log p~ - log q
        logits = torch.cat(chunks)  # (K,)
        finite = torch.isfinite(logits)
        if not finite.any():
            raise FloatingPointError(f"{self.name}: no finite importance weight in {k} draws of the flow")
        top = logits[finite].max()
        w = torch.where(finite, torch.exp(logits - top), torch.zeros_like(logits))  # (K,) scaled weights
        estimate = {"log_z": float(top + torch.log(w.mean())),
                    "se": float(w.std() / (w.mean() * math.sqrt(k))) if k > 1 else float("nan"),
                    "ess": float(w.sum() ** 2 / (w ** 2).sum()), "dropped": int((~finite).sum())}
        self._normaliser, self._flow_nats = (key, estimate), [0.0, 0]
        return estimate

    def nll(self, x):
        """The EBM's -log P(x) in nats (B,): its log density of dequantized images, normalised by
        ``log_normaliser``, importance-weighted over ``nll_dequantization_draws`` draws."""
        log_z = self.log_normaliser()["log_z"]
        log_p = lambda y: self.ebm_log_prob(y).double() - log_z  # noqa: E731  log p(y), (B,)
        nats = importance_weighted_nll(log_p, x, self.config.nll_dequantization_draws)
        with torch.no_grad():  # the flow's own figure on the same images, an extra of the record
            self._flow_nats[0] += float(self.flow.nll(x).double().sum())
            self._flow_nats[1] += len(x)
        return nats

    def nll_protocol(self):
        cfg, z = self.config, self.log_normaliser()
        flow_total, flow_images = self._flow_nats
        out = {"model": "ebm", "normaliser": "importance sampling from the flow",
               "support": "the flow's (its logit transform's box around the data's cube)",
               "dequantization": "uniform", "dequantization_draws": cfg.nll_dequantization_draws,
               "importance_weighted": cfg.nll_dequantization_draws > 1,
               "normaliser_draws": cfg.ebm_nll_draws, "normaliser_effective_draws": z["ess"],
               "normaliser_dropped_draws": z["dropped"],
               "log_normaliser": float(self.log_norm.detach()) + z["log_z"],  # log of the integral of exp(-E)
               "nce_log_normaliser": float(self.log_norm.detach()),  # c, as the game learned it
               "log_normaliser_se": z["se"], "log_normaliser_se_bpd": z["se"] / (self.num_dims * math.log(2))}
        if flow_images:  # the flow's one-draw bound on the images nll() scored with these weights
            out |= {"flow_bpd": flow_total / flow_images / (self.num_dims * math.log(2)),
                    "flow_bpd_images": flow_images}
        return out

    # --- sampling --------------------------------------------------------------------------------
    def samplers(self):
        return {"one_pass": 1}  # one pass through the inverse flow

    @torch.no_grad()
    def generate(self, n, sampler):
        return self.flow.sample(n)  # Glow's sampler at temperature 1

    def sampling_modules(self):
        return [self.flow]
