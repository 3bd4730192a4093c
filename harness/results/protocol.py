"""The protocol fingerprint of a result: everything besides the model and its seed that moves its numbers.

Two results are comparable (one table, one set of stars, one `compare`) only when their fingerprints
agree. The fields, each read from what the result itself recorded (its config, measurements and
provenance), so that results written before this module existed get a fingerprint too:

    budget        training limit: seconds, images and batch size
    dataset       the data set's label and image shape
    fid_split     the split the FID references come from
    fid_n         generated samples per FID
    fid_ref_n     reference images per FID
    extractor     feature network and its weights' hash
    precision     training arithmetic (fp32, bf16, ...)
    device        the device class: CPU or the GPU's name
    versions      the packages whose version changes numbers (kernels, resizing, RNG streams)

A report may hold several data sets (each with its own stars, a data column, labelled points), so
grouping for a report ignores ``dataset`` (:data:`REPORT_FIELDS`); `compare` uses every field.

A field a result did not measure (no FID: ``fid_n`` is None) agrees with any value: such a run
joins the protocol of the others instead of standing alone.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Optional

from trilemma.results.formats import format_budget
from trilemma.results.schema import FID, STATUS_DONE, TRAIN, dataset_label

NUMBER_PACKAGES = ("torch", "torchvision", "torch-fidelity", "numpy")  # versions that change numbers
FIELDS = ("budget", "dataset", "fid_split", "fid_n", "fid_ref_n", "extractor", "precision", "device",
          "versions")

REPORT_FIELDS = tuple(f for f in FIELDS if f != "dataset")  # the table splits data sets itself


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
    budget = format_budget(train) if train else None
    versions = prov.get("versions") or {}
    return {
        "budget": budget,
        "dataset": dataset_label(config) if config else None,
        "fid_split": fid.get("split", "train") if fid else None,
        "fid_n": str(fid["n_gen"]) if fid.get("n_gen") is not None else None,
        "fid_ref_n": str(fid["n_ref"]) if fid.get("n_ref") is not None else None,
        "extractor": f"{fid.get('extractor')} ({fid.get('weights')})" if fid else None,
        "precision": _section(m, TRAIN).get("precision"),
        "device": device_class(prov) if prov else None,
        "versions": ", ".join(f"{p} {versions[p]}" for p in NUMBER_PACKAGES if versions.get(p)) or None,
    }


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
    """"budget (15 s, batch 64 | 75 s, batch 64); fid_n (500 | 1000)"."""
    fps = list(fps)
    return "; ".join(f"{f} ({' | '.join(sorted({fp[f] for fp in fps if fp.get(f) is not None}))})"
                     for f in differing(fps, fields))


def group_by_protocol(results: list[dict[str, Any]],
                      fields: tuple[str, ...] = REPORT_FIELDS) -> list[list[dict[str, Any]]]:
    """Done results in groups of one protocol each; a result that leaves a field unrecorded joins the
    first group it agrees with. Results that are not done go with the first group (they give no numbers)."""
    done = [r for r in results if r.get("status") == STATUS_DONE]
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
    out[0] += [r for r in results if r.get("status") != STATUS_DONE]
    return out
