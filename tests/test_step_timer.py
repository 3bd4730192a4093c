"""Training steps timed without serialising a GPU: CUDA events around each step, read in batches.

No GPU here: the deferred path runs with a stand-in event that keeps the host clock, so what is
tested is the bookkeeping (order, warm-up, budget, evaluation points, how rarely the loop waits),
not CUDA's events themselves."""
import json
import time

import pytest
import torch

from trilemma.measure.timing import StepTimer
from trilemma.results.io import read_result
from trilemma.run import loop
from trilemma.run.runner import Context, execute, run_dir_for
from trilemma.run.settings import expand, load_suite

from conftest import REPO

SMOKE = REPO / "suites" / "smoke.yaml"


class HostEvent:
    """torch.cuda.Event's timing interface on the host clock; counts the waits."""
    waits = 0

    def record(self):
        self.t = time.perf_counter()

    def synchronize(self):
        HostEvent.waits += 1

    def elapsed_time(self, end):  # milliseconds, as CUDA's
        return (end.t - self.t) * 1000.0


class DeferredTimer(StepTimer):
    made = []

    def __init__(self, device):
        super().__init__(device, event=HostEvent)
        DeferredTimer.made.append(self)


def test_deferred_timer_waits_once_per_collection_and_keeps_the_steps_in_order():
    HostEvent.waits = 0
    timer = StepTimer(torch.device("cpu"), event=HostEvent)
    assert timer.deferred
    for pause in (0.01, 0.03, 0.02):
        timer.start()
        time.sleep(pause)
        timer.stop()
    assert timer.pending == 3 and HostEvent.waits == 0  # nothing read yet: the host never waited
    seconds = timer.collect()
    assert HostEvent.waits == 1 and timer.pending == 0 and timer.collect() == []
    assert [round(s, 2) for s in seconds] == [0.01, 0.03, 0.02]


def test_the_cpu_timer_knows_each_step_at_once():
    timer = StepTimer(torch.device("cpu"))
    assert not timer.deferred
    timer.start()
    time.sleep(0.01)
    timer.stop()
    assert timer.pending == 1 and timer.collect()[0] == pytest.approx(0.01, abs=0.01)


def _run(overrides):
    return expand(load_suite(SMOKE, overrides), ["dcgan"])[0]


def test_deferred_timing_trains_the_same_run_and_reads_the_clock_rarely(tmp_path, monkeypatch):
    """A budget in images: the deferred timer changes nothing but how often the host waits."""
    overrides = ["train.max_images=320", "train.eval_points=2", "train.log_every_steps=10"]
    run = _run(overrides)
    assert execute(run, run_dir_for(tmp_path / "a", run), Context(torch.device("cpu"))) == "done"
    HostEvent.waits = 0
    monkeypatch.setattr(loop, "StepTimer", DeferredTimer)
    assert execute(run, run_dir_for(tmp_path / "b", run), Context(torch.device("cpu"))) == "done"
    a, b = (read_result(run_dir_for(tmp_path / d, run)) for d in "ab")
    steps = b["measurements"]["train"]["steps"]
    assert steps == a["measurements"]["train"]["steps"] == 20
    assert [p["images"] for p in b["curve"]] == [p["images"] for p in a["curve"]]
    assert (run_dir_for(tmp_path / "a", run) / "samples.png").read_bytes() == \
        (run_dir_for(tmp_path / "b", run) / "samples.png").read_bytes()
    # Waits: the two logging ticks and the evaluation point between them, against 20 steps.
    assert 0 < HostEvent.waits <= 4
    train = b["measurements"]["train"]
    assert train["train_seconds"] > 0 and train["images_per_second"] > 0
    logged = [json.loads(line) for line in (run_dir_for(tmp_path / "b", run) / "log.jsonl").read_text().splitlines()]
    assert all(line["images_per_second"] > 0 for line in logged if line["kind"] == "train")


def test_deferred_timing_ends_a_time_budget_on_time(tmp_path, monkeypatch):
    """A budget in seconds: the loop settles where the unread steps may have spent it, so training
    stops within a step or two of the budget and not a logging tick later."""
    monkeypatch.setattr(loop, "StepTimer", DeferredTimer)
    DeferredTimer.made = []
    run = _run(["train.max_images=null", "train.max_seconds=1.5", "train.eval_points=3",
                "train.log_every_steps=1000"])
    assert execute(run, run_dir_for(tmp_path, run), Context(torch.device("cpu"))) == "done"
    result = read_result(run_dir_for(tmp_path, run))
    train = result["measurements"]["train"]
    step = train["train_seconds"] / train["steps"]
    assert 1.5 <= train["train_seconds"] <= 1.5 + 2 * step
    assert len(result["curve"]) == 3 and DeferredTimer.made and DeferredTimer.made[-1].pending == 0
