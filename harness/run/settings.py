"""Suites: typed defaults, a YAML file of differences, command-line overrides, and the runs they expand to.

A suite file holds only what differs from the defaults below (STYLE.md, after StudioGAN's configs);
``key=value`` overrides from the command line go on top. Everything is checked when the suite loads,
before anything trains: every key against its dataclass, every value against its type
(:mod:`trilemma.contract.typed`), every family's ``config`` against the family's own ``Config``, and
every model name against the registry. A problem is one line naming the file (or "command line"), the
key and what is allowed.

``expand`` turns a suite into :class:`Run` objects, every model x dataset x seed, each holding one
typed :class:`RunConfig`; its JSON form (``RunConfig.to_dict``) is what ``config.json`` and the result
record, and its hash decides whether a finished run is redone.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from trilemma.contract import typed
from trilemma.contract.errors import TrilemmaError
from trilemma.contract.family import build_config
from trilemma.contract.registry import get_model_class, load_plugins, model_names
from trilemma.results.compare import METRIC_KEYS
from trilemma.run.data import DataConfig, dataset_label

ALL = "all"  # in a suite's `models`: every registered family


@dataclass
class TrainConfig:
    batch_size: int = 64  # images per training step
    max_images: Optional[int] = None  # stop after this many training images...
    max_seconds: Optional[float] = None  # ...or this much training time (eval excluded), whichever first
    ema_halflife_images: float = 10_000  # EMA of the weights (EDM-style half-life); 0 turns EMA off
    ema_rampup: float = 0.05  # half-life at most this fraction of the images seen so far
    warmup_steps: int = 10  # steps left out of the steady-state throughput
    eval_points: int = 3  # evaluation points spread over the budget (the last one is the end)
    checkpoint_seconds: float = 60.0  # checkpoint at least this often (wall clock)
    log_every_steps: int = 50  # one JSON line per this many steps


@dataclass
class EvalConfig:
    fid: bool = True  # FID (and KID, precision/recall) of the final model
    fid_samples: int = 1000  # generated samples for the final FID (FID@n)
    fid_ref_images: Optional[int] = 10_000  # training images for the reference statistics; None: all
    fid_weights: Optional[str] = None  # Inception weights file; default $TRILEMMA_FID_WEIGHTS, else download
    fid_cache: Optional[str] = None  # reference-feature cache folder; default ~/.cache/trilemma/fid
    fid_batch: int = 25  # Inception batch size
    kid: bool = True
    precision_recall: bool = True
    curve_fid_samples: int = 100  # FID@n at each evaluation point during training; 0: loss only
    nll: bool = True  # NLL in bits/dim on the test split, for models with a density
    nll_images: Optional[int] = None  # test images for the NLL; None: the whole split
    nll_batch: int = 250
    sample_batch: int = 64  # batch size of the sample-speed measurement
    sample_repeats: int = 3  # timed repeats (median), after one untimed warm-up
    sample_seconds_cap: float = 60.0  # fewer repeats when one call takes longer than this
    grid_images: int = 64  # images in the saved sample grid
    scaling: bool = False  # resolution-scaling study (train-step and sample cost at several resolutions)
    scaling_resolutions: List[int] = field(default_factory=lambda: [16, 32, 64])
    scaling_batch: int = 16  # batch of the scaling study (small: pixel-by-pixel samplers at 64x64)
    scaling_repeats: int = 3
    scaling_seconds_cap: float = 30.0  # fewer repeats when one call takes longer than this


@dataclass
class ModelEntry:
    name: str  # registered model name
    preset: Optional[str] = None  # a preset of the family (e.g. "tiny", "mnist"); default: the suite's
    config: Dict[str, Any] = field(default_factory=dict)  # overrides of the family's Config
    train: Dict[str, Any] = field(default_factory=dict)  # overrides of the suite's train settings
    eval: Dict[str, Any] = field(default_factory=dict)  # overrides of the suite's eval settings


@dataclass
class SuiteConfig:
    name: str  # results go to <results>/<name>/
    description: str = ""
    plugins: List[str] = field(default_factory=list)  # Python files or modules that register families
    preset: Optional[str] = None  # the preset of every model entry that names none (and of `all`)
    models: Union[str, List[Union[str, ModelEntry]]] = field(default_factory=list)  # entries, names, "all"
    seeds: List[int] = field(default_factory=lambda: [0])
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
    datasets: List[DataConfig] = field(default_factory=lambda: [DataConfig()])
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tolerances: Dict[str, float] = field(default_factory=dict)  # for `trilemma compare`: metric -> rel. tol.


@dataclass
class RunConfig:
    """Everything one run needs, resolved: the one typed object a run travels as."""

    model: str
    preset: Optional[str]
    model_config: Dict[str, Any]  # the family's resolved Config, as plain values
    data: DataConfig
    train: TrainConfig
    eval: EvalConfig
    seed: int
    device: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written to ``config.json`` and the result (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str) -> "RunConfig":
        return typed.build(cls, values, where)

    def family_config(self):
        """The family's typed Config."""
        return build_config(get_model_class(self.model), None, self.model_config)


@dataclass
class Run:
    """One model x dataset x seed of a suite."""

    suite: str
    name: str
    config: RunConfig

    @property
    def model(self) -> str:
        return self.config.model


# --- loading --------------------------------------------------------------------------------------

def load_suite(path: str | Path, overrides: list[str] = (), plugins: list[str] = ()) -> SuiteConfig:
    """Read a suite file, apply ``key=value`` overrides, load its plugins and check everything."""
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise TrilemmaError(f"suite file {path} not found")
    try:
        raw = OmegaConf.load(path)
    except Exception as e:  # a YAML syntax error, an unreadable file
        raise TrilemmaError(f"{path}: not valid YAML: {_first_line(e)}") from None
    if not OmegaConf.is_dict(raw):
        raise TrilemmaError(f"{path}: a suite is a mapping of settings (name, models, ...), "
                            f"not a {type(OmegaConf.to_container(raw)).__name__}")
    try:
        dotlist = OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise TrilemmaError(f"command line: bad override ({_first_line(e)}); write key=value, "
                            f"e.g. train.max_seconds=30") from None
    try:
        values = OmegaConf.to_container(OmegaConf.merge(raw, dotlist), resolve=True)
    except OmegaConfBaseException as e:
        raise TrilemmaError(f"{path}: {_first_line(e)}") from None
    suite = typed.build(SuiteConfig, values, where)
    load_plugins(list(suite.plugins) + list(plugins), f"{path}: plugins", base=path.parent)
    suite.models = _entries(suite, where)
    _validate(suite, where)
    return suite


def _entries(suite: SuiteConfig, where: str) -> list[ModelEntry]:
    """The suite's `models` as entries: names and `all` expanded, the suite's preset filled in."""
    items = [suite.models] if isinstance(suite.models, str) else list(suite.models)
    named = [item if isinstance(item, str) else item.name for item in items]
    entries: list[ModelEntry] = []
    for item in items:
        if item == ALL:  # every registered family not listed by name
            entries += [ModelEntry(name) for name in model_names() if name not in named]
        elif isinstance(item, str):
            entries.append(ModelEntry(item))
        else:
            entries.append(item)
    for entry in entries:
        entry.preset = entry.preset or suite.preset
    return entries


def _validate(suite: SuiteConfig, where: str) -> None:
    if not suite.models:
        raise TrilemmaError(f"{where}: 'models' is empty; list at least one model (or: models: all)")
    for i, entry in enumerate(suite.models):
        at = f"{where}: models[{i}] ({entry.name})"
        try:
            cls = get_model_class(entry.name)  # unknown name: one line listing the registered models
        except TrilemmaError as e:
            raise TrilemmaError(f"{where}: models[{i}]: {e}") from None
        build_config(cls, entry.preset, entry.config, at)
        _merged(suite.train, entry.train, at, "train.")
        _merged(suite.eval, entry.eval, at, "eval.")
    for key in suite.tolerances:
        if key not in METRIC_KEYS:
            raise TrilemmaError(f"{where}: unknown tolerance 'tolerances.{key}'; metrics: {', '.join(METRIC_KEYS)}")
    for data in suite.datasets:
        if data.name == "npz" and not data.path:
            raise TrilemmaError(f"{where}: npz dataset needs 'path'")
    if len({dataset_label(d) for d in suite.datasets}) != len(suite.datasets):
        raise TrilemmaError(f"{where}: two datasets share a label; give each a 'label'")


def _merged(base, overrides: dict[str, Any], where: str, prefix: str):
    """``base`` (a dataclass instance) with ``overrides`` applied, type-checked."""
    return typed.build(type(base), {**dataclasses.asdict(base), **(overrides or {})}, where, prefix)


def expand(suite: SuiteConfig, only: Optional[list[str]] = None) -> list[Run]:
    """All runs of a suite (optionally only some models), fully resolved."""
    if only is not None:
        unknown = sorted(set(only) - {e.name for e in suite.models})
        if unknown:
            raise TrilemmaError(f"model {unknown[0]!r} is not in suite {suite.name!r}; "
                                f"its models: {', '.join(e.name for e in suite.models)}")
    runs = []
    for entry in suite.models:
        if only is not None and entry.name not in only:
            continue
        cls = get_model_class(entry.name)
        model_config = dataclasses.asdict(build_config(cls, entry.preset, entry.config))
        train = _merged(suite.train, entry.train, "train", "train.")
        evaluation = _merged(suite.eval, entry.eval, "eval", "eval.")
        for data in suite.datasets:
            for seed in suite.seeds:
                name = f"{entry.name}-{dataset_label(data)}-s{seed}"
                config = RunConfig(model=entry.name, preset=entry.preset, model_config=model_config,
                                   data=data, train=train, eval=evaluation, seed=seed, device=suite.device)
                runs.append(Run(suite.name, name, config))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise TrilemmaError(f"suite {suite.name!r} lists a model twice for the same dataset and seed")
    return runs


# --- what decides a run's results ------------------------------------------------------------------

def hashed_config(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a run's JSON config that decides its results: paths on this machine are left out."""
    out = {k: v for k, v in config.items() if k != "device"}
    out["data"] = {k: v for k, v in config["data"].items() if k not in ("root", "download")}
    out["eval"] = {k: v for k, v in config["eval"].items() if k not in ("fid_weights", "fid_cache")}
    return out


ADD_ON_PREFIX = "scaling"  # eval keys of measurements made on fresh models, which no other number depends on


def same_results_config(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two hashed configs give the same trained model and measurements.

    Settings of add-on measurements (the resolution-scaling study builds fresh models) are left out,
    so turning such a study on adds it to finished runs instead of retraining them.
    """
    def core(config):
        config = dict(config)
        config["eval"] = {k: v for k, v in config["eval"].items() if not k.startswith(ADD_ON_PREFIX)}
        return json.dumps(config, sort_keys=True, default=str)

    return core(a) == core(b)


def suite_dict(suite: SuiteConfig) -> dict[str, Any]:
    """The resolved suite as plain values (``suite.json``)."""
    return json.loads(json.dumps(dataclasses.asdict(suite)))


def to_yaml(obj: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(obj))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
