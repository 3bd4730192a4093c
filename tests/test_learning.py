"""Every family learns: at its ``mnist`` preset (the reference table's) on fixed structured 16x16
images, its own quality figure (NLL, or the moment distance of its samples) improves between two short
budgets, and its held-out training loss falls.

``TRILEMMA_LEARNING_NO_STEP=1`` runs the same check with every optimizer step disabled (all else of
the update runs): then every family must fail it, which shows the check can fail.
"""
import os

import pytest
import torch

from trilemma.contract.errors import ContractError
from trilemma.contract.registry import registered
from trilemma.contract.testing import check_learning, sample_moment_distance, structured_batch

MODELS = registered()
NO_STEP = os.environ.get("TRILEMMA_LEARNING_NO_STEP") == "1"


@pytest.mark.parametrize("name", list(MODELS))
def test_every_family_learns(name):
    if NO_STEP:
        with pytest.raises(ContractError, match="did not learn|did not fall"):
            check_learning(MODELS[name], preset="mnist", step_enabled=False)
    else:
        figures = check_learning(MODELS[name], preset="mnist")
        assert figures["final"] < figures["initial"]


@pytest.mark.parametrize("name", ["vae", "dcgan"])
def test_the_learning_check_fails_without_optimizer_steps(name):
    with pytest.raises(ContractError, match="did not learn"):
        check_learning(MODELS[name], preset="mnist", step_enabled=False)


def test_sample_moment_distance_is_zero_for_the_data_and_large_for_noise():
    data = structured_batch(64, (1, 16, 16))
    assert sample_moment_distance(data.float() / 127.5 - 1, data) == pytest.approx(0, abs=1e-12)
    noise = torch.rand(64, 1, 16, 16) * 2 - 1
    assert sample_moment_distance(noise, data) > 0.1
