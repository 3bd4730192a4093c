"""The report's Stacked MNIST section: our modes beside the mode-collapse literature's, each row at its n."""
import math

import pytest

from trilemma.contract.literature import stacked_mnist_rows
from trilemma.measure.coverage import uniform_modes
from trilemma.report.stacked import stacked_section


def _coverage(modes, kl, n):
    return {"kind": "modes", "modes": modes, "modes_kl": kl, "n": n, "modes_confident_fraction": 0.5,
            "bootstrap": {"modes_ci": [modes - 4, modes + 4], "modes_kl_ci": [kl - 0.1, kl + 0.1]},
            "classifier": {"key": "k", "test_accuracy": 0.9923}}


def _result(run, coverage, evaluations=()):
    return {"schema": "trilemma.result/2", "run": run, "status": "done",
            "model": {"name": "dcgan", "title": "DCGAN"},
            "config": {"model": "dcgan", "data": {"name": "stacked_mnist"}, "seed": 0},
            "measurements": {"coverage": coverage} if coverage else {}, "evaluations": list(evaluations)}


def test_uniform_expectation():
    assert uniform_modes(500) == pytest.approx(1000 * (1 - math.exp(-0.5)), rel=1e-3)
    assert uniform_modes(26_000) == pytest.approx(1000, abs=1e-6)


def test_the_section_lists_our_runs_at_their_n_and_the_literature():
    own = _result("dcgan-stacked_mnist-s0", _coverage(212, 1.31, 500),
                  [{"time": "t", "coverage": _coverage(540, 1.02, 26_000)}])
    text = stacked_section([own, _result("vae-stacked_mnist-s0", None)])
    lines = text.splitlines()
    ours = [line for line in lines if "`dcgan-stacked_mnist-s0`" in line]
    assert len(ours) == 2  # the run's own 500 and the re-measurement at the literature's n
    assert "| 500 | 212 ± 4 | 1.31 ± 0.10 |" in ours[0] and ours[0].endswith("| 394 |")
    assert "`trilemma eval`" in ours[1] and "| 26,000 | 540 ± 4 |" in ours[1] and ours[1].endswith("| 1,000 |")
    assert "99.23%" in text
    for row in stacked_mnist_rows():  # every literature figure with its source
        assert f"| {row['model']} | {row['samples']:,} | {row['modes']:g} | {row['kl']:.2f} |" in text
    assert "vae" not in text  # a run without modes has no row


def test_no_section_without_modes():
    assert stacked_section([_result("dcgan-mnist-s0", {"kind": "classes", "n": 500,
                                                        "class_confident_fraction": 0.7})]) == ""
