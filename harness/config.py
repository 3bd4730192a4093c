"""Suites: typed defaults (omegaconf structured configs), a YAML file of differences, CLI overrides.

A suite file holds only what differs from the defaults below; an unknown or mistyped key is an error
that names the key and the file. ``expand`` turns a suite into runs: every model x dataset x seed,
each a fully resolved, JSON-serializable config whose hash decides whether a finished run is redone.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from harness.data import DataConfig, dataset_label
from harness.errors import TrilemmaError
from harness.model import build_config, get_model_class


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
    name: str = MISSING  # registered model name
    preset: Optional[str] = None  # a preset of the family (e.g. "tiny", "mnist")
    config: Dict[str, Any] = field(default_factory=dict)  # overrides of the family's Config
    train: Dict[str, Any] = field(default_factory=dict)  # overrides of the suite's train settings
    eval: Dict[str, Any] = field(default_factory=dict)  # overrides of the suite's eval settings


@dataclass
class SuiteConfig:
    name: str = MISSING  # results go to <results>/<name>/
    description: str = ""
    seeds: List[int] = field(default_factory=lambda: [0])
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
    datasets: List[DataConfig] = field(default_factory=lambda: [DataConfig()])
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    models: List[ModelEntry] = field(default_factory=list)
    tolerances: Dict[str, float] = field(default_factory=dict)  # for `trilemma compare`: metric -> rel. tol.


@dataclass
class Run:
    """One model x dataset x seed of a suite, with everything resolved."""

    suite: str
    name: str
    config: dict[str, Any]  # JSON-serializable: model, preset, model_config, data, train, eval, seed, device

    @property
    def model(self) -> str:
        return self.config["model"]


def _error(path: str, e: OmegaConfBaseException) -> TrilemmaError:
    key = getattr(e, "full_key", None) or ""
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, ConfigKeyError):
        return TrilemmaError(f"{path}: unknown key '{key}' ({first})")
    return TrilemmaError(f"{path}: bad value for '{key}': {first}")


def load_suite(path: str | Path, overrides: list[str] = ()) -> SuiteConfig:
    """Read a suite file over the typed defaults, then ``key=value`` overrides; validate everything."""
    path = Path(path)
    if not path.is_file():
        raise TrilemmaError(f"suite file {path} not found")
    try:
        raw = OmegaConf.load(path)
    except Exception as e:
        raise TrilemmaError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    schema = OmegaConf.structured(SuiteConfig)
    try:
        cfg = OmegaConf.merge(schema, raw)
    except OmegaConfBaseException as e:
        raise _error(str(path), e) from None
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        raise _error("command line", e) from None
    try:
        suite: SuiteConfig = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise _error(str(path), e) from None
    _validate(suite, str(path))
    return suite


def _validate(suite: SuiteConfig, path: str) -> None:
    if not suite.models:
        raise TrilemmaError(f"{path}: 'models' is empty; list at least one model")
    for i, entry in enumerate(suite.models):
        try:
            cls = get_model_class(entry.name)  # unknown name: one-line error listing the registered models
            build_config(cls, entry.preset, entry.config)
        except TrilemmaError as e:
            raise TrilemmaError(f"{path}: models[{i}]: {e}") from None
        for section, schema in (("train", TrainConfig), ("eval", EvalConfig)):
            _merge_section(schema(), getattr(entry, section), f"{path}: models[{i}].{section}")
    from harness.compare import METRIC_KEYS

    for key in suite.tolerances:
        if key not in METRIC_KEYS:
            raise TrilemmaError(f"{path}: unknown tolerance 'tolerances.{key}'; metrics: {', '.join(METRIC_KEYS)}")
    for data in suite.datasets:
        if data.name == "npz" and not data.path:
            raise TrilemmaError(f"{path}: npz dataset needs 'path'")
    if len({dataset_label(d) for d in suite.datasets}) != len(suite.datasets):
        raise TrilemmaError(f"{path}: two datasets share a label; give each a 'label'")


def _merge_section(base, overrides: dict[str, Any], where: str):
    try:
        merged = OmegaConf.merge(OmegaConf.structured(base), overrides)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise _error(where, e) from None


def expand(suite: SuiteConfig, only: Optional[list[str]] = None) -> list[Run]:
    """All runs of a suite (optionally only some models), fully resolved."""
    runs = []
    for entry in suite.models:
        if only and entry.name not in only:
            continue
        cls = get_model_class(entry.name)
        model_config = dataclasses.asdict(build_config(cls, entry.preset, entry.config))
        train = dataclasses.asdict(_merge_section(suite.train, entry.train, "train"))
        evaluation = dataclasses.asdict(_merge_section(suite.eval, entry.eval, "eval"))
        for data in suite.datasets:
            data_dict = dataclasses.asdict(data)
            for seed in suite.seeds:
                name = f"{entry.name}-{dataset_label(data)}-s{seed}"
                runs.append(Run(suite.name, name, {
                    "model": entry.name, "preset": entry.preset, "model_config": model_config,
                    "data": data_dict, "train": train, "eval": evaluation, "seed": seed,
                    "device": suite.device}))
    if only:
        unknown = sorted(set(only) - {e.name for e in suite.models})
        if unknown:
            raise TrilemmaError(f"model {unknown[0]!r} is not in suite {suite.name!r}; "
                                f"its models: {', '.join(e.name for e in suite.models)}")
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise TrilemmaError(f"suite {suite.name!r} lists a model twice for the same dataset and seed")
    return runs


def hashed_config(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a run config that decides its results: paths on this machine are left out."""
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


def to_yaml(obj: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(obj))
