"""The resolution-scaling slope does not depend on the batch: each resolution is timed at the batch of
least per-image cost found by a sweep (recorded), and the FLOP slope beside it is the same whatever the
batch or the machine."""
import dataclasses
import statistics
import time

import pytest
import torch

from trilemma.contract.family import build_config
from trilemma.contract.registry import get_model_class
from trilemma.measure.scaling import resolution_scaling, slope_interval, sweep_batch

CPU = torch.device("cpu")


def preset(name: str, which: str = "tiny") -> dict:
    return dataclasses.asdict(build_config(get_model_class(name), which, {}))


def sleeper(per_image):
    """A call on a batch of b that sleeps b * per_image(b) seconds: a known cost curve."""
    return lambda b: (lambda: time.sleep(b * per_image(b)))


def test_the_sweep_finds_the_cheapest_batch_from_either_side():
    # Per-image cost 20 ms / b + 1 ms + 0.1 ms * b: overheads amortized, then a cost that grows with the
    # batch (caches overflowing); least at b = sqrt(200) ~ 14, i.e. 16 among powers of two. From 1 the
    # sweep doubles up to the first call of 0.1 s (32); from 32 it halves while that pays.
    curve = lambda b: 0.02 / b + 0.001 + 0.0001 * b  # noqa: E731
    for start in (1, 32):
        best, record, sweep = sweep_batch(sleeper(curve), CPU, start, 1, 1024, fill_seconds=0.1, repeats=3,
                                          seconds_cap=5.0)
        assert best == 16, sweep
        assert record["repeats"] == 3  # the chosen batch's timed calls topped up to `repeats`
        tried = [b for b, _ in sweep]
        assert tried[0] == start and 16 in tried and 8 in tried and 32 in tried
        assert min(sweep, key=lambda p: p[1])[0] == best


def test_the_sweep_stops_doubling_at_a_long_call():
    # A call of 50 ms + 2 ms per image: doubling always pays (by 22 % or more per image up to 64), and a
    # call is at fill_seconds (30 ms) from batch 1, so the sweep goes on while doubling pays, up to the
    # first call of STRETCH * fill_seconds (120 ms): 64's 178 ms. Without that stop it would run to 1024.
    best, _, sweep = sweep_batch(sleeper(lambda b: 0.05 / b + 0.002), CPU, 1, 1, 1024, fill_seconds=0.03,
                                 repeats=2, seconds_cap=5.0)
    assert [b for b, _ in sweep] == [1, 2, 4, 8, 16, 32, 64] and best == 64


def test_the_sweep_never_tries_a_call_expected_past_the_cap():
    # 100 ms + 10 ms per image: every doubling pays (by 19 % or more), but from batch 16 (0.26 s) the
    # next call would pass the 0.5 s cap: the sweep stops there rather than time a call it cannot repeat.
    best, _, sweep = sweep_batch(sleeper(lambda b: 0.1 / b + 0.01), CPU, 1, 1, 1024, fill_seconds=0.1,
                                 repeats=2, seconds_cap=0.5)
    assert [b for b, _ in sweep] == [1, 2, 4, 8, 16] and best == 16


def study(name: str, start: int) -> dict:
    return resolution_scaling(name, preset(name), 1, [8, 16], batch_size=start, repeats=3, device=CPU,
                              fill_seconds=0.1, max_batch=512)


@pytest.mark.parametrize("name", ["vae"])
def test_two_batch_settings_give_the_same_slopes(name):
    """A sweep started at batch 2 and one started at 64 find their costs at the same efficient batches,
    so the slopes agree within 0.1 (at fixed batches of 2 and 64 a tiny model's slopes differ by far
    more: per-call overheads dominate at 2). Median of three studies each: a busy machine disturbs
    single calls."""
    slopes = {start: {"train": [], "sample": []} for start in (2, 64)}
    for _ in range(3):
        for start in slopes:
            result = study(name, start)
            assert [p["status"] for p in result["points"]] == ["ok", "ok"], result["points"]
            for key in ("train", "sample"):
                slopes[start][key].append(result["slopes"][key])
    for key in ("train", "sample"):
        low, high = (statistics.median(slopes[start][key]) for start in (2, 64))
        assert abs(low - high) < 0.1, (key, slopes)
    # Every point records its sweep, its chosen batch the cheapest of it, and the FLOPs counted.
    for point in result["points"]:
        for key in ("train", "sample"):
            sweep = point[f"{key}_sweep"]
            assert point[f"{key}_batch"] == min(sweep, key=lambda p: p[1])[0]
            assert point[f"{key}_flops_per_image"] > 0
    assert "least per-image cost" in result["batch_protocol"]


def test_the_flop_slope_is_the_same_at_any_batch_setting():
    """Counted FLOPs do not depend on the batch, the sweep or the machine: the same slope from two
    settings, and a growing cost with the pixels."""
    first, second = study("dcgan", 2), study("dcgan", 64)
    for key in ("train", "sample"):
        assert first["flop_slopes"][key] == pytest.approx(second["flop_slopes"][key], abs=1e-9)
        assert first["flop_slopes"][key] > 0.5


def test_slope_interval_from_the_spread_of_the_timed_calls():
    def point(pixels, seconds):
        return {"status": "ok", "pixels": pixels, "train_timings": seconds}

    steady = [point(64, [1.0, 1.0, 1.0]), point(256, [4.0, 4.0, 4.0])]
    assert slope_interval(steady, "train") == pytest.approx(0.0)
    noisy = [point(64, [1.0, 1.2, 0.9]), point(256, [4.0, 5.0, 4.4])]
    assert 0 < slope_interval(noisy, "train") < 1
    assert slope_interval([point(64, [1.0]), point(256, [4.0, 4.1])], "train") is None  # timed once


def test_sampling_is_timed_on_the_weights_as_built(monkeypatch):
    """The train sweep's steps update the weights on random data, where they may diverge (VLAE's drew NaN
    probabilities at 48x48 after a 5 s sweep): the sampling calls see the weights as built."""
    from trilemma.measure import scaling

    seen = []

    def build(*args, **kwargs):
        model = build_model(*args, **kwargs)
        train_step, generate = model.train_step, model.generate

        def diverging_step(x, update, **kw):
            out = train_step(x, update, **kw)
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float("nan"))
            return out

        def checked_generate(n, sampler):
            seen.append(all(bool(torch.isfinite(p).all()) for p in model.parameters()))
            return generate(n, sampler)

        model.train_step, model.generate = diverging_step, checked_generate
        return model

    build_model = scaling.build_model
    monkeypatch.setattr(scaling, "build_model", build)
    result = resolution_scaling("vae", preset("vae"), 1, [8], 2, 1, CPU, seconds_cap=0.5, fill_seconds=0.01,
                                max_batch=4)
    assert result["points"][0]["status"] == "ok", result["points"][0]
    assert seen and all(seen)
