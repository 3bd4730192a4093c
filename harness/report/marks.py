"""The table's marks: stars from measurements, ✓/✗ from declared capabilities, and number formats.

The review (Bond-Taylor et al. 2021, TPAMI, Table 1) rates each family with 1-5 stars on training
speed, sampling speed, parameter efficiency and resolution scaling, by judgement. Here the stars are
computed from the measured values of the models in one report, by one rule whose thresholds all live
in :data:`STAR_RULES`:

    the best model on a measure gets 5 stars; every ``step`` it is behind the best costs one star
    (the step is a factor on a log scale for speeds and parameters, a difference in slope for the
    resolution scaling); never fewer than 1. A model exactly one step behind has lost the star.

Stars are relative to the report (a report of one model gives it 5 stars everywhere); the numbers
behind them are in ``table.csv``. :func:`rule_sentence` prints the rule under every table.

Each value is known to an interval: the 95 % Student-t interval of its mean over the seeds, or, for one
seed, the run's own (half the interquartile range of the timed repeats for a speed; for a scaling slope,
its timed calls' spread propagated through the fit; none for a parameter count). Where the interval reaches across a star boundary, measured from the best model's
mean, the cell shows both counts (:func:`star_spans`): "3–4", or ★★★(★)☆ with the uncertain stars in
parentheses.

The ✓/✗ columns follow the seed table's conventions (``trilemma/contract/seed_table.csv``): free-form
Jacobian yes/no -> ✓/✗; exact density yes/no/bound -> ✓/✗/"bound"; an NLL that is an upper bound is
written "≤3.75", an approximate one "≈3.27".
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import pandas as pd

from trilemma.contract.literature import PAPER_SIZE_TOLERANCE, paper_sized
from trilemma.results.formats import (DASH, format_count, format_fid, format_fraction,  # noqa: F401
                                      format_nll)

MAX_STARS, MIN_STARS = 5, 1
FULL, EMPTY = "★", "☆"
LEVEL = 0.95  # the stars' intervals, as the table's ±
CHECK, CROSS, BOUND = "✓", "✗", "bound"
EPS = 1e-9  # a value exactly at a threshold counts as beyond it, whatever the float rounding


@dataclass(frozen=True)
class StarRule:
    header: str  # the column header
    higher_is_better: bool  # speeds: more is better; parameters and slopes: less is better
    log: bool  # compare log10(value) (factors) or the raw value (differences)
    step: float  # one star lost per this much behind the best, in log10 units when ``log``
    behind: str  # how the sentence says "one step behind", e.g. "slower training"


# The thresholds, all of them. Sampling speeds span four decades between one network pass and
# pixel-by-pixel sampling, so a star there is a factor of 10; training speeds and parameter counts
# of the families differ less, so a star is half a decade (a factor of about 3.2). A scaling slope is
# already a log-log quantity: +0.25 means the cost grows 2^0.25 = 1.19x faster per doubling of pixels.
STAR_RULES: dict[str, StarRule] = {
    "train": StarRule("Train speed", True, True, 0.5, "slower training (images/s)"),
    "sample": StarRule("Sample speed", True, True, 1.0, "slower sampling (images/s)"),
    "params": StarRule("Param. efficiency", False, True, 0.5, "more parameters"),
    "scaling": StarRule("Res. scaling", False, False, 0.25,
                        "steeper resolution-scaling slope (log cost per log pixel count, the steeper "
                        "of the train-step and sampling slopes)"),
}


def stars(values: Sequence[Optional[float]], rule: StarRule) -> list[Optional[int]]:
    """Stars (1-5) of each value against the best of ``values``; None where a value is missing.

    A missing value (None, NaN) gets None, as does a non-positive one on a log scale.
    """
    xs = [_position(v, rule) for v in values]
    known = [x for x in xs if x is not None]
    if not known:
        return [None] * len(xs)
    best = max(known)
    return [None if x is None else _star(best, x, rule) for x in xs]


def _star(best: float, x: float, rule: StarRule) -> int:
    """The stars of position ``x`` against the best position (``x`` may be ±inf, or beyond the best)."""
    if x == math.inf:
        return MAX_STARS
    if x == -math.inf:
        return MIN_STARS
    return min(MAX_STARS, max(MIN_STARS, MAX_STARS - math.floor((best - x) / rule.step + EPS)))


def _position(value: Optional[float], rule: StarRule) -> Optional[float]:
    """The value on the rule's scale, oriented so that larger is better; None when it has none."""
    if value is None or not math.isfinite(value) or (rule.log and value <= 0):
        return None
    x = math.log10(value) if rule.log else value
    return x if rule.higher_is_better else -x


def render_stars(n: Optional[int], span: Optional[tuple[int, int]] = None) -> str:
    """★★★☆☆ for 3 stars; with a ``span`` of (3, 4), ★★★(★)☆: the stars the interval may or may not
    reach in parentheses."""
    if n is None or n != n:  # None, or pandas' NaN
        return DASH
    low, high = _span(n, span)
    uncertain = f"({FULL * (high - low)})" if high > low else ""
    return FULL * low + uncertain + EMPTY * (MAX_STARS - high)


def star_count(n: Optional[int], span: Optional[tuple[int, int]] = None) -> str:
    """"3", or "3–4" where the interval spans a boundary (the paper table's star columns)."""
    if n is None or n != n:
        return DASH
    low, high = _span(n, span)
    return f"{low}–{high}" if high > low else str(low)


def _span(n: int, span: Optional[tuple[int, int]]) -> tuple[int, int]:
    return (int(span[0]), int(span[1])) if isinstance(span, (tuple, list)) else (int(n), int(n))


# --- stars from intervals -----------------------------------------------------------------------

def star_spans(values: Sequence[Optional[float]], half_widths: Sequence[Optional[float]],
               rule: StarRule) -> list[Optional[tuple[int, int]]]:
    """(fewest, most) stars over each interval ``value ± half_width``, against the best value's position
    (as :func:`stars`); equal where the interval stays within one star, None where the value is missing."""
    xs = [_position(v, rule) for v in values]
    known = [x for x in xs if x is not None]
    if not known:
        return [None] * len(xs)
    best = max(known)
    spans: list[Optional[tuple[int, int]]] = []
    for value, half, x in zip(values, half_widths, xs):
        if x is None:
            spans.append(None)
            continue
        half = half if half is not None and math.isfinite(half) and half > 0 else 0.0
        ends = [_end(value - half, rule), _end(value + half, rule)]
        spans.append((_star(best, min(ends), rule), _star(best, max(ends), rule)))
    return spans


def _end(value: float, rule: StarRule) -> float:
    """An interval's end on the rule's scale; an end at or below 0 on a log scale is the worst speed
    (-inf) or the best parameter count (+inf)."""
    if rule.log and value <= 0:
        return -math.inf if rule.higher_is_better else math.inf
    return _position(value, rule)


def seed_half_widths(models: pd.DataFrame, done: pd.DataFrame, keys: Sequence[str],
                     column: str) -> list[Optional[float]]:
    """Per row of ``models`` (one per ``keys``), the half-width of the 95 % interval of ``column``'s mean
    over the done runs ``done``: Student t over the seeds where there are several, else the one run's
    own ``<column>_pm`` where it recorded one (None: no interval). ``scaling`` is each run's steeper slope."""
    from scipy.stats import t

    runs = done.assign(scaling=done[["scaling_train", "scaling_sample"]].max(axis=1, skipna=True))
    own = f"{column}_pm"
    groups = {k if isinstance(k, tuple) else (k,): g for k, g in runs.groupby(list(keys))}
    out: list[Optional[float]] = []
    for row in models[list(keys)].itertuples(index=False):
        group = groups.get(tuple(row))
        values = pd.to_numeric(group[column], errors="coerce").dropna() if group is not None else pd.Series([])
        if len(values) >= 2:
            out.append(float(t.ppf(0.5 + LEVEL / 2, len(values) - 1) * values.std(ddof=1) / len(values) ** 0.5))
        elif len(values) == 1 and own in group:
            pm = pd.to_numeric(group[own], errors="coerce").dropna()
            out.append(float(pm.iloc[0]) if len(pm) else None)
        else:
            out.append(None)
    return out


# --- the parameter stars against the papers' sizes ------------------------------------------------
# The parameter stars rank the sizes the presets chose; a model whose parameters are not within
# PAPER_SIZE_TOLERANCE of its paper's CIFAR-10 model (trilemma/contract/literature_sizes.csv) is marked.
NOT_PAPER_SIZED = "†"


def paper_size_mark(model: Optional[str], params: Optional[float]) -> str:
    """† for a model whose parameters are off its paper's CIFAR-10 count by more than the tolerance;
    empty where they are within it, or where the paper gives no CIFAR-10 size."""
    return NOT_PAPER_SIZED if model and paper_sized(model, params) is False else ""


def paper_size_note() -> str:
    """The note under a table with a † on its parameter stars."""
    return (f"{NOT_PAPER_SIZED} on the parameter stars: the model's parameters are more than "
            f"{PAPER_SIZE_TOLERANCE * 100:g} % from those of its paper's CIFAR-10 model "
            f"(trilemma/contract/literature_sizes.csv, which says where each count is stated or how it was "
            f"computed), so its stars rank our choice of size, not the paper's; rows without the mark are "
            f"within it, or their paper gives no CIFAR-10 size.")


def rule_sentence() -> str:
    """The star rule in one sentence, generated from :data:`STAR_RULES` (printed under every table)."""
    parts = []
    for rule in STAR_RULES.values():
        if rule.log:
            factor = 10 ** rule.step
            amount = "factor of 10" if rule.step == 1 else f"factor of {factor:.2g}"
        else:
            amount = f"{rule.step:g}"
        parts.append(f"each {amount} {rule.behind}")
    listed = ", ".join(parts[:-1]) + ", and " + parts[-1]
    return (f"Stars are computed from the measurements of the models in this report: "
            f"{MAX_STARS} {FULL} for the best on each measure, one fewer for {listed} "
            f"than the best; never fewer than {MIN_STARS}. Where a value's {LEVEL * 100:g} % interval (over "
            f"its seeds, Student t; for one seed, its run's own: the timed repeats' spread for a speed) "
            f"reaches across a star boundary, measured from the best model's mean, the cell shows both "
            f"counts: 3–4, written with the uncertain stars in parentheses in the Markdown table.")


# --- ✓/✗ marks --------------------------------------------------------------------------------

def jacobian_mark(free_form: Optional[bool]) -> str:
    if free_form not in (True, False):  # None, or pandas' NaN for a missing value
        return DASH
    return CHECK if free_form else CROSS


def density_mark(density: Optional[str]) -> str:
    """A declared density ("exact", "bound", "estimate", "none") as the table writes it."""
    return {"exact": CHECK, "bound": BOUND, "estimate": "≈", "none": CROSS}.get(density or "", DASH)


SEED_DENSITY = {"yes": "exact", "bound": "bound", "no": "none"}  # seed table -> capability
SEED_JACOBIAN = {"yes": True, "no": False}
SEED_NLL_PREFIX = {"yes": "≤", "approx": "≈"}  # seed table's nll_is_bound -> prefix


def format_literature_nll(value: str, is_bound: str) -> str:
    """A seed-table NLL cell with its prefix: "≤3.75", "≈3.27", "3.00"; a dash when empty."""
    if not value:
        return DASH
    return SEED_NLL_PREFIX.get(is_bound, "") + value
