"""The table's rows: one per model of the review, ours placed beside the literature's figures.

Several seeds of a model are one row: the mean ± the half-width of its 95 % Student-t interval over
the seeds; a model of one seed shows its run's own 95 % interval (the bootstrap over generated samples
for FID, KID, precision and recall; 1.96 standard errors over test images for a Monte-Carlo NLL).
Only results whose status is "done" or "incomplete" give numbers; a measurement that failed in every
run of a model shows "failed" and its error's type in its cells (the caption's notes give the first
line); a model whose runs all failed keeps its row, with dashes and a note. The stars and marks are
those of :mod:`trilemma.report.marks`. A row's FID (lit.) is the papers' figure for the variant we run
where the review's is of another (marked ‡, :func:`trilemma.contract.literature.compared_fid`), and each
row of ours names the variant it measured and that of its figure (:func:`variant_notes`).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import pandas as pd

from trilemma.contract.errors import TrilemmaError
from trilemma.contract import literature
from trilemma.contract.literature import Comparison, literature_comparison, reported_fields, run_conditioning
from trilemma.report import marks as stars
from trilemma.results.formats import (DASH, format_count, format_fid, format_fraction, format_integer, format_kid,
                                      format_nll, format_pm)
from trilemma.results.schema import FID, MEASURED, NLL, SAMPLE, SCALING, STATUS_DONE, dataset_label, summarize

LIT_ONLY = "lit. only"
CONTENDED_FLAGS = {"train_images_per_second": "train_contended", "sample_images_per_second": "sample_contended"}
PRETRAINED_MARK = "(pretrained)"  # a row measured from weights trained elsewhere, not trained here
COVERAGE_FIELDS = ("digits", "class_kl", "modes", "modes_kl")  # by the reference MNIST classifier
NUMERIC = ("train_images_per_second", "train_seconds", "wall_seconds", "images_seen", "train_peak_bytes",
           "sample_images_per_second", "sample_nfe", "params", "params_sampling", "scaling_train",
           "scaling_sample", "scaling_memory", "scaling_flops_train", "scaling_flops_sample", "nll_solver_error",
           "fid", "fid_samples", "kid", "precision", "recall", "nll",
           "fid_pm", "kid_pm", "precision_pm", "recall_pm", "nll_pm", "fid_inf", "fid_inf_pm", "train_flops",
           *COVERAGE_FIELDS, *(f"{k}_pm" for k in COVERAGE_FIELDS))
INTEGER = ("seeds", "reported_nfe", "stars_train", "stars_sample", "stars_params", "stars_scaling", "sample_nfe",
           "params", "params_sampling", "fid_samples", "images_seen", "train_peak_bytes")
SPREAD = ("fid", "kid", "nll", "precision", "recall", "fid_inf",  # shown as mean ± a 95 % interval's half-width
          *COVERAGE_FIELDS)
LEVEL = 0.95


REPORTED = tuple(reported_fields(None))  # reported_fid, reported_nll, reported_nfe, reported_source


def record(result: dict[str, Any]) -> dict[str, Any]:
    """The numbers of one result that the report reads, flat; None where not measured.

    A family the review has no row for carries its paper's own figures (``reported``), and every
    family its display name (``title``); results written before the runner recorded them, or before
    the family had a title of its own, take them from the registered family, when it is registered."""
    row = summarize(result).as_dict()
    model = result.get("model") if isinstance(result.get("model"), dict) else {}
    config = result.get("config") if isinstance(result.get("config"), dict) else {}
    row["conditional"] = run_conditioning(config.get("model_config"), model.get("capabilities"))
    lacks_reported = row["literature"] is None and "reported" not in model
    lacks_title = row["title"] in (None, "", row["model"])
    cls = registered_family(row["model"]) if row["model"] and (lacks_reported or lacks_title) else None
    if cls is not None and lacks_reported:
        row.update(reported_fields(cls.reported))
    if cls is not None and lacks_title:
        row["title"] = cls.display_name()
    return row


def registered_family(name: str):
    """The registered family ``name``, or None where it is not registered here."""
    from trilemma.contract.registry import get_model_class  # imports torch: only for such old results

    try:
        return get_model_class(name)
    except TrilemmaError:
        return None


def aggregate(records: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, dataset): means of the done runs, standard deviations, seeds, stars."""
    records = records.copy()
    for col in NUMERIC:
        records[col] = pd.to_numeric(records[col], errors="coerce")  # None -> NaN
    done = records[records["status"].isin(MEASURED)].copy()
    # A speed timed while other processes held CPUs it wanted says nothing of the model: kept out of the
    # means and the stars (the caption names those runs).
    for column, flag in CONTENDED_FLAGS.items():
        if flag in done:
            done.loc[done[flag].eq(True), column] = float("nan")
    keys = ["model", "dataset"]
    # What a model declares is the same in all its runs: take it from the first.
    models = records.groupby(keys, sort=True).agg(
        family=("family", "first"), literature=("literature", "first"), density=("density", "first"),
        free_form_jacobian=("free_form_jacobian", "first"), memory_kind=("memory_kind", "first"),
        nll_kind=("nll_kind", "first"), title=("title", "first"), conditional=("conditional", "first"),
        sampler=("sampler", "first"),
        **{key: (key, "first") for key in REPORTED},
        runs=("run", "count"), pretrained=("pretrained", lambda s: bool(s.eq(True).any())),
        status=("status", _group_status), errors=("errors", _merged_errors))
    means = done.groupby(keys)[list(NUMERIC)].mean()
    spread = done.groupby(keys)[list(SPREAD)].std(ddof=1).add_suffix("_std")  # NaN for one seed
    counts = done.groupby(keys)[list(SPREAD)].count()
    models = models.join(means).join(spread)
    models["seeds"] = done.groupby(keys)["run"].count()
    models["seeds"] = models["seeds"].fillna(0).astype(int)
    for col in SPREAD:  # over seeds where there are several, else the single run's own interval
        n = counts[col].reindex(models.index)
        over_seeds = seed_interval(models[f"{col}_std"], n)
        models[f"{col}_pm"] = over_seeds.where(n >= 2, models[f"{col}_pm"])
    models["nll_bound"] = done.groupby(keys)["nll_bound"].agg(lambda s: bool(s.fillna(False).any()))
    # The steeper of the train-step and sampling slopes is the model's resolution scaling.
    models["scaling"] = models[["scaling_train", "scaling_sample"]].max(axis=1, skipna=True)
    models = models.reset_index()
    return add_stars(models, done, keys)


def seed_interval(std: pd.Series, n: pd.Series) -> pd.Series:
    """Half-width of the Student-t interval (``LEVEL``) of a mean over ``n`` seeds; NaN for n < 2."""
    from scipy.stats import t

    n = n.astype(float)
    quantile = pd.Series(t.ppf(0.5 + LEVEL / 2, (n - 1).clip(lower=1)), index=n.index)
    return (quantile * std / n.pow(0.5)).where(n >= 2)


def _group_status(statuses: pd.Series) -> str:
    for status in MEASURED:  # done where a run is done, else incomplete where one is
        if (statuses == status).any():
            return status
    return sorted(set(statuses))[0]


def _merged_errors(errors: pd.Series) -> dict[str, str]:
    """The failed measurements of a model's runs, measurement key -> the first run's error."""
    merged: dict[str, str] = {}
    for value in errors:
        if isinstance(value, dict):
            merged = {**value, **merged}
    return merged


# The cells a failed measurement leaves empty: measurement key -> cells.
FAILED_CELLS = {FID: ("fid", "kid", "precision", "recall"), SAMPLE: ("sample", "nfe"), NLL: ("nll",),
                SCALING: ("scaling",)}


def add_stars(models: pd.DataFrame, done: Optional[pd.DataFrame] = None,
              keys: tuple[str, ...] = ("model", "dataset")) -> pd.DataFrame:
    """Stars of each measure, relative to the models of the same dataset, and ``stars_<key>_span``: the
    (fewest, most) stars over each value's 95 % interval among the runs ``done`` (:func:`marks.star_spans`)."""
    sources = {"train": "train_images_per_second", "sample": "sample_images_per_second",
               "params": "params", "scaling": "scaling"}
    models = models.copy()
    for key, column in sources.items():
        models[f"stars_{key}"], models[f"stars_{key}_span"] = None, None
        half = pd.Series(stars.seed_half_widths(models, done, keys, column) if done is not None
                         else [None] * len(models), index=models.index, dtype=object)
        for _, index in models.groupby("dataset").groups.items():
            values = [_number(v) for v in models.loc[index, column]]
            models.loc[index, f"stars_{key}"] = pd.Series(stars.stars(values, stars.STAR_RULES[key]),
                                                           index=index, dtype=object)
            models.loc[index, f"stars_{key}_span"] = pd.Series(
                stars.star_spans(values, list(half[index]), stars.STAR_RULES[key]), index=index, dtype=object)
    return models


def several_datasets(models: pd.DataFrame) -> bool:
    return models["dataset"].nunique() > 1


# --- rows beside the literature -----------------------------------------------------------------

def table_rows(models: pd.DataFrame, seed: pd.DataFrame) -> list[dict[str, Any]]:
    """The review's rows in its order, ours placed at their literature row; models the review has no
    row for are :func:`beyond_rows`, a table of their own."""
    rows: list[dict[str, Any]] = []
    ours = models.to_dict("records")
    for _, lit_rows in seed.groupby("family", sort=False):
        for lit in lit_rows.to_dict("records"):
            matches = [m for m in ours if _text(m["literature"]) == lit["model"]]
            rows += [our_row(m, lit) for m in matches] or [literature_row(lit)]
    return rows


def beyond_rows(models: pd.DataFrame, seed: pd.DataFrame) -> list[dict[str, Any]]:
    """Our models without a row in the review (the families since 2021, the seed's own models), by
    family in the review's order and then by name, each with its paper's reported figures."""
    known = set(seed["model"])
    order = list(dict.fromkeys(seed["family"]))
    rest = [m for m in models.to_dict("records") if _text(m["literature"]) not in known]
    rest.sort(key=lambda m: (order.index(m["family"]) if m["family"] in order else len(order),
                             _text(m["family"]) or "~", m["model"], m["dataset"]))
    return [our_row(m, None) | {"beyond": True} for m in rest]


def our_row(m: dict[str, Any], lit: Optional[dict[str, str]]) -> dict[str, Any]:
    """One of our models (all its seeds), with its literature row's figures when it has one, the FID
    among them being that of the variant we run where the papers give one (:func:`compared`)."""
    c = compared(m, lit)
    row = {**m, "comparison": c, "lit_mark": c.mark, "literature_variant": c.variant,
           "literature_figure_source": c.source, "measured_variant": measured_variant(m)}
    if not lit:  # a family beyond the review: its paper's figure, or the one for our variant
        row["reported_fid"] = float(c.fid) if c.fid else None
    lit = lit or {}
    return {**row, "family": _text(m["family"]) or lit.get("family") or "other",
            "model_label": lit.get("model") or _text(m.get("title")) or m["model"], "implemented": True,
            "lit_ref": lit.get("ref", ""), "lit_fid": c.fid if lit else "",
            "lit_nll": lit.get("nll_bpd_cifar10", ""), "lit_nll_is_bound": lit.get("nll_is_bound", "")}


def compared(m: dict[str, Any], lit: Optional[dict[str, str]]) -> Comparison:
    """The literature FID a model's row is compared with: its review row's (else its paper's reported
    one), or the paper's figure for the variant we run (:func:`trilemma.contract.literature.compared_fid`)."""
    return literature_comparison(m["model"], (lit or {}).get("model"), _number(m.get("reported_fid")),
                                 _text(m.get("reported_source")), _bool(m.get("conditional")))


def measured_variant(m: dict[str, Any]) -> str:
    """The variant our runs measured: their conditioning and default sampler, as the results record them."""
    return literature.measured_variant(_bool(m.get("conditional")), _text(m.get("sampler")),
                                       _number(m.get("sample_nfe")))


def variant_notes(rows: list[dict[str, Any]]) -> list[str]:
    """One line per row of ours: the variant it measured and the literature figure it is compared with."""
    notes = []
    for row in rows:
        c = row.get("comparison")
        if not (row.get("implemented") and isinstance(c, Comparison) and c.text()):
            continue
        ours = f"; ours: {row['measured_variant']}" if row.get("measured_variant") else ""
        notes.append(f"{row['model_label']} (`{row['model']}`{ours}): {c.text()}")
    return notes


def literature_row(lit: dict[str, str]) -> dict[str, Any]:
    """A row of the review that trilemma does not implement: its marks and figures only."""
    return {"family": lit["family"], "model_label": lit["model"], "model": None, "implemented": False,
            "dataset": None, "status": None, "seeds": 0,
            "density": stars.SEED_DENSITY.get(lit["exact_density"]),
            "free_form_jacobian": stars.SEED_JACOBIAN.get(lit["free_form_jacobian"]),
            "lit_ref": lit["ref"], "lit_fid": lit["fid_cifar10"], "lit_nll": lit["nll_bpd_cifar10"],
            "lit_nll_is_bound": lit["nll_is_bound"]}


REAL_DATA = "Real data (test split)"


def real_data_row(results: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The row of real test images scored against the same references (the FID column's floor), from
    the first finished result that measured it; None when none did."""
    for r in results:
        real = ((r.get("measurements") or {}).get("fid") or {}).get("real_data")
        if r.get("status") == STATUS_DONE and real:
            boot = real.get("bootstrap") or {}
            half = lambda k: (boot[k][1] - boot[k][0]) / 2 if boot.get(k) else None  # noqa: E731
            return {"family": "Data", "model_label": REAL_DATA, "model": None, "implemented": False,
                    "real": True, "dataset": dataset_label(r.get("config") or {}), "status": STATUS_DONE,
                    "seeds": 0, "fid": real["fid"], "fid_pm": half("fid_ci"), "fid_samples": real["fid_samples"],
                    "kid": real.get("kid_mean"), "kid_pm": half("kid_ci"), "precision": real.get("precision"),
                    "precision_pm": half("precision_ci"), "recall": real.get("recall"),
                    "recall_pm": half("recall_ci"), "lit_ref": "", "lit_fid": "", "lit_nll": "",
                    "lit_nll_is_bound": ""}
    return None


def cells(row: dict[str, Any]) -> dict[str, str]:
    """A row's table cells as text (markdown and LaTeX differ only in escaping, done later)."""
    g = lambda key: _number(row.get(key))  # noqa: E731
    if row.get("real"):  # the real-data row: only the sample-quality columns
        blank = dict.fromkeys(("train", "sample", "params", "scaling", "jacobian", "density", "nll",
                               "lit_fid", "lit_nll", "coverage"), DASH)
        return blank | {
            "family": row["family"], "model": row["model_label"], "dataset": row.get("dataset") or DASH,
            "ours": f"{format_count(g('fid_samples'))} test images",
            "fid": format_fid(g("fid"), g("fid_pm"), g("fid_samples")), "kid": format_kid(g("kid"), g("kid_pm")),
            "precision": format_fraction(g("precision"), g("precision_pm")),
            "recall": format_fraction(g("recall"), g("recall_pm"))}
    ours = LIT_ONLY
    if row["implemented"]:  # `name` is code: monospace in markdown, \texttt in LaTeX
        ours = f"`{row['model']}`" + ("" if row["status"] == STATUS_DONE else f" ({row['status']})")
        ours += f" ×{row['seeds']}" if row["seeds"] > 1 else ""
        ours += f" {PRETRAINED_MARK}" if _bool(row.get("pretrained")) else ""  # weights trained elsewhere
    return _failed(row, {
        "family": row["family"], "model": row["model_label"], "ours": ours,
        "dataset": row.get("dataset") or DASH,
        **{key: stars.render_stars(row.get(f"stars_{key}"), row.get(f"stars_{key}_span"))
           for key in stars.STAR_RULES},
        # the parameter stars marked where the model is not its paper's CIFAR-10 size
        "params": stars.render_stars(row.get("stars_params"), row.get("stars_params_span"))
        + stars.paper_size_mark(row.get("model"), g("params")),
        "jacobian": stars.jacobian_mark(row.get("free_form_jacobian")),
        "density": stars.density_mark(row.get("density")),
        "fid": format_fid(g("fid"), g("fid_pm"), g("fid_samples")),
        "kid": format_kid(g("kid"), g("kid_pm")),
        "precision": format_fraction(g("precision"), g("precision_pm")),
        "recall": format_fraction(g("recall"), g("recall_pm")),
        "coverage": format_coverage(row),
        "nll": format_nll(g("nll"), g("nll_pm"), row.get("nll_bound"), _text(row.get("nll_kind"))),
        "lit_fid": (row["lit_fid"] + (row.get("lit_mark") or "")) if row["lit_fid"] else DASH,
        "lit_nll": stars.format_literature_nll(row["lit_nll"], row["lit_nll_is_bound"]),
        "nfe": format_integer(g("sample_nfe")),
        # the paper's own figures, as it gives them (a family the review has no row for)
        "rep_fid": (f"{g('reported_fid'):g}" + (row.get("lit_mark") or "")
                    if g("reported_fid") is not None else DASH),
        "rep_nfe": format_integer(g("reported_nfe")),
        "rep_nll": f"{g('reported_nll'):g}" if g("reported_nll") is not None else DASH,
    })


def format_coverage(row: dict[str, Any]) -> str:
    """The coverage cell: Stacked MNIST's modes of 1,000 and their KL, or MNIST's share of confidently
    classified samples ("digits") and the KL of their class histogram from uniform."""
    g = lambda key: _number(row.get(key))  # noqa: E731
    if g("modes") is not None:
        return f"{format_pm(g('modes'), g('modes_pm'), 0)} modes, KL {format_pm(g('modes_kl'), g('modes_kl_pm'), 2)}"
    if g("digits") is not None:
        return f"{format_fraction(g('digits'), g('digits_pm'))}, KL {format_pm(g('class_kl'), g('class_kl_pm'), 2)}"
    return DASH


def _failed(row: dict[str, Any], cells: dict[str, str]) -> dict[str, str]:
    """``cells`` with those of a failed measurement that has no number saying so: "failed (ValueError)"."""
    errors = row.get("errors") if isinstance(row.get("errors"), dict) else {}
    for key, text in errors.items():
        for cell in FAILED_CELLS.get(key, ()):
            if cells.get(cell) in (DASH, "", None):
                cells[cell] = f"failed ({text.split(':')[0]})"
    return cells


def csv_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The table with raw numbers (NaN where not measured), one line per table row; ``section`` says
    which table a row is in: ``data`` (the real-data row), ``review`` or ``beyond`` (no row in the review)."""
    rows = [row | {"section": "data" if row.get("real") else "beyond" if row.get("beyond") else "review"}
            for row in rows]
    columns = ["section", "family", "model_label", "model", "dataset", "implemented", "status", "seeds",
               "stars_train", "stars_sample", "stars_params", "stars_scaling",
               "train_images_per_second", "sample_images_per_second", "sample_nfe", "params",
               "params_sampling", "scaling", "scaling_train", "scaling_sample", "scaling_memory",
               "scaling_flops_train", "scaling_flops_sample",
               "free_form_jacobian", "density", "fid", "fid_std", "fid_pm", "fid_samples", "fid_inf", "fid_inf_pm", "kid", "kid_pm",
               "precision", "precision_std", "precision_pm", "recall", "recall_std", "recall_pm",
               *(f"{k}{suffix}" for k in COVERAGE_FIELDS for suffix in ("", "_pm")), "nll",
               "nll_std", "nll_pm", "nll_bound", "nll_kind", "nll_solver_error", "train_seconds",
               "wall_seconds", "images_seen", "train_flops", "train_peak_bytes", "memory_kind", "lit_ref", "lit_fid", "lit_nll",
               "lit_nll_is_bound", "lit_mark", "literature_variant", "literature_figure_source", "measured_variant",
               *REPORTED]
    frame = pd.DataFrame([{c: row.get(c) for c in columns} for row in rows], columns=columns)
    for col in INTEGER:  # counts print as integers, blank where missing
        frame[col] = pd.to_numeric(frame[col], errors="coerce").round().astype("Int64")
    return frame.rename(columns={"model_label": "literature_model", "model": "trilemma_model",
                                 "fid": "fid_mean", "nll": "nll_bpd", "lit_fid": "lit_fid_cifar10",
                                 "lit_nll": "lit_nll_bpd_cifar10"})


def _text(value) -> Optional[str]:
    """A non-empty string, or None (pandas stores a missing string as NaN)."""
    return value if isinstance(value, str) and value else None


def _bool(value) -> Optional[bool]:
    """A bool, or None (pandas stores a missing one as NaN)."""
    return bool(value) if isinstance(value, (bool, np.bool_)) else None


def _number(value) -> Optional[float]:
    """A float, or None for a missing value (None, NaN, pandas' NA)."""
    if value is None or isinstance(value, str):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


