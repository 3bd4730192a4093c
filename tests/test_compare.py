"""`trilemma compare`: a planted regression is caught (exit 1); identical results pass (exit 0)."""
import json
import shutil

import pytest

from trilemma.cli import main
from trilemma.results.compare import DEFAULT_TOLERANCES, compare, resolve_tolerances
from trilemma.contract.errors import TrilemmaError

from conftest import REPO

REFERENCE = REPO / "tests" / "fixtures" / "results" / "fixture"


@pytest.fixture
def new(tmp_path):
    """A copy of the fixture results, to plant changes in."""
    return shutil.copytree(REFERENCE, tmp_path / "new" / "fixture")


def edit(suite_dir, run, change):
    path = suite_dir / run / "result.json"
    result = json.loads(path.read_text())
    change(result)
    path.write_text(json.dumps(result))


def test_identical_results_do_not_regress(new):
    text, regressed = compare(REFERENCE, new, None)
    assert not regressed and "no regression (4 runs done in both compared)" in text
    assert main(["compare", str(REFERENCE), str(new)]) == 0


def test_a_planted_fid_regression_is_caught(new, capsys):
    # The suite's tolerance for FID is 15 %: +25 % regresses; +10 % does not.
    edit(new, "dcgan-mnist-s0", lambda r: r["measurements"]["fid"].update(fid=100.0))
    edit(new, "pixelcnn-mnist-s0", lambda r: r["measurements"]["fid"].update(fid=165.0))
    text, regressed = compare(REFERENCE, new, None)
    assert regressed and "REGRESSED: 1 (dcgan-mnist-s0 fid)" in text
    assert "+10.0%  worse, within 15%" in text
    assert main(["compare", str(REFERENCE), str(new)]) == 1
    assert "dcgan-mnist-s0 fid" in capsys.readouterr().out


def test_better_numbers_and_speeds_within_tolerance_pass(new):
    edit(new, "dcgan-mnist-s0", lambda r: (r["measurements"]["fid"].update(fid=60.0),
                                           r["measurements"]["train"].update(images_per_second=1500.0)))
    text, regressed = compare(REFERENCE, new, None)
    assert not regressed and "better" in text and "worse, within 30%" in text


def test_a_run_that_failed_or_vanished_regresses(new):
    edit(new, "gon-mnist-s0", lambda r: r.update(status="failed", error={"type": "RuntimeError"}))
    shutil.rmtree(new / "pixelcnn-mnist-s0")
    text, regressed = compare(REFERENCE, new, None)
    assert regressed and "gon-mnist-s0 failed" in text and "pixelcnn-mnist-s0 missing" in text


def test_a_metric_no_longer_measured_regresses(new):
    edit(new, "gon-mnist-s0", lambda r: r["measurements"].pop("nll"))
    assert compare(REFERENCE, new, None)[1]


def test_speeds_on_another_device_are_not_compared(new):
    edit(new, "dcgan-mnist-s0", lambda r: (r["provenance"].update(device_name="another device"),
                                           r["measurements"]["train"].update(images_per_second=1.0)))
    text, regressed = compare(REFERENCE, new, None)
    assert not regressed and "speeds not compared" in text


def test_tolerances_suite_then_argument_then_default():
    suite = {"tolerances": {"fid": 0.5}}
    assert resolve_tolerances(suite, 0.01)["fid"] == 0.5  # the suite's
    assert resolve_tolerances(suite, 0.01)["recall"] == 0.01  # the argument
    assert resolve_tolerances(suite, None)["recall"] == DEFAULT_TOLERANCES["recall"]  # the default
    with pytest.raises(TrilemmaError, match="unknown tolerance 'fidd'"):
        resolve_tolerances({"tolerances": {"fidd": 0.1}}, None)
    with pytest.raises(TrilemmaError, match=">= 0"):
        resolve_tolerances({}, -1.0)


def test_the_tolerance_argument_applies_without_a_suite(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for side, fid in ((a, 80.0), (b, 84.0)):  # +5 %
        shutil.copytree(REFERENCE / "dcgan-mnist-s0", side / "dcgan-mnist-s0")
        edit(side, "dcgan-mnist-s0", lambda r, fid=fid: r["measurements"]["fid"].update(fid=fid))
    assert not compare(a, b, None)[1]  # default 10 %
    assert compare(a, b, 0.01)[1]


def test_folders_that_hold_no_results_are_errors(tmp_path):
    with pytest.raises(TrilemmaError, match="no results under"):
        compare(tmp_path, REFERENCE, None)
    assert main(["compare", str(tmp_path / "absent"), str(REFERENCE)]) == 2


def test_runs_of_different_protocols_are_not_compared(new):
    # A 5x worse FID, but measured at another FID n and torch version: named, not called a regression.
    def change(r):
        r["measurements"]["fid"].update(fid=400.0, fid_samples=500)
        r["provenance"]["versions"]["torch"] = "9.9.9"
    edit(new, "dcgan-mnist-s0", change)
    text, regressed = compare(REFERENCE, new, None)
    assert not regressed
    assert "protocols differ, not compared: fid_samples (1000 | 500); versions (torch 0.0.0-fixture | torch 9.9.9)" \
        in text and "1 not compared: their protocols differ" in text


def _with_interval(fid, half):
    return lambda r: r["measurements"]["fid"].update(
        fid=fid, bootstrap={"fid_ci": [fid - half, fid + half], "resamples": 50, "level": 0.95})


def test_a_change_inside_the_measured_spread_is_not_a_regression(new):
    # +25 % (beyond the suite's 15 %), but both FIDs carry a ±20 interval: sqrt(20² + 20²) = 28 > 20.
    ref = shutil.copytree(REFERENCE, new.parent.parent / "ref" / "fixture")
    edit(ref, "dcgan-mnist-s0", _with_interval(80.0, 20.0))
    edit(new, "dcgan-mnist-s0", _with_interval(100.0, 20.0))
    text, regressed = compare(ref, new, None)
    assert not regressed and "within the measured spread (±28.28)" in text


def test_a_change_outside_the_measured_spread_is_a_regression(new):
    ref = shutil.copytree(REFERENCE, new.parent.parent / "ref" / "fixture")
    edit(ref, "dcgan-mnist-s0", _with_interval(80.0, 2.0))
    edit(new, "dcgan-mnist-s0", _with_interval(100.0, 2.0))
    text, regressed = compare(ref, new, None)
    assert regressed and "REGRESSED (worse by more than 15% and the measured spread ±2.828)" in text


def test_a_speed_timed_on_a_contended_machine_is_flagged_and_not_compared(new):
    def busy(r):
        train = r["measurements"]["train"]
        train.update(contended=True, load_before=9.0, images_per_second=train["images_per_second"] / 27)
    edit(new, "dcgan-mnist-s0", busy)
    text, regressed = compare(REFERENCE, new, None)
    assert "train images/s: not compared: the new run's was timed on a contended machine" in text
    assert not regressed, text  # 27 times slower, but beside a hog: not the model's doing
