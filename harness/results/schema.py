"""The result schema, defined once: file names, statuses, measurement keys, and the flat summary.

A run folder (``results/<suite>/<run>/``) holds ``result.json`` (schema ``trilemma.result/2``: status,
config, model, measurements, evaluations, curve, provenance, errors), ``config.json`` written before the
run starts, ``log.jsonl``, the sample grids, the evaluated weights and, while it trains, a checkpoint;
``docs/design.md`` lists every file and field. Everything that reads results (``show``, ``compare``,
the report) reads the numbers through :func:`summarize`, so a field's name and place is written in one
spot only.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from trilemma.contract.literature import reported_fields

SCHEMA = "trilemma.result/2"
# Earlier schemas still read, migrated on read (:func:`migrate`): /1 named the FID's sample count
# ``n_gen`` in a measurement and ``fid_n`` in a curve point, where /2 names it ``fid_samples`` everywhere,
# as the suite setting does.
OLD_SCHEMAS = ("trilemma.result/1",)
_RENAMED_1 = {"n_gen": "fid_samples", "fid_n": "fid_samples"}

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
STATUS_INCOMPLETE = "incomplete"  # trained, but some measurement failed (listed under ERRORS)
STATUSES = (STATUS_RUNNING, STATUS_DONE, STATUS_INCOMPLETE, STATUS_FAILED)
MEASURED = (STATUS_DONE, STATUS_INCOMPLETE)  # statuses whose measurements are reported
ERRORS = "errors"  # top-level {measurement key: {"type", "message"}} of the failed measurements

# Measurement keys, and the fields the summary reads from each.
TRAIN = "train"  # images_per_second, images_seen, steps, train_seconds, train_flops, wall_seconds, batch_size, precision
SAMPLE = "sample"  # {"default": name, "samplers": {name: {images_per_second, nfe_per_sample, ...}}}
PARAMS = "params"  # total, sampling
MEMORY = "memory"  # {"train": {peak_bytes, kind}, "sample": {...}}
FID = "fid"  # fid, kid_mean, kid_std, precision, recall, fid_samples, n_ref, reference, extractor, sampler,
#   bootstrap {"fid_ci": [lo, hi], "kid_ci", "precision_ci", "recall_ci", "resamples", "level", ...}
NLL = "nll"  # bpd, bpd_sem, bound, kind, split, n_images, protocol
SCALING = "scaling"  # resolutions, points, slopes {train, sample, memory}, batch_size, ...
COVERAGE = "coverage"  # MNIST: class_confident_fraction, classes_hit, class_kl; Stacked MNIST: modes,
#   modes_kl; both: n, bootstrap {"<key>_ci": [lo, hi]}, classifier {key, test_accuracy}, protocol
EVALUATIONS = "evaluations"  # top-level list of later re-measurements
PRETRAINED = "weights"  # provenance key of weights trained elsewhere: path, format, bytes, sha256


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
    fid_samples: Optional[int]
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
    # Coverage by the reference MNIST classifier (MNIST: classes; Stacked MNIST: modes of 1,000), with
    # the half-widths of their bootstrap intervals.
    digits: Optional[float] = None  # share of samples classified with confidence >= 0.9
    class_kl: Optional[float] = None  # KL (nats) of the class histogram from uniform
    modes: Optional[float] = None
    modes_kl: Optional[float] = None
    coverage_samples: Optional[int] = None  # the samples coverage was scored on
    modes_confident: Optional[float] = None  # Stacked MNIST: share of samples whose three digits are all confident
    classifier_accuracy: Optional[float] = None  # the reference classifier's MNIST test accuracy
    digits_pm: Optional[float] = None
    class_kl_pm: Optional[float] = None
    modes_pm: Optional[float] = None
    modes_kl_pm: Optional[float] = None
    # Speeds' spread: half the interquartile range of the timed repeats, in images/s.
    sample_images_per_second_pm: Optional[float] = None
    train_images_per_second_pm: Optional[float] = None
    scaling_pm: Optional[float] = None  # 95 % half-width of the steeper scaling slope (its timed calls' spread)
    # The slopes of counted FLOPs per image (the same on every machine), beside the timed ones.
    scaling_flops_train: Optional[float] = None
    scaling_flops_sample: Optional[float] = None
    nll_solver_error: Optional[float] = None  # an ODE likelihood's solver error (bits/dim), measured on a batch
    contended: Optional[bool] = None  # some speed was timed while other processes held CPUs it wanted
    train_contended: Optional[bool] = None  # ... the train speed (kept out of its stars and `compare`)
    sample_contended: Optional[bool] = None  # ... the default sampler's speed
    # A family the review has no row for: its own paper's figures (``GenerativeModel.reported``).
    reported_fid: Optional[float] = None
    reported_nll: Optional[float] = None
    reported_nfe: Optional[int] = None
    reported_source: Optional[str] = None
    # The measurements that failed after training: key -> "Type: first line of the message".
    errors: Optional[dict[str, str]] = None
    pretrained: Optional[bool] = None  # measured from weights trained elsewhere, not trained here

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


def _steeper_interval(study: dict[str, Any]) -> Optional[float]:
    """The interval's half-width of the steeper of a scaling study's train and sample slopes, or None."""
    slopes, intervals = _section(study, "slopes"), _section(study, "slope_intervals")
    known = [k for k in ("train", "sample") if isinstance(slopes.get(k), (int, float))]
    return intervals.get(max(known, key=slopes.get)) if known else None


EVALUATION_CHOICES = ("own", "latest")  # show/report --evaluations: the run's own figures, or the latest
#   re-measurement by `trilemma eval` of each of FID, NLL and coverage where there is one


def apply_evaluations(result: dict[str, Any], which: str = "own") -> dict[str, Any]:
    """``result`` with its FID, NLL and coverage taken from the latest ``trilemma eval`` re-measurement of each
    (``which="latest"``), or as it is (``"own"``). The copy's ``measured_by`` names the evaluation a
    figure came from; the real-data FID row is kept where the sample count is the same."""
    if which not in EVALUATION_CHOICES:
        raise ValueError(f"evaluations must be one of {', '.join(EVALUATION_CHOICES)}, got {which!r}")
    records = [e for e in (result.get(EVALUATIONS) or []) if isinstance(e, dict)]
    if which == "own" or not records:
        return result
    out = dict(result)
    measurements, measured_by = dict(_section(result, "measurements")), {}
    for key in (FID, NLL, COVERAGE):
        latest = next((e for e in reversed(records) if isinstance(e.get(key), dict)), None)
        if latest is None:
            continue
        values = dict(latest[key])
        own = _section(measurements, key)
        real = own.get("real_data") if key == FID else None
        if isinstance(real, dict) and real.get("fid_samples") == values.get("fid_samples"):  # the same floor
            values["real_data"] = real
        measurements[key] = values
        measured_by[key] = f"trilemma eval, {latest.get('time', '?')}"
    out["measurements"], out["measured_by"] = measurements, measured_by
    return out


def failed_measurements(result: dict[str, Any]) -> dict[str, str]:
    """The measurements that failed after training, as "Type: first line of the message"; a scaling
    study with failed resolutions counts, also in results written before failures were recorded."""
    out = {}
    for key, error in _section(result, ERRORS).items():
        error = error if isinstance(error, dict) else {}
        text = str(error.get("message") or "").strip()
        out[key] = f"{error.get('type') or 'Error'}: {text.splitlines()[0] if text else ''}".rstrip(": ")
    points = _section(_section(result, "measurements"), SCALING).get("points")
    points = points if isinstance(points, list) else []
    failed = [p for p in points if isinstance(p, dict) and p.get("status") == "error"]
    if failed and SCALING not in out:
        sizes = ", ".join(f"{p.get('resolution')}x{p.get('resolution')}" for p in failed)
        out[SCALING] = f"{failed[0].get('type') or 'Error'}: {failed[0].get('message', '')} (at {sizes})"
    return out


def summarize(result: dict[str, Any]) -> Summary:
    """The flat :class:`Summary` of a result document."""
    m, model, config = (_section(result, k) for k in ("measurements", "model", "config"))
    caps = _section(model, "capabilities")
    train, params, fid, nll = (_section(m, k) for k in (TRAIN, PARAMS, FID, NLL))
    memory = _section(_section(m, MEMORY), "train")
    slopes = _section(_section(m, SCALING), "slopes")
    default = default_sampler(m)
    density = caps.get("density")
    errors = failed_measurements(result)
    status = result.get("status")
    return Summary(
        run=result.get("run"), status=STATUS_INCOMPLETE if status == STATUS_DONE and errors else status,
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
        fid=fid.get("fid"), fid_samples=fid.get("fid_samples"), kid=fid.get("kid_mean"),
        precision=fid.get("precision"), recall=fid.get("recall"),
        fid_inf=fid.get("fid_inf"),
        fid_inf_pm=1.96 * fid["fid_inf_se"] if isinstance(fid.get("fid_inf_se"), (int, float)) else None,
        nll=nll.get("bpd"), nll_bound=nll.get("bound"),
        nll_kind=nll.get("kind") or (("bound" if nll.get("bound") else density) if nll else None),
        device_name=_section(result, "provenance").get("device_name"),
        **{f"{k}_pm": _half_width(_section(fid, "bootstrap").get(f"{k}_ci"))
           for k in ("fid", "kid", "precision", "recall")},
        **_coverage_fields(_section(m, COVERAGE)),
        sample_images_per_second_pm=_rate_spread(default),
        train_images_per_second_pm=_rate_spread(train),
        scaling_pm=_steeper_interval(_section(m, SCALING)),
        scaling_flops_train=_section(_section(m, SCALING), "flop_slopes").get("train"),
        scaling_flops_sample=_section(_section(m, SCALING), "flop_slopes").get("sample"),
        nll_solver_error=nll.get("solver_error_bpd"),
        contended=any(bool(x.get("contended")) for x in (train, default)) or None,
        train_contended=bool(train.get("contended")) or None,
        sample_contended=bool(default.get("contended")) or None,
        **reported_fields(_section(model, "reported")),
        errors=errors or None,
        pretrained=bool(_section(_section(result, "provenance"), PRETRAINED)) or None,
        nll_pm=1.96 * nll["bpd_sem"] if isinstance(nll.get("bpd_sem"), (int, float))
        and nll.get("bpd_sem") == nll.get("bpd_sem") and nll.get("kind") != "exact" else None,
    )


def _coverage_fields(cov: dict[str, Any]) -> dict[str, Any]:
    """The summary's coverage fields from a result's ``coverage`` measurement (empty when absent)."""
    boot = _section(cov, "bootstrap")
    names = {"digits": "class_confident_fraction", "class_kl": "class_kl", "modes": "modes", "modes_kl": "modes_kl"}
    out: dict[str, Any] = {"coverage_samples": cov.get("n"), "modes_confident": cov.get("modes_confident_fraction"),
                           "classifier_accuracy": _section(cov, "classifier").get("test_accuracy")}
    for field, key in names.items():
        if cov.get(key) is not None:
            out[field], out[f"{field}_pm"] = cov[key], _half_width(boot.get(f"{key}_ci"))
    return out


def migrate(result: dict[str, Any]) -> dict[str, Any]:
    """A result of an earlier schema in today's names, in place (and returned); today's as it is."""
    if result.get("schema") != "trilemma.result/1":
        return result
    measurements = result.get("measurements") if isinstance(result.get("measurements"), dict) else {}
    evaluations = [e for e in result.get(EVALUATIONS) or [] if isinstance(e, dict)]
    fids = [measurements.get(FID), *(e.get(FID) for e in evaluations)]
    records = [*fids, *(f.get("real_data") for f in fids if isinstance(f, dict)), *(result.get("curve") or [])]
    for record in records:
        if isinstance(record, dict):
            for old, new in _RENAMED_1.items():
                if old in record:
                    record[new] = record.pop(old)
    result["schema"] = SCHEMA
    return result
