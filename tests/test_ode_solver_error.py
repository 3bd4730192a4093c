"""ODE likelihoods carry their solver error: the CPU presets score the NLL with an adaptive solver at a
recorded tolerance, and the NLL measurement re-scores a batch with a 100 times tighter solve under the
same random draws and records the difference, which at the presets' tolerance is below the figure's
standard error (a coarse fixed-step solver's is not)."""
import math

import pytest
import torch

from trilemma.contract.family import build_config
from trilemma.contract.likelihood import bits_per_dim
from trilemma.contract.registry import get_model_class
from trilemma.contract.update import plain_update
from trilemma.measure.nll import nll as measure_nll
from trilemma.models.ode import ADAPTIVE, REFERENCE_FACTOR, solver_error

ODE_FAMILIES = ["ffjord", "flow_matching", "ddpm_pp"]
SHAPE = (1, 8, 8)


@pytest.mark.parametrize("name", ODE_FAMILIES)
@pytest.mark.parametrize("preset, shape", [("mnist", (1, 28, 28)), ("cifar10", (3, 32, 32))])
def test_the_cpu_presets_score_the_nll_with_an_adaptive_solver(name, preset, shape):
    cls = get_model_class(name)
    protocol = cls(build_config(cls, preset, {}), shape).nll_protocol()
    assert protocol["solver"] in ADAPTIVE, protocol
    assert protocol["rtol"] > 0 and protocol["atol"] > 0, protocol


def varied_batch(n: int, seed: int = 0) -> torch.Tensor:
    """uint8 images (n, *SHAPE) that differ as digits do: a square of random size and brightness on a
    noisy dark field, so that their NLLs spread about as MNIST's do (a standard deviation of tenths of a
    bit per dim; copies of one pattern would make any standard error look small)."""
    g = torch.Generator().manual_seed(seed)
    _, h, w = SHAPE
    x = torch.randint(0, 40, (n, *SHAPE), generator=g)
    for i in range(n):
        side = int(torch.randint(2, h - 1, (), generator=g))
        top, left = torch.randint(0, h - side + 1, (2,), generator=g).tolist()
        x[i, :, top:top + side, left:left + side] += int(torch.randint(60, 216, (), generator=g))
    return x.clamp(0, 255).to(torch.uint8)


def trained(name: str, steps: int = 10, **overrides):
    """The family at its mnist preset on small varied images, after a few training steps (an
    untrained network's drift is nearly linear: any solver gets it right)."""
    cls = get_model_class(name)
    torch.manual_seed(0)
    model = cls(build_config(cls, "mnist", overrides), SHAPE)
    update, x = plain_update(model), varied_batch(32)
    model.train()
    for _ in range(steps):
        model.train_step(x, update)
    return model.eval()


@pytest.mark.parametrize("name", ODE_FAMILIES)
def test_the_nll_records_its_solver_error_below_its_standard_error(name):
    model = trained(name)
    torch.manual_seed(1)
    record = measure_nll(model, varied_batch(16, seed=1), batch=16)
    assert record["protocol"]["solver"] in ADAPTIVE
    rtol = record["protocol"]["rtol"] / REFERENCE_FACTOR
    assert record["solver_error_images"] == 4 and f"rtol {rtol:g}" in record["solver_reference"]
    assert math.isfinite(record["solver_error_bpd"]) and record["solver_error_max_bpd"] >= record["solver_error_bpd"]
    assert record["solver_error_bpd"] < record["bpd_sem"], record


def test_a_coarse_fixed_step_solver_shows_its_error():
    """The check is not blind: one midpoint step (2 network evaluations) is far off the reference, and
    its error is recorded as such, while dopri5 at the preset's tolerance is close."""
    model = trained("flow_matching")
    x = varied_batch(4, seed=1)
    adaptive = model.solver_error(x)
    model.config.nll_solver, model.config.nll_steps = "midpoint", 1
    coarse = model.solver_error(x)
    assert coarse["solver_reference"].startswith("method dopri5")
    assert coarse["solver_error_bpd"] > 10 * adaptive["solver_error_bpd"], (coarse, adaptive)
    assert model.nll_protocol()["solver"] == "midpoint" and model.nll_protocol()["solver_steps"] == 1


def test_both_solves_see_the_same_random_draws():
    """The figure's and the reference's scores run from the same seed: random draws (dequantization,
    Hutchinson's probes) cancel, and only what the solves do differently is left."""
    x = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
    offset = 0.5  # nats per image that the "reference" solve gives less
    noisy = lambda x, reference: torch.rand(len(x)) * 100 - (offset if reference else 0.0)  # noqa: E731
    result = solver_error(noisy, x, 4, {"method": "dopri5", "rtol": 1e-5, "atol": 1e-5})
    assert result["solver_error_bpd"] == pytest.approx(float(bits_per_dim(offset, 4)))
    assert result["solver_reference"] == "method dopri5, rtol 1e-05, atol 1e-05"
