"""Resolution scaling on one tiny model: finite slopes, and an out-of-memory size recorded, not raised."""
import dataclasses
import math

import pytest
import torch

from trilemma.contract.family import build_config
from trilemma.contract.registry import get_model_class
from trilemma.measure.scaling import fit_slope, resolution_scaling


def tiny_dcgan() -> dict:
    return dataclasses.asdict(build_config(get_model_class("dcgan"), "tiny", {}))


def test_two_small_resolutions_give_finite_slopes():
    study = resolution_scaling("dcgan", tiny_dcgan(), 1, [8, 16], batch_size=2, repeats=2,
                               device=torch.device("cpu"))
    assert [p["status"] for p in study["points"]] == ["ok", "ok"]
    assert all(math.isfinite(study["slopes"][k]) for k in ("train", "sample", "memory"))
    # More pixels, more activations to keep for the backward pass.
    assert study["points"][1]["memory_bytes"] > study["points"][0]["memory_bytes"]
    assert study["device"] == "cpu" and study["precision"] == "fp32" and study["repeats"] == 2


def test_a_class_conditional_family_gets_labels():
    config = dataclasses.asdict(build_config(get_model_class("biggan"), "tiny", {}))
    study = resolution_scaling("biggan", config, 1, [8], batch_size=2, repeats=1, device="cpu")
    assert study["points"][0]["status"] == "ok", study["points"][0]


def test_out_of_memory_is_recorded_per_resolution(monkeypatch):
    from trilemma.models.dcgan import DCGAN

    real_step = DCGAN.train_step

    def step(self, x, optimizers):
        if x.shape[-1] >= 32:  # the largest size "does not fit"
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real_step(self, x, optimizers)

    monkeypatch.setattr(DCGAN, "train_step", step)
    study = resolution_scaling("dcgan", tiny_dcgan(), 1, [8, 16, 32], batch_size=2, repeats=1,
                               device=torch.device("cpu"))
    assert [p["status"] for p in study["points"]] == ["ok", "ok", "oom"]
    assert study["points"][2]["resolution"] == 32
    assert math.isfinite(study["slopes"]["train"])  # fitted over the two sizes that fit


def test_other_errors_are_recorded_with_their_message(monkeypatch):
    from trilemma.models.dcgan import DCGAN

    def broken(self, n, sampler=None):
        raise ValueError("no sampler at this size (simulated)")

    monkeypatch.setattr(DCGAN, "sample", broken)
    study = resolution_scaling("dcgan", tiny_dcgan(), 1, [8], batch_size=2, repeats=1, device="cpu")
    assert study["points"][0] == {"resolution": 8, "pixels": 64, "status": "error", "type": "ValueError",
                                       "message": "no sampler at this size (simulated)"}
    assert study["slopes"] == {"train": None, "sample": None, "memory": None}


def test_slope_fit():
    points = [{"pixels": n, "status": "ok", "t": 3.0 * n ** 1.5} for n in (64, 256, 1024)]
    assert fit_slope(points, "t") == pytest.approx(1.5)
    assert fit_slope(points[:1] + [{"pixels": 256, "status": "oom"}], "t") is None
