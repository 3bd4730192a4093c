"""`trilemma compare` knows the seed noise, and never compares runs of other processes, precision or budget kind.

A change is a regression only beyond the spread seeds alone give (measured from folders with several
seeds, or a noise.json written by `make bench-seeds`): seed 0 against seed 1 of the three-seed reference
(results/archive/mnist-30s-three-seeds, read only) calls none; the fixture's two DCGAN seeds bound what a third may move.
"""
import json
import shutil

import pytest

from trilemma.cli import main
from trilemma.results import noise
from trilemma.results.compare import compare

from conftest import REPO

REFERENCE = REPO / "results" / "archive" / "mnist-30s-three-seeds"
FIXTURE = REPO / "tests" / "fixtures" / "results" / "fixture"


def edit(suite_dir, run, change):
    path = suite_dir / run / "result.json"
    result = json.loads(path.read_text())
    change(result)
    path.write_text(json.dumps(result))


def _one_seed(root, seed, named_as=0):
    """The reference's runs of one seed in a folder of their own, under the run names of seed ``named_as``
    (as a nightly of another seed would be named)."""
    folder = root / "mnist"
    for d in sorted(REFERENCE.glob(f"*-s{seed}")):
        result = json.loads((d / "result.json").read_text())
        result["run"] = f"{d.name[:-len(str(seed))]}{named_as}"
        (folder / result["run"]).mkdir(parents=True)
        (folder / result["run"] / "result.json").write_text(json.dumps(result))
    shutil.copyfile(REFERENCE / "suite.json", folder / "suite.json")
    return folder


@pytest.fixture
def reference():
    if not (REFERENCE / "vae-mnist-s2" / "result.json").is_file():
        pytest.skip("the three-seed reference is not in this checkout")
    return REFERENCE


def test_seed_0_against_seed_1_of_the_reference_calls_no_regression(reference, tmp_path):
    a, b = _one_seed(tmp_path / "a", 0), _one_seed(tmp_path / "b", 1)
    text, regressed = compare(a, b, None)
    assert regressed  # without the seed noise, seed-to-seed changes pass for regressions
    noise.write_noise(reference, a / noise.NOISE_FILE)  # as `make bench-seeds` leaves it beside the reference
    text, regressed = compare(a, b, None)
    runs = len(list(a.glob("*/result.json")))
    assert not regressed and f"no regression ({runs} runs done in both compared)" in text, text[-600:]
    assert "within the seed noise" in text and f"seed noise: {runs} models, 3 seeds each" in text
    assert main(["compare", str(a), str(b)]) == 0


def test_two_run_folders_are_compared_with_their_suites_seed_noise(reference):
    text, regressed = compare(reference / "vae-mnist-s0", reference / "vae-mnist-s1", None)
    assert not regressed and "only the seed changed (0 -> 1)" in text and f"from {reference}" in text


@pytest.fixture
def new(tmp_path):
    return shutil.copytree(FIXTURE, tmp_path / "new" / "fixture")


def test_a_change_within_the_seeds_spread_is_not_a_regression(new):
    # The fixture's DCGAN recall is 0.3 and 0.4 over its two seeds: s = 0.071, 1.96 sqrt(2) s = 0.196.
    edit(new, "dcgan-mnist-s0", lambda r: r["measurements"]["fid"].update(recall=0.2))  # -33 %, 0.1
    text, regressed = compare(FIXTURE, new, None)
    assert not regressed and "within the seed noise (±0.196)" in text
    edit(new, "dcgan-mnist-s0", lambda r: r["measurements"]["fid"].update(recall=0.05))  # 0.25
    text, regressed = compare(FIXTURE, new, None)
    assert regressed and "beyond the seed noise ±0.196" in text


def test_a_stored_noise_file_serves_results_of_one_seed(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for side in (a, b):
        shutil.copytree(FIXTURE / "dcgan-mnist-s0", side / "dcgan-mnist-s0")
    edit(b, "dcgan-mnist-s0", lambda r: r["measurements"]["fid"].update(recall=0.2))
    text, regressed = compare(a, b, None)
    assert regressed and "no seed noise measured" in text and "seed noise: none" in text
    assert noise.main([str(shutil.copytree(FIXTURE, tmp_path / "seeds"))]) == 0  # the make bench-seeds step
    shutil.copyfile(tmp_path / "seeds" / noise.NOISE_FILE, a / noise.NOISE_FILE)
    text, regressed = compare(a, b, None)
    assert not regressed and "within the seed noise (±0.196)" in text
    assert noise.main([str(a)]) == 2  # one seed: no noise to measure


def _processes(n):
    return lambda r: r["measurements"]["train"].update(processes=n)


@pytest.mark.parametrize("change_a, change_b, field", [
    (_processes(1), lambda r: (_processes(2)(r), r["measurements"]["train"].update(images_per_second=400.0)),
     "processes (1 | 2)"),
    (lambda r: None, lambda r: r["measurements"]["train"].update(precision="bf16", images_per_second=400.0),
     "precision (bf16 | fp32)"),
    (lambda r: None, lambda r: r["config"]["train"].update(max_seconds=None, max_flops=1e12),
     "budget_kind (flops | seconds)")])
def test_runs_of_other_processes_precision_or_budget_kind_are_not_compared(new, change_a, change_b, field):
    ref = shutil.copytree(FIXTURE, new.parent.parent / "ref" / "fixture")
    edit(ref, "dcgan-mnist-s0", change_a)
    edit(new, "dcgan-mnist-s0", change_b)
    edit(new, "dcgan-mnist-s0", lambda r: r["measurements"]["fid"].update(fid=400.0))
    text, regressed = compare(ref, new, None)
    assert not regressed and "protocols differ, not compared: " in text and field in text
    summary = text.splitlines()[-1]
    assert "not compared: their protocols differ in " in summary and field.split(" ")[0] in summary
