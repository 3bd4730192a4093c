"""The protocol fingerprint of a result: everything besides the model and its seed that moves its numbers.

Two results are comparable (one table, one set of stars, one `compare`) only when their fingerprints
agree. The fields, each read from what the result itself recorded (its config, measurements and
provenance), so that results written before this module existed get a fingerprint too:

    budget        training limit: seconds, images or FLOPs, and the training batch
    budget_kind   which limits: seconds, images, flops
    processes     data-parallel processes (more of them see more images in the same seconds)
    dataset       the data set's label and image shape
    fid_split     the split the FID references come from
    fid_samples         generated samples per FID
    fid_ref_n     reference images per FID
    extractor     feature network and its weights' hash
    precision     training arithmetic (fp32, bf16, ...)
    sampling      sampling arithmetic and the sample-speed batch (bf16 samples move FID; the batch, speed)
    compile       torch.compile of training and of sampling (speeds)
    ema           whether the evaluated weights are an EMA
    scaling       the scaling study's resolutions and how it chose its batches (its slopes)
    nll           the NLL's test images and dequantization draws (a one-draw bound is not a K-draw estimate)
    device        the device class: CPU or the GPU's name
    versions      the packages whose version changes numbers (kernels, resizing, RNG streams)
    weights       a pretrained run's weights, "pretrained <SHA-256>"; None for a model trained here

A pretrained run (weights trained elsewhere, measured here) has no budget and no known EMA: those
fields are None, so it joins the report of the suite's trained runs; the weights field keeps two
results of other weights apart in `compare`, not in a report (where each row is its own model).

Batches that change no reported figure are left out: the FID's feature batch and the NLL's batch.

A report may hold several data sets (each with its own stars, a data column, labelled points), so
grouping for a report ignores ``dataset`` (:data:`REPORT_FIELDS`); `compare` uses every field.

A field a result did not measure (no FID: ``fid_samples`` is None) agrees with any value: such a run
joins the protocol of the others instead of standing alone.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Optional

from trilemma.results.formats import format_budget
from trilemma.results.schema import FID, MEASURED, NLL, PRETRAINED, SCALING, TRAIN, dataset_label, default_sampler

NUMBER_PACKAGES = ("torch", "torchvision", "torch-fidelity", "numpy")  # versions that change numbers
FIELDS = ("budget", "budget_kind", "processes", "dataset", "fid_split", "fid_samples", "fid_ref_n", "extractor",
          "precision", "sampling", "compile", "ema", "scaling", "nll", "device", "versions", "weights")
BUDGET_KINDS = (("max_seconds", "seconds"), ("max_images", "images"), ("max_flops", "flops"))
# Settings a stored config leaves out at their default (trilemma.run.settings.LATER_DEFAULTS).
STORED_DEFAULTS = {"sample_precision": "fp32", "compile": False, "nll_draws": 1}

REPORT_FIELDS = tuple(f for f in FIELDS if f not in ("dataset", "weights"))  # the table splits data sets
#   itself, and each pretrained row is its own model


def _section(mapping: Any, *keys: str) -> dict[str, Any]:
    for key in keys:
        mapping = mapping.get(key) if isinstance(mapping, dict) else None
    return mapping if isinstance(mapping, dict) else {}


def device_class(provenance: dict[str, Any]) -> Optional[str]:
    """"cpu" for any CPU (its speed is flagged by the load, not split by model name), else the GPU's name."""
    device = str(provenance.get("device") or "")
    if not device:
        return provenance.get("device_name")
    return "cpu" if device.startswith("cpu") else f"{device.split(':')[0]}: {provenance.get('device_name')}"


def fingerprint(result: dict[str, Any]) -> dict[str, Optional[str]]:
    """The protocol fields of one result (see the module docstring); None where not recorded."""
    config, m = result.get("config") or {}, result.get("measurements") or {}
    train, fid, prov = _section(config, "train"), _section(m, FID), _section(result, "provenance")
    pretrained = _section(prov, PRETRAINED).get("sha256")
    train = {} if pretrained else train  # its train settings only sized the timed run, if any
    budget = format_budget(train) if train else None
    versions = prov.get("versions") or {}
    processes = _section(m, TRAIN).get("processes")
    return {
        "budget": budget,
        "budget_kind": (" or ".join(kind for key, kind in BUDGET_KINDS if train.get(key)) or "unlimited")
        if train else None,
        "processes": str(processes) if processes is not None else None,
        "dataset": dataset_label(config) if config else None,
        "fid_split": fid.get("split", "train") if fid else None,
        "fid_samples": str(fid["fid_samples"]) if fid.get("fid_samples") is not None else None,
        "fid_ref_n": str(fid["n_ref"]) if fid.get("n_ref") is not None else None,
        "extractor": f"{fid.get('extractor')} ({fid.get('weights')})" if fid else None,
        "precision": _section(m, TRAIN).get("precision"),
        **_evaluation_fields({**config, "train": {}} if pretrained else config, m),
        "device": device_class(prov) if prov else None,
        "versions": ", ".join(f"{p} {versions[p]}" for p in NUMBER_PACKAGES if versions.get(p)) or None,
        "weights": f"pretrained {pretrained}" if pretrained else None,
    } | ({"ema": None} if pretrained else {})  # whether the weights are an EMA is not known here


def _evaluation_fields(config: dict[str, Any], m: dict[str, Any]) -> dict[str, Optional[str]]:
    """The sampling, compile, EMA, scaling and NLL fields: the stored config's settings (what the suite
    asked of every family, so a family that opts out of compiling does not split a report), else what
    the measurements recorded; None where neither says (such a field agrees with any value)."""
    train_cfg, eval_cfg = _section(config, "train"), _section(config, "eval")
    trained, nll = _section(m, TRAIN), _section(m, NLL)
    sampled = default_sampler(m) or _section(m, FID, "sample_execution")  # how the samples were drawn

    def setting(key: str, recorded: Any = None) -> Any:
        return eval_cfg.get(key, STORED_DEFAULTS.get(key, recorded)) if eval_cfg else recorded

    precision = setting("sample_precision", sampled.get("precision"))
    batch = setting("sample_batch", sampled.get("batch_size"))
    if train_cfg:
        mode = train_cfg.get("compile_mode", "default")
        compiled = (mode if train_cfg.get("compile") else "eager", mode if setting("compile") else "eager")
    else:
        compiled = (trained.get("compile"), sampled.get("compile"))
    ema = train_cfg["ema_halflife_images"] > 0 if train_cfg.get("ema_halflife_images") is not None \
        else trained.get("ema")
    scaling = _section(m, SCALING)
    # The suite's draw count, which every family of it shares (one that cannot weight draws scores one),
    # unless the figure is importance-weighted over its own count (`trilemma eval --nll-draws K`).
    weighted = _section(nll, "protocol")
    own = "normaliser" in weighted  # Flow CE weights its own draws inside every run: the suite's count
    draws = (weighted.get("dequantization_draws") if weighted.get("importance_weighted") and not own
             else setting("nll_draws"))
    images = eval_cfg.get("nll_images", "all") or "all"
    return {
        "sampling": f"{precision}, batch {batch}" if sampled and precision and batch else None,
        "compile": f"train {compiled[0]}, sample {compiled[1]}" if all(compiled) else None,
        "ema": None if ema is None else ("on" if ema else "off"),
        "scaling": (f"{', '.join(map(str, scaling['resolutions']))} px, " + _scaling_batch(scaling)
                    if scaling.get("resolutions") else None),
        "nll": (f"{images} test images, {draws} draw{'s' * (draws != 1)}"
                if nll and draws is not None and "nll_images" in eval_cfg else None),
    }


def _scaling_batch(scaling: dict[str, Any]) -> str:
    """How a scaling study chose its batches: the cheapest of a sweep (studies that record one, whatever
    batch it started from), or, in older results, a fixed batch or the one that filled the device."""
    if any("train_sweep" in p for p in scaling.get("points") or []):
        return "cheapest batch of a sweep"
    return f"batch {scaling.get('batch_size') or 'auto'}"


def group_fingerprint(results: Iterable[dict[str, Any]]) -> dict[str, Optional[str]]:
    """The fingerprint of a group of one protocol (:func:`group_by_protocol`): each field as the first
    member that recorded it has it (a DCGAN without an NLL does not hide the group's NLL protocol)."""
    merged: dict[str, Optional[str]] = dict.fromkeys(FIELDS)
    for r in results:
        if r.get("status") in MEASURED:
            merged.update({k: v for k, v in fingerprint(r).items() if merged.get(k) is None})
    return merged


def fingerprint_id(fp: dict[str, Optional[str]]) -> str:
    """A short, stable name of a fingerprint (folder names, table captions)."""
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:8]


def agree(a: dict[str, Optional[str]], b: dict[str, Optional[str]], fields: tuple[str, ...] = FIELDS) -> bool:
    """Whether two fingerprints agree on every field both recorded."""
    return not differing([a, b], fields)


def differing(fps: Iterable[dict[str, Optional[str]]], fields: tuple[str, ...] = FIELDS) -> list[str]:
    """The fields on which some of ``fps`` record different values (None agrees with anything)."""
    fps = list(fps)
    return [f for f in fields if len({fp.get(f) for fp in fps} - {None}) > 1]


def describe_difference(fps: Iterable[dict[str, Optional[str]]], fields: tuple[str, ...] = FIELDS) -> str:
    """"budget (15 s, batch 64 | 75 s, batch 64); fid_samples (500 | 1000)"."""
    fps = list(fps)
    return "; ".join(f"{f} ({' | '.join(sorted({fp[f] for fp in fps if fp.get(f) is not None}))})"
                     for f in differing(fps, fields))


def group_by_protocol(results: list[dict[str, Any]],
                      fields: tuple[str, ...] = REPORT_FIELDS) -> list[list[dict[str, Any]]]:
    """Done results in groups of one protocol each; a result that leaves a field unrecorded joins the
    first group it agrees with. Results that are not done go with the first group (they give no numbers)."""
    done = [r for r in results if r.get("status") in MEASURED]
    groups: list[tuple[dict, list]] = []
    # Fully recorded fingerprints found the groups first, so a partial one can join one of them.
    for r in sorted(done, key=lambda r: sum(v is None for v in fingerprint(r).values())):
        fp = fingerprint(r)
        for merged, members in groups:
            if agree(merged, fp, fields):
                members.append(r)
                merged.update({k: v for k, v in fp.items() if v is not None and merged.get(k) is None})
                break
        else:
            groups.append((dict(fp), [r]))
    out = sorted((sorted(members, key=lambda r: r.get("run") or "") for _, members in groups),
                 key=lambda g: -len(g)) or [[]]
    out[0] += [r for r in results if r.get("status") not in MEASURED]
    return out
