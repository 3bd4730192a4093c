"""The family contract: what every generative model implements, and what it declares about itself.

A family is one subclass of :class:`GenerativeModel` in one file. The harness talks to a model only
through this interface, and reads its declared :class:`Capabilities` to decide what to measure and how
the table marks it; it never branches on a model's name. ``trilemma/models/README.md`` is the checklist
for adding one.

Data convention, shared by every family:
    * a training or evaluation batch is the dataset's raw ``uint8`` tensor ``(B, C, H, W)`` on the
      model's device; the model converts it with :mod:`trilemma.contract.likelihood` (``to_signed``
      for a [-1, 1] network input, ``dequantize`` for a continuous density);
    * ``sample(n)`` returns a float tensor ``(n, C, H, W)`` in [-1, 1];
    * ``nll(x)`` returns the negative log-likelihood of the *discrete* 8-bit images in nats, one value
      per image; the harness converts it to bits/dim in :mod:`trilemma.contract.likelihood`.

Naming conventions, checked by :func:`validate_family` and :func:`trilemma.contract.testing.check_contract`:
    * samplers are named by their procedure (``one_pass``, ``ancestral``, ``ddim``, ``langevin``); the
      first is the default; :meth:`GenerativeModel.sample` rejects an unknown name for every family;
    * optimizers are keyed by the role of what they train: ``model`` for one optimizer over the whole
      model, else the network's role (``generator``, ``discriminator``, ``energy``, ``prior``), never the
      optimizer's type (``adam``);
    * ``nll_protocol()`` keys are snake_case; Monte-Carlo draw counts end in ``_draws``
      (``dequantization_draws``, ``latent_draws``); ``bound`` or ``estimator`` says what the number is.
"""
from __future__ import annotations

import abc
import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Mapping, Optional

import torch
from torch import nn

from trilemma.contract import typed
from trilemma.contract.errors import TrilemmaError
from trilemma.contract.literature import MODEL_FAMILIES, REPORTED_KEYS, seed_models
from trilemma.contract.update import GradientRule, Update

Density = Literal["exact", "bound", "estimate", "none"]
Sampling = Literal["one_pass", "iterative", "autoregressive", "mcmc"]
DENSITIES = ("exact", "bound", "estimate", "none")
SAMPLINGS = ("one_pass", "iterative", "autoregressive", "mcmc")
# Optimizer keys that name a type instead of a role (rejected by the contract check).
OPTIMIZER_TYPES = frozenset(name.lower() for name in dir(torch.optim)
                            if isinstance(getattr(torch.optim, name), type)
                            and issubclass(getattr(torch.optim, name), torch.optim.Optimizer))


@dataclass(frozen=True)
class Capabilities:
    """What a family can do, declared once in its file and read by the harness and the report."""

    density: Density  # "exact": log p(x); "bound": an upper bound on -log p(x) (or its unbiased
    #   estimate: a Hutchinson trace or a power series with one dequantization draw); "estimate": a
    #   Monte-Carlo estimate of the exact -log p(x) (trilemma.contract.likelihood says which is which); "none"
    free_form_jacobian: bool  # True when the network is unconstrained (no invertibility/causality)
    sampling: Sampling  # one network pass, an iterative chain, pixel by pixel, or MCMC
    conditional: bool = False  # trained on class labels (train_step gets `labels`); samples draw
    #   classes uniformly, and its FID is marked as class-conditional
    any_resolution: bool = False  # samples at resolutions it was not trained at (`generate_at`)

    def __post_init__(self):
        if self.density not in DENSITIES:
            raise ValueError(f"density must be one of {DENSITIES}, got {self.density!r}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {self.sampling!r}")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


Optimizers = dict[str, torch.optim.Optimizer]
Losses = dict[str, "torch.Tensor | float"]


class GenerativeModel(nn.Module, metaclass=abc.ABCMeta):
    """Base class of every family. Subclasses set the class attributes and implement the methods.

    Class attributes:
        name: the registry name (a lowercase identifier, e.g. ``"dcgan"``).
        title: the name the report prints (``"DCGAN"``); defaults to the literature row or ``name``.
        paper: the citation of the paper this is a small version of.
        family: the review's section: GAN, EBM, VAE, AR or Flow (or OT, the seed's own decoder).
        literature: this model's row in the review's table (``seed_table.csv``), if it has one.
        reported: for a family the review's table has no row for, its paper's own CIFAR-10 figures,
            ``{"fid": 1.97, "nll": None, "nfe": 35, "source": "Karras et al. 2022, Table 2"}``.
        capabilities: the family's :class:`Capabilities`.
        Config: a dataclass of hyper-parameters, every field typed, with a default and a comment.
        presets: named partial configs; every family has ``"tiny"`` (tests, seconds on a CPU).
        compilable: False when ``train.compile`` / ``eval.compile`` must leave its networks eager
            (they re-trace on every call, or use what torch.compile does not support).
        nfe_is_full_pass: False when one of the sampler's network evaluations is a part of the network
            (one block of a flow's inversion); the GPU-hours estimate then counts the FLOPs of one
            sample instead of NFE full passes (it always does for autoregressive samplers, whose
            evaluations are one position each).

    The training loop sets :attr:`progress` (the fraction of the budget done, 0 to 1) before each
    :meth:`train_step`, for families whose schedule is part of the budget (growing a GAN, training a
    prior after its autoencoder).
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    family: ClassVar[str] = ""
    literature: ClassVar[Optional[str]] = None
    reported: ClassVar[Optional[dict[str, Any]]] = None
    capabilities: ClassVar[Capabilities]
    Config: ClassVar[type]
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    compilable: ClassVar[bool] = True
    nfe_is_full_pass: ClassVar[bool] = True

    def __init__(self, config: Any, data_shape: tuple[int, int, int]):
        super().__init__()
        self.config = config
        self.data_shape = tuple(data_shape)  # (C, H, W)
        self.progress = 0.0  # fraction of the training budget done; set by the training loop
        self.capabilities = self.capabilities_for(config)  # this instance's, which its config may switch

    @classmethod
    def display_name(cls) -> str:
        return cls.title or cls.literature or cls.name

    @classmethod
    def capabilities_for(cls, config: Any) -> Capabilities:
        """The capabilities of a model built with ``config``: the class's declaration (that of the
        default config), with ``conditional`` taken from ``config.conditional`` where the family's
        Config has that field (a family that trains with or without labels). The harness reads an
        instance's ``model.capabilities`` (set from this), or this before building one."""
        flag = getattr(config, "conditional", None)
        if flag is None:
            return cls.capabilities
        return dataclasses.replace(cls.capabilities, conditional=bool(flag))

    @property
    def num_dims(self) -> int:
        c, h, w = self.data_shape
        return c * h * w

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # --- training -------------------------------------------------------------------------------
    @abc.abstractmethod
    def configure_optimizers(self) -> Optimizers:
        """The optimizers, created once after the model is on its device, keyed by role (above)."""

    def loss(self, x: torch.Tensor) -> Losses:
        """What one training step minimises on a uint8 batch ``(B, C, H, W)``, keyed by role.

        The entries keyed by an optimizer's role (``"model"``, or ``"autoencoder"`` and ``"prior"``)
        are differentiable scalars, each minimised by that optimizer's step, in the order of
        :meth:`configure_optimizers`; a role left out is not stepped this time (a stage of a
        staged schedule). Every other entry is a figure to log (detached by the harness). A
        conditional family (``capabilities.conditional``) is called with ``labels=``, the batch's
        class labels ``(B,)`` int64; its ``Config`` has ``num_classes``.
        """
        raise NotImplementedError(f"{self.name} implements neither loss() nor train_step()")

    def train_step(self, x: torch.Tensor, update: Update, **condition: torch.Tensor) -> Losses:
        """One full update on a uint8 batch: by default :meth:`loss`, then ``update(role, loss)`` for
        each role it returned. Returns the figures to log as detached 0-dim tensors (read by the loop
        only at logging ticks): the other entries of :meth:`loss`, each role's loss (``loss`` for a
        family of one optimizer, else ``<role>_loss``) and what its update measured (``grad_norm``,
        ``skipped``, prefixed the same way).

        Override it only for an update that is not one loss per optimizer computed up front (a GAN's
        generator loss is computed after its discriminator has stepped); the override calls
        ``update(role, loss)`` for each step, never ``zero_grad``, ``backward`` or ``step`` itself.
        """
        out = self.loss(x, **condition)
        roles = [role for role in update.roles if role in out]
        if not roles:
            raise TrilemmaError(f"{self.name}.loss() returned no loss for any optimizer role "
                                f"({', '.join(update.roles)}); it returned {', '.join(out) or 'nothing'}")
        logs = {k: v.detach() if torch.is_tensor(v) else v for k, v in out.items() if k not in update.roles}
        for role in roles:
            prefix = "" if len(update.roles) == 1 else f"{role}_"
            logs[f"{prefix}loss"] = out[role].detach()
            logs.update({f"{prefix}{k}": v for k, v in update(role, out[role]).items()})
        return logs

    def gradient_rule(self, role: str) -> GradientRule:
        """How the harness treats ``role``'s gradients: by default clipped to ``Config.grad_clip``
        when the family's Config has that field and it is above 0, else left as they are."""
        clip = getattr(self.config, "grad_clip", 0.0)
        return GradientRule(clip=float(clip) if clip and clip > 0 else None)

    def lr_factor(self, role: str, step: int) -> float:
        """The learning rate of ``role``'s optimizer at training step ``step`` (0-based), as a factor
        of the rate it was created with: the family's schedule (a warm-up), applied by the harness."""
        return 1.0

    # --- sampling -------------------------------------------------------------------------------
    @abc.abstractmethod
    def samplers(self) -> dict[str, int]:
        """The samplers, name -> network evaluations per sample (NFE); the first is the default."""

    @abc.abstractmethod
    def generate(self, n: int, sampler: str) -> torch.Tensor:
        """``n`` samples ``(n, C, H, W)`` in [-1, 1] from the named sampler (already checked)."""

    def sample(self, n: int, sampler: str | None = None) -> torch.Tensor:
        """``n`` samples ``(n, C, H, W)`` in [-1, 1], drawn with the global torch RNG.

        ``sampler`` is a name of :meth:`samplers` (default: the first); any other name is an error.
        """
        return self.generate(n, self.resolve_sampler(sampler))

    def resolve_sampler(self, sampler: str | None) -> str:
        samplers = self.samplers()
        if sampler is None:
            return next(iter(samplers))
        if sampler not in samplers:
            raise TrilemmaError(f"model {self.name!r} has no sampler {sampler!r}; samplers: "
                                f"{', '.join(samplers)}")
        return sampler

    def generate_at(self, n: int, resolution: int, sampler: str | None = None) -> torch.Tensor:
        """``n`` samples at ``resolution`` x ``resolution`` (families with ``any_resolution``)."""
        raise NotImplementedError(f"{self.name} samples only at the resolution it was built for")

    def sampling_modules(self) -> list[nn.Module]:
        """The sub-modules whose parameters sampling needs (a GAN's generator, a VAE's decoder)."""
        return [self]

    # --- likelihood -----------------------------------------------------------------------------
    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of uint8 images in nats, shape ``(B,)``.

        Exact, an upper bound or an estimate, as ``capabilities.density`` says. Only called when the
        density is not ``"none"``.
        """
        raise NotImplementedError(f"{self.name} declares no density")

    def nll_protocol(self) -> dict[str, Any]:
        """Settings that change the NLL value and are recorded with it (timesteps, draws...). Keys
        prefixed ``weighted_`` say what :meth:`dequantized_log_prob` computes differently
        (``weighted_estimator: "exact"``); they replace their namesakes in the importance-weighted
        figure's record."""
        return {}

    def dequantized_log_prob(self, y: torch.Tensor) -> torch.Tensor:
        """``log p(y)`` in nats, ``(B,)``, of uniformly dequantized images ``y`` in [0, 1)^D.

        Optional, for a family whose density is of dequantized data: implementing it offers the
        importance-weighted NLL over ``eval.nll_draws`` draws
        (:func:`trilemma.contract.likelihood.importance_weighted_nll`) in place of one draw's bound.
        It must be exact where ``nll()`` estimates (an exact trace, not Hutchinson's): the mean of the
        exponentials of a noisy log is biased.
        """
        raise NotImplementedError(f"{self.name} offers no log density of dequantized images")

    @classmethod
    def importance_weighted(cls) -> bool:
        """Whether the family implements :meth:`dequantized_log_prob` (offers the weighted NLL)."""
        return cls.dequantized_log_prob is not GenerativeModel.dequantized_log_prob

    def solver_error(self, x: torch.Tensor) -> Optional[dict[str, Any]]:
        """A numerical solver's error on ``nll(x)`` (an ODE likelihood: ``trilemma.models.ode.solver_error``),
        ``{"solver_error_bpd": ..., ...}``, recorded beside the NLL; None where ``nll`` solves nothing."""
        return None

    # --- pretrained weights ---------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: Any, data_shape: tuple[int, int, int], config: Any) -> "GenerativeModel":
        """Optional: ``cls(config, data_shape)`` holding the weights at ``path`` (a ``pathlib.Path``) in a
        format of the family's own: a folder another library wrote (diffusers' ``save_pretrained``),
        a paper's checkpoint layout. A suite entry's ``weights:`` calls it for any path that is not a
        ``trilemma export``; a family without it is given ``.safetensors`` files and torch state-dict
        files, read by the harness.

        Rules: read tensor formats only (safetensors, or ``torch.load(..., weights_only=True)``), never
        a pickle, which runs code when loaded; raise on what does not match (a ``ValueError`` saying
        which setting) rather than adapt the config. The harness checks the returned model's state dict
        key by key against a model built from ``config``, so ``trilemma eval`` and ``trilemma export``
        can rebuild it from the config alone.
        """
        raise NotImplementedError(f"{cls.name} reads no weights format of its own")

    @classmethod
    def reads_pretrained(cls) -> bool:
        """Whether the family implements :meth:`from_pretrained` (reads a format of its own)."""
        return getattr(cls.from_pretrained, "__func__", None) is not GenerativeModel.from_pretrained.__func__


# --- validation at registration ----------------------------------------------------------------

def validate_family(cls: Any, name: str) -> None:
    """Check that ``cls`` is a complete family registered as ``name``; a TrilemmaError says what is not."""
    where = f"model family {name!r} ({getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', cls)})"
    if not (inspect.isclass(cls) and issubclass(cls, GenerativeModel)):
        raise TrilemmaError(f"{where} must be a subclass of trilemma.GenerativeModel")
    if not name.isidentifier() or name != name.lower():
        raise TrilemmaError(f"{where}: the name must be a lowercase identifier")
    if cls.name != name:
        raise TrilemmaError(f"{where}: its class attribute name = {cls.name!r} differs from the "
                            f"registered name {name!r}")
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(cls.__abstractmethods__))
        raise TrilemmaError(f"{where} does not implement {missing}")
    if cls.loss is GenerativeModel.loss and cls.train_step is GenerativeModel.train_step:
        raise TrilemmaError(f"{where} implements neither loss() (one loss per optimizer) nor train_step()")
    if not cls.paper:
        raise TrilemmaError(f"{where} must cite its paper (class attribute paper)")
    if cls.family not in MODEL_FAMILIES:
        raise TrilemmaError(f"{where}: family {cls.family!r} is not one of {', '.join(MODEL_FAMILIES)} "
                            f"(the review's sections, and OT)")
    if cls.literature is not None and cls.literature not in seed_models():
        raise TrilemmaError(f"{where}: literature {cls.literature!r} is not a row of the review's table; "
                            f"rows: {', '.join(seed_models())} (or None)")
    if cls.reported is not None:
        if not isinstance(cls.reported, dict) or not set(cls.reported) <= set(REPORTED_KEYS) \
                or not cls.reported.get("source"):
            raise TrilemmaError(f"{where}: reported must be a dict of {', '.join(sorted(REPORTED_KEYS))} with "
                                f"a source")
    if not isinstance(getattr(cls, "capabilities", None), Capabilities):
        raise TrilemmaError(f"{where} must declare capabilities = Capabilities(...)")
    config = getattr(cls, "Config", None)
    if not dataclasses.is_dataclass(config):
        raise TrilemmaError(f"{where}: Config must be a dataclass")
    for field in dataclasses.fields(config):
        if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise TrilemmaError(f"{where}: Config.{field.name} has no default")
    if "tiny" not in cls.presets:
        raise TrilemmaError(f"{where} must define presets['tiny'] for the tests")
    for preset in cls.presets:
        build_config(cls, preset, {})  # every preset has valid keys and types


def build_config(cls: type[GenerativeModel], preset: str | None, overrides: Mapping[str, Any] | None,
                 where: str | None = None):
    """The family's Config from its defaults, then a preset, then explicit overrides, type-checked.

    A wrong key, type or value is a TrilemmaError naming ``where`` (default: the model), the key and
    what is allowed.
    """
    where = where or f"model {cls.name!r}"
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in cls.presets:
            raise TrilemmaError(f"{where}: no preset {preset!r}; presets: {', '.join(cls.presets)}")
        values.update(cls.presets[preset])
    values.update(overrides or {})
    return typed.build(cls.Config, values, where, "config.")


def count_parameters(modules: list[nn.Module]) -> int:
    """Parameters of several modules, each shared tensor counted once."""
    seen = {id(p): p.numel() for m in modules for p in m.parameters()}
    return sum(seen.values())
