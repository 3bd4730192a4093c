"""A speed timed while other processes held the CPUs it wanted is told apart, timed again once the
machine is quiet where that is cheap (sampling), and otherwise kept out of the stars and `compare`.

Contention is measured over the timed window itself, from the CPU time all processes spent
(``/proc/stat``) less this process's own, not from the 1-minute load average, which lags a hog's start
and end by a minute.
"""
import json
import shutil
import subprocess
import sys
import time

import pytest
import torch

from trilemma.measure import speed, timing
from trilemma.measure.timing import CpuMeter, cpu_share, cpu_snapshot, is_contended, time_calls
from trilemma.report.build import build_report
from trilemma.results.compare import compare

from conftest import REPO

REFERENCE = REPO / "results" / "archive" / "mnist-30s-three-seeds"
CORES = __import__("os").cpu_count() or 1
HAS_PROC_STAT = cpu_snapshot() is not None


def test_the_cpu_share_of_a_window():
    """Two snapshots 10 s apart: this process used 2 CPU seconds a second, all processes 3.5: the
    others kept 1.5 cores busy. Wanting 2 threads of 2 cores, the others took 1.5 of them."""
    before, after = (0.0, 100.0, 50.0), (10.0, 135.0, 70.0)
    torch.set_num_threads(2)
    share = cpu_share(before, after, "cpu", cores=2)
    assert share["own_cpu"] == pytest.approx(2.0) and share["others_cpu"] == pytest.approx(1.5)
    assert share["contention"] == pytest.approx(1.5) and is_contended(share, None, None, cores=2)
    # Wanting one thread of 8 cores, 1.5 other cores take nothing from it.
    torch.set_num_threads(1)
    assert cpu_share(before, (10.0, 125.0, 60.0), "cpu", cores=8)["contention"] == 0.0
    # Data-parallel peers are the job's own: two ranks each using 1 core are not contention.
    assert cpu_share(before, (10.0, 120.0, 60.0), "cpu", cores=2, peers=1)["others_cpu"] == pytest.approx(0.0)
    # Too short a window for the clock ticks: unknown, and the load average decides.
    assert cpu_share(before, (0.01, 100.0, 50.0))["contention"] is None
    assert is_contended({"contention": None}, 9.0, 9.0, cores=2) and not is_contended({"contention": None}, 1.0, 1.0, 2)
    torch.set_num_threads(CORES)


def _work(seconds: float = 0.1):
    """CPU-bound work for a fixed wall time, so that a window of calls outlasts /proc/stat's clock ticks
    (CPU_WINDOW_SECONDS) on a fast machine as on a slow one."""
    a, end = torch.randn(256, 256), time.perf_counter() + seconds
    while time.perf_counter() < end:
        a = torch.tanh(a @ a / 16)
    return a


@pytest.mark.skipif(not HAS_PROC_STAT, reason="no /proc/stat: contention falls back to the load average")
def test_a_cpu_hog_beside_a_timing_marks_it_contended():
    """The timed calls want every core; hogs as many as the cores run beside them: the record says so
    at once (the load average would still read the minute before)."""
    torch.set_num_threads(CORES)
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(CORES)]
    try:
        time.sleep(0.5)
        record = time_calls(_work, torch.device("cpu"), repeats=8, warmup=1)
    finally:
        for hog in hogs:
            hog.kill()
    assert record["others_cpu"] > 0.5, record  # the hogs got about half the cores, sharing with us
    assert record["contended"], record
    assert record["threads"] == CORES


def test_the_meter_sums_its_windows_only():
    meter = CpuMeter()
    for _ in range(3):
        meter.measure(_work)
    share = meter.share("cpu")
    if HAS_PROC_STAT and meter.total[0] >= timing.CPU_WINDOW_SECONDS:
        assert share["own_cpu"] > 0.3 and meter.total[0] < 60
    time.sleep(0.3)  # idle time between windows is not counted
    assert meter.share("cpu") == share


def test_a_contended_sample_speed_is_timed_again_once_quiet(monkeypatch):
    """The first timing was contended; once the machine is quiet the sampler is timed again and that
    record is kept (retimed); if it never goes quiet the contended record stays, marked."""
    records = iter([{"contended": True, "busy": 1}, {"contended": False, "busy": 0}])

    def fake_time_calls(fn, device, repeats, seconds_cap, warmup=1, desc=None):
        fn()
        return next(records) | {"median": 0.1, "iqr": 0.0, "seconds": [0.1], "repeats": 1,
                                "warmup_seconds": [0.1] * warmup,  # as time_calls: none when warmup=0
                                "load_before": 0.0, "load_after": 0.0, "own_cpu": 1.0, "others_cpu": 0.0,
                                "contention": 0.0}

    from trilemma.contract.family import build_config
    from trilemma.contract.registry import get_model_class

    cls = get_model_class("dcgan")
    model = cls(build_config(cls, "tiny", {}), (1, 8, 8))
    monkeypatch.setattr(speed, "time_calls", fake_time_calls)
    monkeypatch.setattr(speed, "wait_for_quiet", lambda device, wait: True)
    record = speed.sample_speed(model, 4, 3, 10.0)
    assert record["retimed"] and not record["contended"]
    assert record["warmup_seconds"] == 0.1  # the first timing's warm-up (the re-timing has none)
    records = iter([{"contended": True}])
    monkeypatch.setattr(speed, "wait_for_quiet", lambda device, wait: False)
    record = speed.sample_speed(model, 4, 3, 10.0)
    assert not record["retimed"] and record["contended"]


@pytest.fixture
def suite(tmp_path):
    runs = ("vae-mnist-s0", "vae-mnist-s1", "dcgan-mnist-s0", "realnvp-mnist-s0")
    if not all((REFERENCE / run / "result.json").is_file() for run in runs):
        pytest.skip("the three-seed reference is not in this checkout")
    for run in runs:
        (tmp_path / "mnist" / run).mkdir(parents=True)
        result = json.loads((REFERENCE / run / "result.json").read_text())
        for key in ("train", "sample"):  # quiet, as a run that measured its CPU share records
            section = result["measurements"][key]
            for record in ([section] if key == "train" else section["samplers"].values()):
                record["contended"] = False
        (tmp_path / "mnist" / run / "result.json").write_text(json.dumps(result))
    shutil.copyfile(REFERENCE / "suite.json", tmp_path / "mnist" / "suite.json")
    return tmp_path


def _contend(path, factor=0.1):
    """The run's train speed timed beside a hog: a tenth of its speed, marked contended."""
    result = json.loads(path.read_text())
    train = result["measurements"]["train"]
    train["images_per_second"] *= factor
    train["contended"] = True
    path.write_text(json.dumps(result))


def test_a_contended_speed_has_no_stars_and_leaves_the_mean(suite):
    import pandas as pd

    quiet = build_report("mnist", suite, suite / "quiet")
    before = pd.read_csv(quiet / "table.csv").set_index("trilemma_model")
    _contend(suite / "mnist" / "vae-mnist-s1" / "result.json")  # one of two seeds: the other's speed stands
    _contend(suite / "mnist" / "dcgan-mnist-s0" / "result.json")  # its only seed: no speed, no stars
    out = build_report("mnist", suite, suite / "busy")
    table = pd.read_csv(out / "table.csv").set_index("trilemma_model")
    vae_s0 = json.loads((suite / "mnist" / "vae-mnist-s0" / "result.json").read_text())
    assert table.loc["vae", "train_images_per_second"] == pytest.approx(
        vae_s0["measurements"]["train"]["images_per_second"])
    assert pd.isna(table.loc["dcgan", "train_images_per_second"]) and pd.isna(table.loc["dcgan", "stars_train"])
    assert not pd.isna(before.loc["dcgan", "stars_train"])
    assert table.loc["realnvp", "stars_sample"] == before.loc["realnvp", "stars_sample"]
    caption = (out / "index.md").read_text(encoding="utf-8")
    assert "`dcgan-mnist-s0`" in caption and "no stars" in caption


def test_compare_calls_no_speed_regression_on_a_contended_run(suite, tmp_path):
    new = tmp_path / "new" / "mnist"
    shutil.copytree(suite / "mnist", new)
    _contend(new / "vae-mnist-s0" / "result.json")  # ten times slower, beside a hog
    text, regressed = compare(suite / "mnist", new, None)
    assert not regressed, text
    assert "train images/s: not compared: the new run's was timed on a contended machine" in text
