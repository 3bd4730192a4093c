"""The review's comparison table as data: the rows a family may name as its ``literature`` entry.

``seed_table.csv`` (package data, beside this file) is Table 1 of Bond-Taylor et al. (2021), "Deep
Generative Modelling: A Comparative Review of VAEs, GANs, Normalizing Flows, Energy-Based and
Autoregressive Models", TPAMI: family, model, the review's reference number, the free-form Jacobian
and exact density columns, and the FID and NLL (bits/dim) it cites on CIFAR-10. Every cell is a string,
empty where the review has no figure. The contract reads it to validate ``literature`` at registration;
the report reads it to print the review's figures beside ours. ``literature_sizes.csv`` holds, per
registered family, its paper's CIFAR-10 model size and the variant of the literature figure
(:func:`paper_sizes`): the dry run prints it beside our presets, the report marks the parameter stars
of a model that is not its paper's size. :func:`compared_fid` says which literature FID a row of ours is
compared with (the paper's figure for the variant we run, where the review's is of another), and of
which variant: ``trilemma list``, ``trilemma show`` and the report print it.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
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
    return tuple(_csv_rows("seed_table.csv", COLUMNS))


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
    return {row["model"]: {**row, "paper_params": int(row["paper_params"]) if row["paper_params"] else None,
                           "figure_for_our_variant": (float(row["figure_for_our_variant"])
                                                      if row["figure_for_our_variant"] else None)}
            for row in _csv_rows("literature_sizes.csv", SIZE_COLUMNS)}


STACKED_COLUMNS = ("model", "modes", "kl", "samples", "architecture", "source")


@lru_cache(maxsize=1)
def stacked_mnist_rows() -> tuple[dict, ...]:
    """The mode-collapse literature's Stacked MNIST figures (``stacked_mnist_literature.csv``: VEEGAN's
    and Metz et al.'s settings as PacGAN's Tables 2 and 3 print them): modes covered of 1,000 and KL to
    uniform as floats, the sample count as an int, the architecture and source as strings."""
    return tuple({**row, "modes": float(row["modes"]), "kl": float(row["kl"]), "samples": int(row["samples"])}
                 for row in _csv_rows("stacked_mnist_literature.csv", STACKED_COLUMNS))


def _csv_rows(name: str, columns: tuple[str, ...]) -> list[dict[str, str]]:
    """The rows of the package's literature table ``name``, checked to have ``columns``."""
    text = resources.files("trilemma.contract").joinpath(name).read_text(encoding="utf-8")
    rows = list(csv.DictReader(text.splitlines()))
    if not rows or tuple(rows[0]) != columns:
        raise ValueError(f"{name}: columns {tuple(rows[0]) if rows else ()}, expected {columns}")
    return rows


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


# --- the figure a row is compared with ------------------------------------------------------------
# A row's FID (lit.) is the review's figure (or, for a family the review has no row for, its paper's
# reported one) unless ``literature_sizes.csv`` says it is of another variant than the one we run:
# ``figure_for_our_variant`` is then the paper's CIFAR-10 FID of our default variant, which replaces it,
# cited by ``figure_source``; a ``variant_note`` that starts with "not our variant" says why no such
# figure is given. ``variant`` starts with the figure's conditioning ("class-conditional" or
# "unconditional"), which a run of the other conditioning does not share.
FOR_OUR_VARIANT = "‡"  # the paper's figure for the variant we run, in place of the review's (or paper's)
OTHER_VARIANT = "§"  # a figure of another variant than ours: none found for ours, or the run differs
NOT_OUR_VARIANT = "not our variant"
CONDITIONING = {True: "class-conditional", False: "unconditional"}


@dataclass(frozen=True)
class Comparison:
    """The literature FID a row of ours is compared with, and what it is a figure of."""

    fid: str  # the figure as printed ("2.20", "2.83"); "" where there is none
    mark: str  # FOR_OUR_VARIANT, OTHER_VARIANT or ""
    variant: str  # the variant the figure is of
    source: str  # where the figure is stated
    why: str = ""  # with a mark: the figure it replaces and why, or why it is not of our variant

    def text(self) -> str:
        """One sentence for a listing: the figure, its source and variant, and what its mark means."""
        if not self.fid:
            return f"no CIFAR-10 FID to compare with; variant: {self.variant}" if self.variant else ""
        if self.mark == FOR_OUR_VARIANT:
            return f"FID {self.fid}{self.mark} for the variant we run ({self.source}): {self.variant}; {self.why}"
        text = f"FID {self.fid}{self.mark} ({self.source}), variant: {self.variant or 'not recorded'}"
        return text + (f"; not the variant we run: {self.why}" if self.mark else "")


def figure_conditioning(model: str) -> bool | None:
    """Whether the literature figure of ``model`` is class-conditional; None where the csv does not say."""
    variant = (paper_sizes().get(model) or {}).get("variant") or ""
    return next((cond for cond, word in CONDITIONING.items() if variant.startswith(word)), None)


def run_conditioning(model_config: dict | None, capabilities: dict | None) -> bool | None:
    """Whether a run is class-conditional: its family config's ``conditional`` where it has one, else
    the capabilities the runner recorded; None where neither says."""
    for value in ((model_config or {}).get("conditional"), (capabilities or {}).get("conditional")):
        if isinstance(value, bool):
            return value
    return None


def compared_fid(model: str | None, fid, source: str, conditional: bool | None = None) -> Comparison:
    """The FID a row of ``model`` is compared with: ``fid`` (the review's or the paper's, as text or a
    number; empty or None where there is none, cited by ``source``), or the paper's figure for the
    variant we run where the csv gives one (marked :data:`FOR_OUR_VARIANT`); marked
    :data:`OTHER_VARIANT` where it is of another variant (the csv says so, or the run's
    ``conditional`` differs from the figure's)."""
    base = "" if fid is None or fid != fid else fid if isinstance(fid, str) else f"{fid:g}"
    row = paper_sizes().get(model or "") or {}
    variant, note = row.get("variant") or "", row.get("variant_note") or ""
    figure = row.get("figure_for_our_variant")
    cond = figure_conditioning(model or "")
    if conditional is not None and cond is not None and conditional != cond:
        why = f"the run is {CONDITIONING[conditional]}, the figure {CONDITIONING[cond]}"
        return Comparison(base, OTHER_VARIANT if base else "", variant, source, why + (f"; {note}" if note else ""))
    if figure is not None:
        replaced = f"in place of {base}, which is of another variant ({variant})" if base else variant
        return Comparison(f"{figure:g}", FOR_OUR_VARIANT, note, row["figure_source"], replaced)
    if note.startswith(NOT_OUR_VARIANT):
        why = note[len(NOT_OUR_VARIANT):].lstrip(" :;,")
        return Comparison(base, OTHER_VARIANT if base else "", variant, source, why)
    return Comparison(base, "", variant + (f" ({note})" if note and variant else note), source)


def literature_comparison(model: str | None, literature: str | None, reported_fid=None,
                          reported_source: str | None = None, conditional: bool | None = None) -> Comparison:
    """:func:`compared_fid` of a row of ``model``: the FID of its review row ``literature`` (when the
    review has that row), else its paper's ``reported_fid``."""
    lit = next((row for row in seed_rows() if row["model"] == literature), None) if literature else None
    if lit is not None:
        return compared_fid(model, lit["fid_cifar10"], f"{CITATION}, Table 1: {lit['model']} (ref. {lit['ref']})",
                            conditional)
    return compared_fid(model, reported_fid, reported_source or "", conditional)


def measured_variant(conditional: bool | None, sampler: str | None, nfe: float | None) -> str:
    """The variant a run measured, as its result records it: "class-conditional, sampler `x`, NFE 18"."""
    parts = [CONDITIONING.get(conditional, ""), f"sampler `{sampler}`" if sampler else "",
             f"NFE {nfe:,.0f}" if nfe is not None and nfe == nfe else ""]
    return ", ".join(p for p in parts if p)


def mark_legend(marks) -> str:
    """What the marks among ``marks`` mean, one sentence each; "" where there are none."""
    text = {FOR_OUR_VARIANT: f"{FOR_OUR_VARIANT}: the paper's FID for the variant we run, replacing a figure of "
                             f"another variant",
            OTHER_VARIANT: f"{OTHER_VARIANT}: a figure of another variant than ours (none found for ours, or the "
                           f"run's conditioning differs)"}
    present = set(marks)
    return "; ".join(text[m] for m in (FOR_OUR_VARIANT, OTHER_VARIANT) if m in present)
