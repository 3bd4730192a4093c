"""`trilemma show --timings`: each phase's seconds per run, summed over the suite, with shares."""
from trilemma.results.timings import phase_seconds, timings_table


def _result(run, **timings):
    return {"run": run, "status": "done", "timings": timings}


def test_phases_are_summed_over_runs_and_ordered_by_total():
    results = [_result("a", train=30.0, nll=5.0), _result("b", train=40.0, fid_features=90.0)]
    per_run, total = phase_seconds(results)
    assert per_run["b"] == {"train": 40.0, "fid_features": 90.0}
    assert list(total) == ["fid_features", "train", "nll"] and total["train"] == 70.0


def test_the_table_has_a_total_and_shares_that_add_up():
    text = timings_table([_result("a", train=60.0, nll=30.0), _result("b", train=90.0, nll=20.0)])
    lines = text.splitlines()
    assert lines[0].split() == ["run", "train", "nll", "all"]
    assert lines[-2].split() == ["total", "2:30", "0:50", "3:20"]
    assert lines[-1].split() == ["share", "75%", "25%", "100%"]


def test_results_without_timings_say_so():
    assert timings_table([{"run": "a", "status": "done"}]) == "(no timings recorded)"


def test_a_timing_that_takes_seconds_shows_a_progress_bar_and_a_quick_one_does_not(capsys):
    import time

    import torch

    from trilemma.measure.timing import time_calls

    time_calls(lambda: time.sleep(0.01), torch.device("cpu"), repeats=3, desc="quick timing")
    assert "quick timing" not in capsys.readouterr().err
    record = time_calls(lambda: time.sleep(0.75), torch.device("cpu"), repeats=3, desc="slow timing")
    assert "slow timing" in capsys.readouterr().err and record["repeats"] == 3
