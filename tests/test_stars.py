"""The star rule at its edges, and the marks and number formats of the table."""
import math

import pytest

from trilemma.report import marks as stars
from trilemma.report.marks import STAR_RULES, render_stars, rule_sentence

SPEED = STAR_RULES["sample"]  # log scale, one star per factor of 10, higher is better
PARAMS = STAR_RULES["params"]  # log scale, one star per factor of 10^0.5, lower is better
SCALING = STAR_RULES["scaling"]  # linear, one star per 0.25 of slope, lower is better


def test_the_best_gets_five_and_one_step_behind_loses_a_star():
    # 1000 is the best; 100.001 is just under a factor of 10 behind, 100 exactly a factor of 10.
    assert stars.stars([1000.0, 100.001, 100.0, 10.0], SPEED) == [5, 5, 4, 3]


def test_never_fewer_than_one_star():
    assert stars.stars([1e6, 10.0, 1e-3], SPEED) == [5, 1, 1]


def test_lower_is_better_for_parameters():
    step = 10 ** PARAMS.step  # about 3.16
    assert stars.stars([1000.0, 1000.0 * step * 0.999, 1000.0 * step, 1000.0 * step ** 4], PARAMS) == [5, 5, 4, 1]


def test_scaling_slopes_are_linear_and_flatter_is_better():
    assert stars.stars([1.0, 1.2499, 1.25, 1.75, 2.0], SCALING) == [5, 5, 4, 2, 1]
    assert stars.stars([-0.1, 0.15], SCALING) == [5, 4]  # a slope may be below 0 (noise)


def test_missing_and_impossible_values_get_no_stars():
    assert stars.stars([None, float("nan"), 0.0, -5.0, 10.0], SPEED) == [None, None, None, None, 5]
    assert stars.stars([None, None], SPEED) == [None, None]
    assert stars.stars([], SPEED) == []


def test_a_single_model_and_ties_get_five():
    assert stars.stars([42.0], SPEED) == [5]
    assert stars.stars([7.0, 7.0], PARAMS) == [5, 5]


def test_rendering_and_sentence():
    assert render_stars(5) == "★★★★★" and render_stars(1) == "★☆☆☆☆" and render_stars(None) == "—"
    sentence = rule_sentence()
    # Every rule's step appears in the sentence printed under the tables.
    assert "factor of 10 slower sampling" in sentence and "factor of 3.2 slower training" in sentence
    assert "0.25 steeper" in sentence and "never fewer than 1" in sentence


def test_marks_follow_the_seed_table():
    assert [stars.density_mark(d) for d in ("exact", "bound", "none", None)] == ["✓", "bound", "✗", "—"]
    assert [stars.jacobian_mark(j) for j in (True, False, None, math.nan)] == ["✓", "✗", "—", "—"]
    assert stars.format_literature_nll("3.75", "yes") == "≤3.75"
    assert stars.format_literature_nll("3.27", "approx") == "≈3.27"
    assert stars.format_literature_nll("3.00", "") == "3.00"
    assert stars.format_literature_nll("", "") == "—"


@pytest.mark.parametrize("mean, std, n, text", [
    (12.34, None, 1000, "12.3@1k"), (12.34, 0.44, 10000, "12.3 ± 0.4@10k"), (5.0, None, 500, "5.0@500"),
    (5.0, math.nan, 2500, "5.0@2.5k"), (None, None, 1000, "—"), (math.nan, None, None, "—")])
def test_fid_format(mean, std, n, text):
    assert stars.format_fid(mean, std, n) == text


def test_nll_format():
    assert stars.format_nll(3.754, None, True) == "≤3.75"
    # Digits to match the interval: its first significant digit, two when that digit is a 1.
    assert stars.format_nll(1.2, 0.013, False) == "1.200 ± 0.013"
    assert stars.format_nll(2.3251, 0.02, True, "bound") == "≤2.33 ± 0.02"
    assert stars.format_fid(50.31, 1.2, 1000) == "50.3 ± 1.2@1k" and stars.format_fid(50.31, 4.0, 1000) == "50 ± 4@1k"
    assert stars.format_nll(None, None, True) == "—"
