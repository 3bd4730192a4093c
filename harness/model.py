"""The model contract: what every family implements, and the registry that names them.

A family is one subclass of :class:`GenerativeModel` in one file under ``models/``, decorated with
:func:`register`. The harness only ever talks to a model through this interface and reads its
declared :class:`Capabilities` to decide what to measure and how the table marks it; it never
branches on a model's name.

Data convention, shared by every family:
    * a training or evaluation batch is the dataset's raw ``uint8`` tensor ``(B, C, H, W)`` on the
      model's device; the model converts it with :mod:`harness.likelihood` (``to_signed`` for a
      [-1, 1] network input, ``dequantize`` for a continuous density);
    * ``sample(n)`` returns a float tensor ``(n, C, H, W)`` in [-1, 1];
    * ``nll(x)`` returns the negative log-likelihood of the *discrete* 8-bit images in nats, one
      value per image; the harness converts it to bits/dim in :mod:`harness.likelihood`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Optional

import torch
from torch import nn

from harness.errors import TrilemmaError

Density = Literal["exact", "bound", "none"]
Sampling = Literal["one_pass", "iterative", "autoregressive", "mcmc"]
DENSITIES = ("exact", "bound", "none")
SAMPLINGS = ("one_pass", "iterative", "autoregressive", "mcmc")


@dataclass(frozen=True)
class Capabilities:
    """What a family can do, declared once in its file and read by the harness and the report."""

    density: Density  # "exact": log p(x) exactly; "bound": an upper bound on -log p(x); "none"
    free_form_jacobian: bool  # True when the network is unconstrained (no invertibility/causality)
    sampling: Sampling  # how a sample is drawn: one network pass, an iterative chain, pixel by pixel, or MCMC

    def __post_init__(self):
        if self.density not in DENSITIES:
            raise ValueError(f"density must be one of {DENSITIES}, got {self.density!r}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {self.sampling!r}")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


Optimizers = dict[str, torch.optim.Optimizer]


class GenerativeModel(nn.Module):
    """Base class of every family. Subclasses set the class attributes and implement the methods.

    Class attributes:
        name: registry name, set by :func:`register`.
        paper: the citation of the paper this is a small version of.
        family, literature: where the model sits in the review's table (read by the report).
        capabilities: the family's :class:`Capabilities`.
        Config: a dataclass of hyper-parameters, every field with a default and a comment.
        presets: named partial configs; every family has ``"tiny"`` (for tests, seconds on a CPU).
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    family: ClassVar[str] = ""  # the review's family: GAN, EBM, VAE, AR, Flow, or a family of its own
    literature: ClassVar[Optional[str]] = None  # this model's row in the review's table, if it has one
    capabilities: ClassVar[Capabilities]
    Config: ClassVar[type]
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, config: Any, data_shape: tuple[int, int, int]):
        super().__init__()
        self.config = config
        self.data_shape = tuple(data_shape)  # (C, H, W)

    @property
    def num_dims(self) -> int:
        c, h, w = self.data_shape
        return c * h * w

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # --- training -------------------------------------------------------------------------------
    def configure_optimizers(self) -> Optimizers:
        """Create the optimizers, once, after the model is on its device. Names key the checkpoint."""
        raise NotImplementedError

    def train_step(self, x: torch.Tensor, optimizers: Optimizers) -> dict[str, float]:
        """One full update on a uint8 batch ``(B, C, H, W)``: forward, backward, optimizer steps.

        Families with several optimizers (a GAN) run all of them here. Returns scalar losses
        for the log, as Python floats.
        """
        raise NotImplementedError

    # --- sampling -------------------------------------------------------------------------------
    def samplers(self) -> dict[str, int]:
        """Available samplers, name -> network evaluations per sample; the first is the default."""
        return {"default": 1}

    def sample(self, n: int, sampler: str | None = None) -> torch.Tensor:
        """``n`` samples ``(n, C, H, W)`` in [-1, 1], drawn with the global torch RNG."""
        raise NotImplementedError

    def sampling_modules(self) -> list[nn.Module]:
        """The sub-modules whose parameters sampling needs (a GAN's generator, a VAE's decoder)."""
        return [self]

    # --- likelihood -----------------------------------------------------------------------------
    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of uint8 images in nats, shape ``(B,)``.

        Exact, or an upper bound, as ``capabilities.density`` says. Only called when the density is
        not ``"none"``.
        """
        raise NotImplementedError(f"{self.name} declares no density")

    def nll_protocol(self) -> dict[str, Any]:
        """Settings that change the NLL value and are recorded with it (timesteps, samples...)."""
        return {}


_REGISTRY: dict[str, type[GenerativeModel]] = {}


def register(name: str):
    """Class decorator: register a family under ``name`` after checking that it is complete."""

    def wrap(cls: type[GenerativeModel]) -> type[GenerativeModel]:
        if not name.isidentifier() or name != name.lower():
            raise ValueError(f"model name must be a lowercase identifier, got {name!r}")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"model {name!r} is registered twice")
        if not issubclass(cls, GenerativeModel):
            raise TypeError(f"{cls.__name__} must subclass GenerativeModel")
        if not isinstance(getattr(cls, "capabilities", None), Capabilities):
            raise TypeError(f"{cls.__name__} must declare capabilities = Capabilities(...)")
        if not dataclasses.is_dataclass(getattr(cls, "Config", None)):
            raise TypeError(f"{cls.__name__}.Config must be a dataclass")
        if "tiny" not in cls.presets:
            raise TypeError(f"{cls.__name__} must define presets['tiny'] for the tests")
        if not cls.paper:
            raise TypeError(f"{cls.__name__} must cite its paper")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def registered() -> dict[str, type[GenerativeModel]]:
    """All registered families, by name, in registration order (``models/__init__.py``'s order)."""
    import models  # noqa: F401  (importing the package registers every family)

    return dict(_REGISTRY)


def get_model_class(name: str) -> type[GenerativeModel]:
    models = registered()
    if name not in models:
        raise TrilemmaError(f"unknown model {name!r}; registered models: {', '.join(models)}")
    return models[name]


def build_config(cls: type[GenerativeModel], preset: str | None, overrides: dict[str, Any]):
    """The family's Config from its defaults, then a preset, then explicit overrides.

    Unknown keys raise ``TrilemmaError`` naming the key and the allowed ones.
    """
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in cls.presets:
            raise TrilemmaError(
                f"model {cls.name!r} has no preset {preset!r}; presets: {', '.join(cls.presets)}")
        values.update(cls.presets[preset])
    values.update(overrides or {})
    unknown = sorted(set(values) - fields)
    if unknown:
        raise TrilemmaError(f"model {cls.name!r} has no config key {unknown[0]!r}; "
                            f"allowed: {', '.join(sorted(fields))}")
    return cls.Config(**values)


def build_model(name: str, data_shape: tuple[int, int, int], preset: str | None = None,
                overrides: dict[str, Any] | None = None) -> GenerativeModel:
    cls = get_model_class(name)
    return cls(build_config(cls, preset, overrides or {}), data_shape)


def count_parameters(modules: list[nn.Module]) -> int:
    """Parameters of several modules, each shared tensor counted once."""
    seen = {id(p): p.numel() for m in modules for p in m.parameters()}
    return sum(seen.values())
