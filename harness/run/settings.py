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
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Union

from omegaconf import OmegaConf

import math

from trilemma.contract import typed
from trilemma.contract.typed import SAFE_NAME, is_safe_name, require
from trilemma.contract.errors import TrilemmaError
from trilemma.contract.family import build_config
from trilemma.contract.registry import broken, get_model_class, load_plugins, model_names
from trilemma.results.compare import METRIC_KEYS
from trilemma.results.suites import first_line as _first_line
from trilemma.results.suites import read_suite_values, refuse_resolvers, resolve_suite, variant_name
from trilemma.run.data import DataConfig, dataset_label

ALL = "all"  # in a suite's `models`: every registered family
MAX_BATCH = 65_536  # any batch above this is a typo, and one allocation of it would exhaust memory
MAX_SAMPLES = 1_000_000  # FID samples: their features alone take 8 GB at this count


@dataclass
class TrainConfig:
    batch_size: int = 64  # images per training step
    max_images: Optional[int] = None  # stop after this many training images...
    max_seconds: Optional[float] = None  # ...or this much training time (eval excluded)...
    max_flops: Optional[float] = None  # ...or this many counted training FLOPs, whichever first
    flops_every_steps: int = 50  # count a step's FLOPs every this many steps (steps between: the last count)
    ema_halflife_images: float = 10_000  # EMA of the weights (EDM-style half-life); 0 turns EMA off
    ema_rampup: float = 0.05  # half-life at most this fraction of the images seen so far
    warmup_steps: int = 10  # steps left out of the steady-state throughput
    eval_points: int = 3  # evaluation points spread over the budget (the last one is the end)
    checkpoint_seconds: float = 60.0  # checkpoint at least this often (wall clock)
    log_every_steps: int = 50  # one JSON line per this many steps
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # train steps under autocast (fp16: loss scaling)
    compile: bool = False  # torch.compile the family's networks (unless the family opts out)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"  # torch.compile's mode
    tf32: bool = False  # TF32 matmuls and convolutions on CUDA (figures then say tf32, not fp32)

    def __post_init__(self):
        require(1 <= self.batch_size <= MAX_BATCH, "batch_size", f"from 1 to {MAX_BATCH:,}", self.batch_size)
        require(self.max_images is None or self.max_images >= 1, "max_images", "null or at least 1",
                self.max_images)
        require(self.max_seconds is None or 0 < self.max_seconds < math.inf, "max_seconds",
                "null or a positive number of seconds", self.max_seconds)
        require(self.max_flops is None or 0 < self.max_flops < math.inf, "max_flops",
                "null or a positive number of FLOPs (e.g. 2e15)", self.max_flops)
        require(self.flops_every_steps >= 1, "flops_every_steps", "at least 1", self.flops_every_steps)
        require(0 <= self.ema_halflife_images < math.inf, "ema_halflife_images", "0 (off) or positive",
                self.ema_halflife_images)
        require(0 <= self.ema_rampup < math.inf, "ema_rampup", "0 (off) or positive", self.ema_rampup)
        require(self.warmup_steps >= 0, "warmup_steps", "0 or more", self.warmup_steps)
        require(0 <= self.eval_points <= 1000, "eval_points", "from 0 to 1000", self.eval_points)
        require(0 <= self.checkpoint_seconds < math.inf, "checkpoint_seconds", "0 or more seconds",
                self.checkpoint_seconds)
        require(self.log_every_steps >= 1, "log_every_steps", "at least 1", self.log_every_steps)


@dataclass
class EvalConfig:
    fid: bool = True  # FID (and KID, precision/recall) of the final model
    fid_samples: int = 1000  # generated samples for the final FID (FID@n)
    fid_ref_images: Optional[int] = 10_000  # training images for the reference statistics; None: all
    fid_weights: Optional[str] = None  # Inception weights file; default $TRILEMMA_FID_WEIGHTS, else download
    fid_cache: Optional[str] = None  # reference-feature cache folder; default ~/.cache/trilemma/fid
    fid_batch: int = 0  # Inception batch size; 0: chosen (with the threads) by timing on this machine
    kid: bool = True
    precision_recall: bool = True
    curve_fid_samples: int = 100  # FID@n at each evaluation point during training; 0: loss only
    curve_precision: Literal["fp32", "bf16"] = "fp32"  # Inception for the curve points (bf16 moves FID ~2 %)
    nll: bool = True  # NLL in bits/dim on the test split, for models with a density
    nll_images: Optional[int] = None  # test images for the NLL; None: the whole split
    nll_batch: int = 250
    nll_seconds_cap: float = 900.0  # stop the NLL pass after this long (the images used are recorded)
    nll_draws: int = 1  # dequantization draws per image; > 1: importance-weighted NLL for flows offering it
    sample_batch: int = 64  # batch size of the sample-speed measurement
    sample_repeats: int = 3  # timed repeats (median), after one untimed warm-up
    sample_seconds_cap: float = 60.0  # fewer repeats when one call takes longer than this
    grid_images: int = 64  # images in the saved sample grid
    coverage: bool = True  # MNIST and Stacked MNIST: class or mode coverage by the reference MNIST classifier
    coverage_samples: int = 0  # samples scored for coverage (the FID's first ones); 0: eval.fid_samples
    scaling: bool = False  # resolution-scaling study (train-step and sample cost at several resolutions)
    scaling_resolutions: List[int] = field(default_factory=lambda: [16, 32, 64])
    scaling_batch: int = 0  # where the scaling study's batch sweep starts (0: the smallest batch); each
    #   resolution is timed at the sweep's cheapest batch per image, so the slopes do not depend on it
    scaling_repeats: int = 3
    scaling_seconds_cap: float = 30.0  # fewer repeats when one call takes longer than this
    sample_precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # sampling under autocast (NLL stays fp32)
    compile: bool = False  # torch.compile the networks of the evaluated model before sampling

    def __post_init__(self):
        require((4 if self.precision_recall else 2) <= self.fid_samples <= MAX_SAMPLES, "fid_samples",
                f"from 2 (4 with precision_recall: k = 3 neighbours) to {MAX_SAMPLES:,}", self.fid_samples)
        require(self.fid_ref_images is None or self.fid_ref_images >= 4, "fid_ref_images",
                "null (all) or at least 4", self.fid_ref_images)
        require(0 <= self.fid_batch <= MAX_BATCH, "fid_batch", f"0 (chosen by timing) to {MAX_BATCH:,}",
                self.fid_batch)
        require(self.curve_fid_samples == 0 or 2 <= self.curve_fid_samples <= MAX_SAMPLES,
                "curve_fid_samples", f"0 (off) or from 2 to {MAX_SAMPLES:,}", self.curve_fid_samples)
        for key in ("fid_weights", "fid_cache"):
            require(getattr(self, key) is None or getattr(self, key).strip() != "", key,
                    "null (the default) or a path", getattr(self, key))
        require(self.nll_images is None or self.nll_images >= 1, "nll_images", "null (all) or at least 1",
                self.nll_images)
        for key in ("nll_draws", "sample_repeats", "scaling_repeats"):
            require(getattr(self, key) >= 1, key, "at least 1", getattr(self, key))
        for key in ("nll_batch", "sample_batch"):
            require(1 <= getattr(self, key) <= MAX_BATCH, key, f"from 1 to {MAX_BATCH:,}", getattr(self, key))
        require(0 <= self.scaling_batch <= MAX_BATCH, "scaling_batch",
                f"0 (the sweep from the smallest batch) to {MAX_BATCH:,}", self.scaling_batch)
        require(0 <= self.grid_images <= MAX_BATCH, "grid_images", f"0 (none) to {MAX_BATCH:,}",
                self.grid_images)
        require(self.coverage_samples == 0 or 2 <= self.coverage_samples <= self.fid_samples, "coverage_samples",
                f"0 (eval.fid_samples) or from 2 to eval.fid_samples ({self.fid_samples:,})",
                self.coverage_samples)
        for key in ("sample_seconds_cap", "scaling_seconds_cap", "nll_seconds_cap"):
            require(0 < getattr(self, key) < math.inf, key, "a positive number of seconds", getattr(self, key))
        require(len(self.scaling_resolutions) >= 1 and all(4 <= r <= 1024 for r in self.scaling_resolutions)
                and len(set(self.scaling_resolutions)) == len(self.scaling_resolutions), "scaling_resolutions",
                "a list of distinct integers from 4 to 1024", self.scaling_resolutions)


@dataclass
class ModelEntry:
    name: str  # registered model name
    preset: Optional[str] = None  # a preset of the family (e.g. "tiny", "mnist"); default: the suite's
    config: Dict[str, Any] = field(default_factory=dict)  # overrides of the family's Config
    train: Dict[str, Any] = field(default_factory=dict)  # overrides of the suite's train settings
    eval: Dict[str, Any] = field(default_factory=dict)  # overrides of the suite's eval settings
    weights: Optional[str] = None  # measure these weights instead of training (relative to the suite file):
    #   a .safetensors or torch tensor file, a `trilemma export` folder, or a format the family reads
    train_speed: bool = False  # with weights: also time a short training run from them (the train budget)

    def __post_init__(self):
        require(self.name.isidentifier() and self.name == self.name.lower(), "name",
                "a registered model name (a lowercase identifier)", self.name)
        require(self.preset is None or self.preset.isidentifier(), "preset", "null or a preset name",
                self.preset)
        require(self.weights is None or self.weights.strip() != "", "weights", "null or a path", self.weights)
        require(not self.train_speed or self.weights is not None, "train_speed",
                "false unless the entry names weights (a trained entry always times its training)",
                self.train_speed)


@dataclass
class LauncherConfig:
    """How ``--launcher submitit`` submits a suite's runs: the suite's ``launcher:`` block (or
    ``launcher.KEY=VALUE``, or the options of ``trilemma run``). Never part of a run's config."""

    executor: Literal["auto", "local", "slurm"] = "auto"  # auto: SLURM where srun exists, else local
    jobs: int = 2  # jobs at once (SLURM array parallelism; local: processes at once)
    partition: Optional[str] = None  # SLURM partition
    gpus_per_job: int = 1  # GPUs per job (0 on a CPU-only machine)
    cpus_per_job: int = 4
    time_minutes: int = 240  # a job's time limit; a timed-out job is requeued and resumes
    memory_gb: Optional[int] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None  # e.g. "h100"
    nproc: int = 1  # processes per job (torchrun data parallelism inside each job)
    folder: str = "submitit"  # job logs, under the results folder
    extra: Dict[str, Any] = field(default_factory=dict)  # any other slurm_* parameter of submitit

    def __post_init__(self):
        for key in ("jobs", "cpus_per_job", "time_minutes", "nproc"):
            require(getattr(self, key) >= 1, key, "at least 1", getattr(self, key))
        require(self.nproc <= 1024, "nproc", "from 1 to 1024 processes per job", self.nproc)
        require(self.gpus_per_job >= 0, "gpus_per_job", "0 or more", self.gpus_per_job)
        require(self.memory_gb is None or self.memory_gb >= 1, "memory_gb", "null or at least 1",
                self.memory_gb)
        for key in ("partition", "account", "qos", "constraint"):
            require(getattr(self, key) is None or getattr(self, key).strip() != "", key, "null or a name",
                    getattr(self, key))
        folder = Path(self.folder)
        require(bool(self.folder) and not folder.is_absolute() and ".." not in folder.parts, "folder",
                "a folder inside the results folder (relative, no '..')", self.folder)


@dataclass
class SuiteConfig:
    name: str  # results go to <results>/<name>/
    description: str = ""
    plugins: List[str] = field(default_factory=list)  # Python files or modules that register families
    preset: Optional[str] = None  # the preset of every model entry that names none (and of `all`)
    models: Union[str, List[Union[str, ModelEntry]]] = field(default_factory=list)  # entries, names, "all"
    seeds: List[int] = field(default_factory=lambda: [0])
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
    threads: int = 0  # torch's CPU threads, set explicitly and recorded with every speed; 0: torch's own
    #   count (OMP_NUM_THREADS, else the machine's cores)
    datasets: List[DataConfig] = field(default_factory=lambda: [DataConfig()])
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tolerances: Dict[str, float] = field(default_factory=dict)  # for `trilemma compare`: metric -> rel. tol.
    launcher: LauncherConfig = field(default_factory=LauncherConfig)  # submitit jobs (--launcher submitit)

    def __post_init__(self):
        require(is_safe_name(self.name), "name", SAFE_NAME, self.name)
        require(len(self.seeds) >= 1 and all(0 <= s < 2 ** 32 for s in self.seeds)
                and len(set(self.seeds)) == len(self.seeds), "seeds",
                "a non-empty list of distinct integers from 0 to 2^32 - 1", self.seeds)
        require(len(self.datasets) >= 1, "datasets", "a non-empty list of data sets", self.datasets)
        require(self.models != [] and self.models != "", "models", "a list of models, or 'all'", self.models)
        require(self.preset is None or self.preset.isidentifier(), "preset", "a preset name", self.preset)
        require(_is_device(self.device), "device", "auto, cpu, cuda or cuda:N (a torch device)", self.device)
        require(0 <= self.threads <= 4096, "threads", "0 (torch's own count) or a thread count", self.threads)
        for key, value in self.tolerances.items():
            require(0 <= value < math.inf, f"tolerances.{key}", "a relative tolerance >= 0", value)
        for i, data in enumerate(self.datasets):  # what DataConfig leaves to its users, checked here
            require(data.root is None or data.root.strip() != "", f"datasets.{i}.root",
                    "null (TRILEMMA_DATA, else ~/.cache/trilemma/data) or a folder", data.root)
            for key in ("synthetic_train", "synthetic_test"):
                require(getattr(data, key) <= MAX_SAMPLES, f"datasets.{i}.{key}", f"at most {MAX_SAMPLES:,}",
                        getattr(data, key))


def _is_device(name: str) -> bool:
    """``auto``, or a name torch reads as a device (``cpu``, ``cuda``, ``cuda:1``); whether it is present
    is checked when the suite runs."""
    import torch

    try:
        return name == "auto" or (bool(name) and torch.device(name) is not None)
    except (RuntimeError, ValueError, TypeError):
        return False


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
    weights: Optional[str] = None  # pretrained: the weights measured instead of training (an absolute path)
    train_speed: bool = False  # pretrained: a short training run from the weights is timed

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

def load_suite(path: str | Path, overrides: list[str] = (), plugins: list[str] = (),
               name: Optional[str] = None) -> SuiteConfig:
    """Read a suite file, apply ``key=value`` overrides, load its plugins and check everything.

    The suite's name (its results folder) is ``name`` when given, else the file's ``name``, with a
    hash of the overrides appended when there are any (:func:`variant_name`).
    """
    path = resolve_suite(path)  # a file, or the name of a bundled suite
    where = str(path)
    values = read_suite_values(path)
    suite = typed.build(SuiteConfig, values, where)
    check_finite(suite, where)
    if overrides:  # the file is valid on its own; what the command line adds is checked as such
        for item in overrides:
            apply_override(values, item)
        suite = typed.build(SuiteConfig, values, "command line")
        check_finite(suite, "command line")
    suite.name = variant_name(suite.name, overrides, name)
    load_plugins(list(suite.plugins) + list(plugins), f"{path}: plugins", base=path.parent)
    suite.models = _entries(suite, where)
    _validate(suite, where, path.parent)
    return suite


def apply_override(values: dict[str, Any], item: str) -> None:
    """Apply one ``key=value`` (``train.batch_size=32``, ``datasets.0.name=cifar10``) to ``values``."""
    key, sep, text = item.partition("=")
    parts = key.split(".")
    if not sep or not key or not all(p.isidentifier() or p.isdigit() for p in parts):
        raise TrilemmaError(f"command line: bad override {item!r}; write key=value, e.g. train.max_seconds=30 "
                            f"or datasets.0.resolution=16")
    try:
        value = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={text}"]))["v"]
    except Exception as e:  # omegaconf's grammar errors and yaml's scanner errors alike
        raise TrilemmaError(f"command line: bad value in {item!r}: {_first_line(e)}") from None
    refuse_resolvers(value, "command line", key + ".")
    node: Any = values
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise TrilemmaError(f"command line: {item!r}: '{'.'.join(parts[:i]) or key}' is a list of "
                                    f"{len(node)}; index it with 0..{len(node) - 1}")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise TrilemmaError(f"command line: {item!r}: '{'.'.join(parts[:i])}' is a single value, not a section")


def _entries(suite: SuiteConfig, where: str) -> list[ModelEntry]:
    """The suite's `models` as entries: names and `all` expanded, the suite's preset filled in."""
    items = [suite.models] if isinstance(suite.models, str) else list(suite.models)
    named = [item if isinstance(item, str) else item.name for item in items]
    entries: list[ModelEntry] = []
    for item in items:
        if item == ALL:  # every registered family not listed by name (and usable: see registry.broken)
            unusable = broken()
            for name, why in unusable.items():
                print(f"trilemma: warning: models: all leaves out {name!r}: {why}", file=sys.stderr)
            entries += [ModelEntry(name) for name in model_names()
                        if name not in named and name not in unusable]
        elif isinstance(item, str):
            entries.append(ModelEntry(item))
        else:
            entries.append(item)
    for entry in entries:
        entry.preset = entry.preset or suite.preset
    return entries


def _validate(suite: SuiteConfig, where: str, base: Path = Path(".")) -> None:
    if not suite.models:
        raise TrilemmaError(f"{where}: 'models' is empty; list at least one model (or: models: all)")
    for i, entry in enumerate(suite.models):
        at = f"{where}: models[{i}] ({entry.name})"
        try:
            cls = get_model_class(entry.name)  # unknown name: one line listing the registered models
        except TrilemmaError as e:
            raise TrilemmaError(f"{where}: models[{i}]: {e}") from None
        checked_config(cls, entry.preset, entry.config, at)
        train = _merged(suite.train, entry.train, at, "train.")
        check_finite(train, at, "train.")
        check_finite(_merged(suite.eval, entry.eval, at, "eval."), at, "eval.")
        if entry.weights is not None:  # pretrained: the path, resolved here, names a format that loads
            from trilemma.run.pretrained import check_weights_path

            entry.weights = check_weights_path(cls, entry.weights, base, f"{at}: weights")
        timed = entry.weights is None or entry.train_speed  # a pretrained entry trains only to time it
        if timed and train.max_images is None and train.max_seconds is None and train.max_flops is None:
            raise TrilemmaError(f"{at}: the training budget never ends: set train.max_images, "
                                f"train.max_flops or train.max_seconds"
                                + (" (a short one: train_speed times a run from the weights)"
                                   if entry.weights is not None else ""))
    for key in suite.tolerances:
        if key not in METRIC_KEYS:
            raise TrilemmaError(f"{where}: unknown tolerance 'tolerances.{key}'; metrics: {', '.join(METRIC_KEYS)}")
    if len({dataset_label(d) for d in suite.datasets}) != len(suite.datasets):
        raise TrilemmaError(f"{where}: two datasets share a label; give each a 'label'")


def checked_config(cls, preset: Optional[str], overrides: dict[str, Any], where: str):
    """A family's Config as a suite entry gives it (:func:`build_config`), its floats finite."""
    config = build_config(cls, preset, overrides, where)
    check_finite(config, where, "config.")
    return config


def check_finite(obj: Any, where: str, prefix: str = "") -> None:
    """NaN and infinity are no setting's value (a YAML ``.nan`` or ``.inf`` type-checks as a float):
    a one-line error naming the key, for every float of a dataclass, its lists, mappings and sections."""
    def visit(value: Any, key: str) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            raise TrilemmaError(f"{where}: '{key}' must be a finite number, got {value}")
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            for f in dataclasses.fields(value):
                visit(getattr(value, f.name), f"{key}.{f.name}" if key else f.name)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                visit(item, f"{key}.{i}")
        elif isinstance(value, dict):
            for k, item in value.items():
                visit(item, f"{key}.{k}")

    visit(obj, prefix.rstrip("."))


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
        if entry.weights is not None:  # pretrained: no training curve (a train_speed run only times steps)
            train = dataclasses.replace(train, eval_points=0)
            evaluation = dataclasses.replace(evaluation, curve_fid_samples=0)
        for data in suite.datasets:
            for seed in suite.seeds:
                name = f"{entry.name}-{dataset_label(data)}-s{seed}"
                config = RunConfig(model=entry.name, preset=entry.preset, model_config=model_config,
                                   data=data, train=train, eval=evaluation, seed=seed, device=suite.device,
                                   weights=entry.weights, train_speed=entry.train_speed)
                runs.append(Run(suite.name, name, config))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise TrilemmaError(f"suite {suite.name!r} lists a model twice for the same dataset and seed")
    return runs


# --- what decides a run's results ------------------------------------------------------------------

# Eval settings that say where files are or how fast work runs, never what a number is.
EXECUTION_ONLY = ("fid_weights", "fid_cache", "fid_batch")


# Settings added after results existed, left out of the hash at these values (what every earlier
# run ran with), so adding them did not turn finished results stale.
LATER_DEFAULTS = {"train": {"precision": "fp32", "compile": False, "compile_mode": "default", "tf32": False,
                            "max_flops": None, "flops_every_steps": 50},
                  "eval": {"sample_precision": "fp32", "compile": False, "nll_draws": 1, "coverage": True,
                           "coverage_samples": 0}}


def hashed_config(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a run's JSON config that decides its results: paths on this machine are left out."""
    # A pretrained run's weights are named by their hash (the runner's inputs), not their path here.
    out = {k: v for k, v in config.items() if k not in ("device", "weights")
           and not (k == "train_speed" and not v)}
    out["data"] = {k: v for k, v in config["data"].items() if k not in ("root", "download")}
    out["eval"] = {k: v for k, v in config["eval"].items() if k not in EXECUTION_ONLY}
    for section, defaults in LATER_DEFAULTS.items():
        out[section] = {k: v for k, v in out[section].items() if not (k in defaults and v == defaults[k])}
    return out


ADD_ON_PREFIX = ("scaling", "coverage")  # eval keys of measurements no other number depends on


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
