"""The review's comparison table as data: the rows a family may name as its ``literature`` entry.

``seed_table.csv`` (package data, beside this file) is Table 1 of Bond-Taylor et al. (2021), "Deep
Generative Modelling: A Comparative Review of VAEs, GANs, Normalizing Flows, Energy-Based and
Autoregressive Models", TPAMI: family, model, the review's reference number, the free-form Jacobian
and exact density columns, and the FID and NLL (bits/dim) it cites on CIFAR-10. Every cell is a string,
empty where the review has no figure. The contract reads it to validate ``literature`` at registration;
the report reads it to print the review's figures beside ours. ``literature_sizes.csv`` holds, per
registered family, its paper's CIFAR-10 model size and the variant of the literature figure
(:func:`paper_sizes`): the dry run prints it beside our presets, the report marks the parameter stars
of a model that is not its paper's size.
"""
from __future__ import annotations

import csv
from functools import lru_cache
from importlib import resources

CITATION = "Bond-Taylor et al. 2021, TPAMI"
COLUMNS = ("family", "model", "ref", "free_form_jacobian", "exact_density", "fid_cifar10",
           "nll_bpd_cifar10", "nll_is_bound")
FAMILIES = ("GAN", "EBM", "VAE", "AR", "Flow")  # the review's sections, in its order
# Families a model may declare: the review's sections, and "OT" for the seed's own decoder trained by a
# Sinkhorn divergence, which the review's table has no section for.
MODEL_FAMILIES = FAMILIES + ("OT",)
# The figures a family the review has no row for may give from its own paper (``GenerativeModel.reported``).
REPORTED_KEYS = ("fid", "nll", "nfe", "source")


def reported_fields(reported: dict | None) -> dict:
    """A paper's reported figures as the flat ``reported_<key>`` fields of a result summary."""
    return {f"reported_{k}": (reported or {}).get(k) for k in REPORTED_KEYS}


@lru_cache(maxsize=1)
def seed_rows() -> tuple[dict[str, str], ...]:
    """The table's rows in the review's order, each a dict of :data:`COLUMNS`."""
    text = resources.files("trilemma.contract").joinpath("seed_table.csv").read_text(encoding="utf-8")
    rows = tuple(csv.DictReader(text.splitlines()))
    assert rows and tuple(rows[0]) == COLUMNS, "seed_table.csv has unexpected columns"
    return rows


def seed_models() -> tuple[str, ...]:
    """The model names of the review's rows (what a family's ``literature`` may name)."""
    return tuple(row["model"] for row in seed_rows())


# --- the papers' CIFAR-10 models -----------------------------------------------------------------
# ``literature_sizes.csv`` (package data, beside the seed table): per registered family, its paper's
# CIFAR-10 parameter count and where it is stated or how it was computed (empty where the paper has
# no CIFAR-10 model or its size could not be established), the variant the literature figure is of,
# and the paper's figure for the variant we run where our default differs.
SIZE_COLUMNS = ("model", "literature_row", "paper_params", "params_source", "params_note", "variant",
                "variant_note", "figure_for_our_variant", "figure_source")
PAPER_SIZE_TOLERANCE = 0.10  # a preset is paper-sized within this fraction of the paper's count


@lru_cache(maxsize=1)
def paper_sizes() -> dict[str, dict]:
    """The rows of ``literature_sizes.csv`` by registry name; ``paper_params`` an int and
    ``figure_for_our_variant`` a float, None where empty; the other cells strings."""
    text = resources.files("trilemma.contract").joinpath("literature_sizes.csv").read_text(encoding="utf-8")
    rows = list(csv.DictReader(text.splitlines()))
    assert rows and tuple(rows[0]) == SIZE_COLUMNS, "literature_sizes.csv has unexpected columns"
    return {row["model"]: {**row, "paper_params": int(row["paper_params"]) if row["paper_params"] else None,
                           "figure_for_our_variant": (float(row["figure_for_our_variant"])
                                                      if row["figure_for_our_variant"] else None)}
            for row in rows}


def paper_params(model: str) -> int | None:
    """The parameter count of ``model``'s paper's CIFAR-10 model; None where it has none here."""
    return (paper_sizes().get(model) or {}).get("paper_params")


def paper_sized(model: str, params: float | None) -> bool | None:
    """Whether ``params`` is within :data:`PAPER_SIZE_TOLERANCE` of the paper's count; None where
    either is unknown."""
    paper = paper_params(model)
    if paper is None or params is None or params != params:  # NaN: not measured
        return None
    return abs(params / paper - 1) <= PAPER_SIZE_TOLERANCE
