"""The Inception calibration: every thread count is compared, whatever the time cap."""
import os

import pytest
import torch

from trilemma.measure.inception import calibrate


class _Tiny(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.avg_pool2d(x.float(), 2).flatten(1)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores")
def test_calibration_tries_every_thread_count_even_with_no_time():
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the tests run on one thread (conftest); calibration compares 1 and 2
    try:
        result = calibrate(_Tiny(), torch.device("cpu"), sizes=(2, 4, 8), seconds=0.0)
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(before)
    assert {t["threads"] for t in result["trials"]} == {1, 2}
    assert all(t["batch"] == 4 for t in result["trials"])  # no time left for the other batch sizes


def test_calibration_picks_the_fastest_trial():
    result = calibrate(_Tiny(), torch.device("cpu"), sizes=(2, 4, 8), seconds=60.0)
    best = max(result["trials"], key=lambda t: t["images_per_second"])
    assert (result["threads"], result["batch"]) == (best["threads"], best["batch"])
    assert {t["batch"] for t in result["trials"]} == {2, 4, 8}
