"""Training curves compare: every point of a drawn curve is measured alike, on training images, seconds
and counted FLOPs; a run's curve is measured by one protocol up to its last point."""
import os

import pytest
import torch

from trilemma.report.figures import compute_figure, curve_figure, curve_points
from trilemma.results.io import read_result
from trilemma.run.runner import Context, execute, run_dir_for
from trilemma.run.settings import expand, load_suite

from conftest import REPO


def _result(curve):
    return {"model": {"name": "dcgan"}, "curve": curve}


def test_a_curve_keeps_the_points_of_its_first_protocol():
    old = _result([{"images": 10, "train_seconds": 1, "fid": 300, "fid_samples": 50, "precision": "bf16"},
                   {"images": 20, "train_seconds": 2, "fid": 250, "fid_samples": 50, "precision": "bf16"},
                   {"images": 30, "train_seconds": 3, "fid": 104, "fid_samples": 500, "precision": "fp32",
                    "final": True}])
    assert [p["images"] for p in curve_points(old)] == [10, 20]  # the final FID@500 is not drawn on it
    assert curve_figure([old]) is not None
    assert compute_figure([old]) is None  # no FLOPs recorded


def test_compute_figure_draws_runs_with_counted_flops():
    run = _result([{"images": 10, "train_seconds": 1, "flops": 1e9, "fid": 300, "fid_samples": 50},
                   {"images": 20, "train_seconds": 2, "flops": 2e9, "fid": 200, "fid_samples": 50}])
    fig = compute_figure([run])
    assert fig is not None and fig.axes[0].get_xscale() == "log"
    assert [tuple(line.get_xdata()) for line in fig.axes[0].get_lines()] == [(1e9, 2e9)]


def test_every_curve_point_of_a_run_is_measured_by_the_curve_protocol(tmp_path):
    if not os.environ.get("TRILEMMA_FID_WEIGHTS"):
        pytest.skip("TRILEMMA_FID_WEIGHTS is not set to a weights file")
    suite = load_suite(REPO / "suites" / "smoke.yaml",
                       ["eval.fid=true", "eval.fid_samples=16", "eval.fid_ref_images=32", "eval.kid=false",
                        "eval.precision_recall=false", "eval.curve_fid_samples=8", "eval.nll=false",
                        "train.eval_points=2"])
    run = expand(suite, ["dcgan"])[0]
    assert execute(run, run_dir_for(tmp_path, run), Context(torch.device("cpu"))) == "done"
    result = read_result(run_dir_for(tmp_path, run))
    curve = result["curve"]
    assert len(curve) == 2 and all(p["fid_samples"] == 8 and p["fid"] is not None for p in curve)
    assert curve[-1]["images"] == result["measurements"]["train"]["images_seen"]
    assert all(p["flops"] > 0 for p in curve) and curve[-1]["flops"] == result["measurements"]["train"]["train_flops"]
