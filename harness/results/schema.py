"""The result schema, defined once: file names, statuses, measurement keys, and the flat summary.

Layout of a run folder, ``results/<suite>/<run>/``::

    result.json        the result document below (schema "trilemma.result/1")
    config.json        the run's resolved settings, written before it starts
    log.jsonl          one JSON line per logging tick (and events: start, resume, eval)
    samples.png        the sample grid (and samples_2x.png, at twice the resolution, for families
                       that sample at any resolution)
    model.safetensors  the evaluated weights (the EMA) of a finished run, with model.json beside it
    checkpoint.pt      while it trains: model, EMA, optimizers, loop and RNG state
    previous/<hash>/   the files of the run under an earlier config (a config change never deletes)
    .lock              the claim of the process working on the run (an OS lock, released at exit)

The document::

    schema, suite, run, status ("running" | "done" | "failed"), config_hash
    config        the run's resolved settings (model, preset, model_config, data, train, eval, seed)
    model         {"name", "title", "paper", "family", "literature", "reported", "capabilities": {...}}
    measurements  {key: measurement dict}, the keys below; each carries its own protocol fields
    evaluations   later re-measurements of the saved model (``trilemma eval``), each with its protocol
    curve         [{"images", "train_seconds", "flops", "wall_seconds", <metric>: value, ...}, ...]
    provenance    {"versions", "device", "device_name", "git_commit", "git_dirty", "seed", ...}
    error         null, or {"type", "message", "traceback"} when status is "failed"

Everything that reads results (``show``, ``compare``, the report) reads the numbers through
:func:`summarize`, so a field's name and place is written in one spot only.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from trilemma.contract.literature import reported_fields

SCHEMA = "trilemma.result/1"

# Files of a run folder, and the suite folder's record of the resolved suite.
RESULT_FILE = "result.json"
CONFIG_FILE = "config.json"
LOG_FILE = "log.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
SAMPLES_FILE = "samples.png"
SAMPLES_2X_FILE = "samples_2x.png"  # families that sample at any resolution: a grid at twice the training one
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_CONFIG_FILE = "model.json"  # what is needed to rebuild the model the weights belong to
SUITE_FILE = "suite.json"
PREVIOUS_DIR = "previous"  # <run>/previous/<config hash>/: the results of a run's earlier configs

STATUS_RUNNING, STATUS_DONE, STATUS_FAILED = "running", "done", "failed"

# Measurement keys, and the fields the summary reads from each.
TRAIN = "train"  # images_per_second, images_seen, steps, train_seconds, train_flops, wall_seconds, batch_size, precision
SAMPLE = "sample"  # {"default": name, "samplers": {name: {images_per_second, nfe_per_sample, ...}}}
PARAMS = "params"  # total, sampling
MEMORY = "memory"  # {"train": {peak_bytes, kind}, "sample": {...}}
FID = "fid"  # fid, kid_mean, kid_std, precision, recall, n_gen, n_ref, reference, extractor, sampler,
#   bootstrap {"fid_ci": [lo, hi], "kid_ci", "precision_ci", "recall_ci", "resamples", "level", ...}
NLL = "nll"  # bpd, bpd_sem, bound, kind, split, n_images, protocol
SCALING = "scaling"  # resolutions, points, slopes {train, sample, memory}, batch_size, ...
EVALUATIONS = "evaluations"  # top-level list of later re-measurements


@dataclass
class Summary:
    """The numbers of one result that tables and comparisons read, flat; None where not measured."""

    run: Optional[str]
    status: Optional[str]
    model: Optional[str]
    title: Optional[str]
    family: str
    literature: Optional[str]
    density: Optional[str]
    free_form_jacobian: Optional[bool]
    dataset: str
    seed: Optional[int]
    train_images_per_second: Optional[float]
    train_seconds: Optional[float]
    images_seen: Optional[int]
    train_flops: Optional[float]
    wall_seconds: Optional[float]
    train_peak_bytes: Optional[int]
    memory_kind: Optional[str]
    sampler: Optional[str]
    sample_images_per_second: Optional[float]
    sample_nfe: Optional[int]
    params: Optional[int]
    params_sampling: Optional[int]
    scaling_train: Optional[float]
    scaling_sample: Optional[float]
    scaling_memory: Optional[float]
    fid: Optional[float]
    fid_n: Optional[int]
    kid: Optional[float]
    precision: Optional[float]
    recall: Optional[float]
    nll: Optional[float]
    nll_bound: Optional[bool]
    nll_kind: Optional[str]
    device_name: Optional[str]
    # Half-widths of the 95 % intervals of one run: bootstrap over the generated samples for FID, KID,
    # precision and recall; 1.96 standard errors of the mean over test images for a Monte-Carlo NLL.
    fid_pm: Optional[float] = None
    kid_pm: Optional[float] = None
    precision_pm: Optional[float] = None
    recall_pm: Optional[float] = None
    nll_pm: Optional[float] = None
    # FID∞ (Chong & Forsyth 2020), where the sample budget allowed it, and 1.96 standard errors of its fit.
    fid_inf: Optional[float] = None
    fid_inf_pm: Optional[float] = None
    # Speeds' spread: half the interquartile range of the timed repeats, in images/s.
    sample_images_per_second_pm: Optional[float] = None
    train_images_per_second_pm: Optional[float] = None
    contended: Optional[bool] = None  # some speed was timed on a machine busier than its cores
    # A family the review has no row for: its own paper's figures (``GenerativeModel.reported``).
    reported_fid: Optional[float] = None
    reported_nll: Optional[float] = None
    reported_nfe: Optional[int] = None
    reported_source: Optional[str] = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _section(mapping: Any, key: str) -> dict[str, Any]:
    value = mapping.get(key) if isinstance(mapping, dict) else None
    return value if isinstance(value, dict) else {}


def default_sampler(measurements: dict[str, Any]) -> dict[str, Any]:
    """The sample-speed record of the default sampler ({} when sample speed was not measured)."""
    sample = _section(measurements, SAMPLE)
    return _section(_section(sample, "samplers"), sample.get("default"))


def dataset_label(config: dict[str, Any]) -> str:
    """A run's dataset label from its stored config (as ``trilemma.run.data.dataset_label``)."""
    data = _section(config, "data")
    if data.get("label"):
        return data["label"]
    if data.get("name") == "npz" and data.get("path"):
        return Path(data["path"]).name
    return data.get("name") or "?"


def _half_width(interval: Any) -> Optional[float]:
    if isinstance(interval, (list, tuple)) and len(interval) == 2 and None not in interval:
        return (interval[1] - interval[0]) / 2
    return None


def _rate_spread(timing: dict[str, Any]) -> Optional[float]:
    """Half the interquartile range of a timed rate, in images/s, from the per-call seconds' IQR."""
    rate, iqr, median = (timing.get(k) for k in ("images_per_second", "iqr_seconds", "seconds_per_batch"))
    if not all(isinstance(v, (int, float)) for v in (rate, iqr, median)) or median <= 0:
        return None
    return rate * iqr / (2 * median)


def summarize(result: dict[str, Any]) -> Summary:
    """The flat :class:`Summary` of a result document."""
    m, model, config = (_section(result, k) for k in ("measurements", "model", "config"))
    caps = _section(model, "capabilities")
    train, params, fid, nll = (_section(m, k) for k in (TRAIN, PARAMS, FID, NLL))
    memory = _section(_section(m, MEMORY), "train")
    slopes = _section(_section(m, SCALING), "slopes")
    default = default_sampler(m)
    density = caps.get("density")
    return Summary(
        run=result.get("run"), status=result.get("status"),
        model=model.get("name") or config.get("model"), title=model.get("title"),
        family=model.get("family") or "", literature=model.get("literature"), density=density,
        free_form_jacobian=caps.get("free_form_jacobian"), dataset=dataset_label(config),
        seed=config.get("seed"),
        train_images_per_second=train.get("images_per_second"), train_seconds=train.get("train_seconds"),
        images_seen=train.get("images_seen"), train_flops=train.get("train_flops"),
        wall_seconds=train.get("wall_seconds"),
        train_peak_bytes=memory.get("peak_bytes"), memory_kind=memory.get("kind"),
        sampler=_section(m, SAMPLE).get("default"),
        sample_images_per_second=default.get("images_per_second"), sample_nfe=default.get("nfe_per_sample"),
        params=params.get("total"), params_sampling=params.get("sampling"),
        scaling_train=slopes.get("train"), scaling_sample=slopes.get("sample"),
        scaling_memory=slopes.get("memory"),
        fid=fid.get("fid"), fid_n=fid.get("n_gen"), kid=fid.get("kid_mean"),
        precision=fid.get("precision"), recall=fid.get("recall"),
        fid_inf=fid.get("fid_inf"),
        fid_inf_pm=1.96 * fid["fid_inf_se"] if isinstance(fid.get("fid_inf_se"), (int, float)) else None,
        nll=nll.get("bpd"), nll_bound=nll.get("bound"),
        nll_kind=nll.get("kind") or (("bound" if nll.get("bound") else density) if nll else None),
        device_name=_section(result, "provenance").get("device_name"),
        **{f"{k}_pm": _half_width(_section(fid, "bootstrap").get(f"{k}_ci"))
           for k in ("fid", "kid", "precision", "recall")},
        sample_images_per_second_pm=_rate_spread(default),
        train_images_per_second_pm=_rate_spread(train),
        contended=any(bool(x.get("contended")) for x in (train, default)) or None,
        **reported_fields(_section(model, "reported")),
        nll_pm=1.96 * nll["bpd_sem"] if isinstance(nll.get("bpd_sem"), (int, float))
        and nll.get("bpd_sem") == nll.get("bpd_sem") and nll.get("kind") != "exact" else None,
    )
