"""Every setting that changes a reported figure is in the protocol fingerprint: `report` refuses (or
splits) a suite whose runs differ in one, and never averages the seeds of a model across it.

The runs are copies of the committed three-seed reference (results/archive/mnist-30s-three-seeds, read only), which record
every setting as a run writes it; each case changes one setting of one seed as a run with that
setting would have recorded it.
"""
import json
import shutil

import pytest

from trilemma.contract.errors import TrilemmaError
from trilemma.report.build import build_report
from trilemma.results.protocol import FIELDS, differing, fingerprint, group_by_protocol
from trilemma.results.schema import apply_evaluations

from conftest import REPO

REFERENCE = REPO / "results" / "archive" / "mnist-30s-three-seeds"
RUNS = ("realnvp-mnist-s0", "realnvp-mnist-s1", "dcgan-mnist-s0")
CHANGED = "realnvp-mnist-s1"


def _sampler(r):
    sample = r["measurements"]["sample"]
    return sample["samplers"][sample["default"]]


def sample_bf16(r):
    r["config"]["eval"]["sample_precision"] = "bf16"
    _sampler(r)["precision"] = "bf16"


def sample_batch(r):
    r["config"]["eval"]["sample_batch"] = 16
    _sampler(r)["batch_size"] = 16


def train_compiled(r):
    r["config"]["train"] |= {"compile": True, "compile_mode": "max-autotune"}
    r["measurements"]["train"]["compile"] = "max-autotune"


def sample_compiled(r):
    r["config"]["eval"]["compile"] = True


def ema_off(r):
    r["config"]["train"]["ema_halflife_images"] = 0.0
    r["measurements"]["train"]["ema"] = False


def scaling_resolutions(r):
    r["config"]["eval"]["scaling_resolutions"] = [16, 32, 64]
    r["measurements"]["scaling"]["resolutions"] = [16, 32, 64]


def scaling_batch(r):
    r["config"]["eval"]["scaling_batch"] = 8
    r["measurements"]["scaling"]["batch_size"] = 8


def nll_images(r):
    r["config"]["eval"]["nll_images"] = 500
    r["measurements"]["nll"]["n_images"] = 500


def nll_draws(r):
    r["config"]["eval"]["nll_draws"] = 16
    r["measurements"]["nll"]["protocol"] |= {"dequantization_draws": 16, "importance_weighted": True}
    r["measurements"]["nll"]["kind"] = "estimate"


def two_processes(r):
    r["measurements"]["train"] |= {"processes": 2, "per_device_batch": 32}


def budget_in_images(r):
    r["config"]["train"] |= {"max_seconds": None, "max_images": 20000}


def train_bf16(r):
    r["config"]["train"]["precision"] = "bf16"
    r["measurements"]["train"]["precision"] = "bf16"


CASES = [(sample_bf16, "sampling"), (sample_batch, "sampling"), (train_compiled, "compile"),
         (sample_compiled, "compile"), (ema_off, "ema"), (scaling_resolutions, "scaling"),
         (scaling_batch, "scaling"), (nll_images, "nll"), (nll_draws, "nll"), (two_processes, "processes"),
         (budget_in_images, "budget_kind"), (train_bf16, "precision")]


@pytest.fixture
def suite(tmp_path):
    """A results root holding two seeds of RealNVP and one DCGAN, copied from the reference."""
    if not all((REFERENCE / run / "result.json").is_file() for run in RUNS):
        pytest.skip("the three-seed reference is not in this checkout")
    for run in RUNS:
        (tmp_path / "mnist" / run).mkdir(parents=True)
        shutil.copyfile(REFERENCE / run / "result.json", tmp_path / "mnist" / run / "result.json")
    return tmp_path


def _edit(root, change):
    path = root / "mnist" / CHANGED / "result.json"
    result = json.loads(path.read_text())
    change(result)
    path.write_text(json.dumps(result))
    return result


def _results(root):
    return [json.loads((root / "mnist" / run / "result.json").read_text()) for run in RUNS]


def test_the_reference_is_one_protocol(suite):
    assert len(group_by_protocol(_results(suite))) == 1
    fp = fingerprint(_results(suite)[0])
    assert all(fp[f] is not None for f in ("budget_kind", "processes", "sampling", "compile", "ema", "scaling",
                                           "nll"))


@pytest.mark.parametrize("change, field", CASES, ids=[c.__name__ for c, _ in CASES])
def test_a_changed_setting_is_refused_by_the_report_or_split(suite, change, field):
    _edit(suite, change)
    flow = [r for r in _results(suite) if r["run"].startswith("realnvp")]
    assert field in differing([fingerprint(r) for r in flow]) and field in FIELDS
    with pytest.raises(TrilemmaError, match=rf"\b{field} \(") as error:
        build_report("mnist", suite, suite / "reports")
    assert "\n" not in str(error.value)
    groups = group_by_protocol(_results(suite))  # what --protocols split writes, one report each
    assert len(groups) == 2 and all(sum(r["run"].startswith("realnvp") for r in g) == 1 for g in groups)


def test_a_one_draw_bound_and_a_many_draw_estimate_are_never_averaged(suite):
    # A re-measurement by `trilemma eval --nll-draws 16` of one seed: read with --evaluations latest.
    def remeasured(r):
        nll = dict(r["measurements"]["nll"]) | {"kind": "estimate", "bound": False, "bpd": 1.0}
        nll["protocol"] = dict(nll["protocol"]) | {"dequantization_draws": 16, "importance_weighted": True}
        r["evaluations"] = [{"time": "2026-12-08T00:00:00+00:00", "nll": nll}]
    _edit(suite, remeasured)
    results = [apply_evaluations(r, "latest") for r in _results(suite)]
    assert "nll" in differing([fingerprint(r) for r in results if r["run"].startswith("realnvp")])
    with pytest.raises(TrilemmaError, match=r"nll \("):
        build_report("mnist", suite, suite / "reports", evaluations="latest")
    build_report_groups = group_by_protocol(results)
    assert len(build_report_groups) == 2


def _swept(r, start):
    """A scaling study as the batch sweep records it, started from batch ``start``."""
    r["config"]["eval"]["scaling_batch"] = start
    r["measurements"]["scaling"]["batch_size"] = start
    for p in r["measurements"]["scaling"]["points"]:
        p["train_sweep"] = [[start or 2, 1e-3]]


def test_a_swept_scaling_study_is_one_protocol_whatever_batch_it_started_from(suite):
    """The sweep times each size at its cheapest batch, so where it started changes no slope: studies
    started from different batches are one protocol; a fill-rule study is not one of them."""
    results = _results(suite)
    _swept(results[0], 0)
    _swept(results[1], 64)
    assert fingerprint(results[0])["scaling"] == fingerprint(results[1])["scaling"]
    assert "cheapest batch" in fingerprint(results[0])["scaling"]
    assert fingerprint(results[2])["scaling"] != fingerprint(results[0])["scaling"]
