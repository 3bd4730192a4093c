"""The kind of every dequantized NLL (trilemma.contract.likelihood): a one-draw figure that sits above the
importance-weighted one is a bound (≤), the K-draw figure an estimate (≈), and ``nll()`` is the one-draw
figure of the log density that the weights use. Checked on every registered family that offers
``dequantized_log_prob`` or declares an estimate, and on made-up families that show the check can fail."""
import math

import pytest
import torch

from trilemma.contract import likelihood as L
from trilemma.contract.family import Capabilities, GenerativeModel, build_config
from trilemma.contract.registry import registered
from trilemma.contract.testing import structured_batch
from trilemma.contract.update import plain_update
from trilemma.measure.nll import figure_kind

SHAPE = (1, 4, 4)  # 16 dims: the ODE families' exact traces stay cheap
IMAGES, DRAWS, TRAIN_STEPS = 4, 4, 3
FLOOR = 1e-7  # nats: a gap between figures beyond float round-off
CHECKED = [name for name, cls in registered().items()
           if cls.importance_weighted() or cls.capabilities.density == "estimate"]


def kind_problems(model: GenerativeModel, x: torch.Tensor, seed: int = 1) -> list[str]:
    """What is wrong with the kinds that ``model`` gives its NLL figures, measured on uint8 ``x``."""
    one_kind, protocol = figure_kind(model, 1)
    if not model.importance_weighted():
        one_draw = protocol.get("dequantization") and not protocol.get("importance_weighted")
        if model.capabilities.density == "estimate" and one_draw:
            return [f"{model.name}: declares an estimate, but its figure is one dequantization draw "
                    f"(a bound) and it offers no dequantized_log_prob to weigh draws with"]
        return []

    # DRAWS draws, importance-weighted by the harness; each draw's log density kept: (K, B) one-draw figures.
    seen = []

    def log_p(y):
        seen.append(model.dequantized_log_prob(y))
        return seen[-1]

    with torch.no_grad():
        weighted = L.importance_weighted_nll(log_p, x, DRAWS, torch.Generator().manual_seed(seed))  # (B,)
    one = torch.stack([L.discrete_nll_from_density(v.double(), model.num_dims) for v in seen])  # (K, B)
    problems = []

    # nll() is the first draw's one-draw figure: the global RNG seeded alike draws the same u (dequantize
    # draws first), so nll() may differ from it only by its own estimator's noise (Hutchinson, a roulette).
    torch.manual_seed(seed)
    with torch.no_grad():
        diff = model.nll(x).double() - one[0]  # (B,)
    tolerance = 4 * float(diff.std()) / math.sqrt(len(diff)) + 1e-5 * float(one.abs().mean())
    if abs(float(diff.mean())) > tolerance:
        problems.append(f"{model.name}: nll() is {float(diff.mean()):.3g} nats from the one-draw figure of "
                        f"dequantized_log_prob on the same u")

    # The one-draw figure sits above the weighted one on every image (Jensen, draw for draw): a bound.
    gap = one.mean(0) - weighted  # (B,)
    if bool((gap > FLOOR).all()) and one_kind != "bound":
        problems.append(f"{model.name}: its one-draw figure sits {float(gap.mean()):.3g} nats above its "
                        f"{DRAWS}-draw figure on every image, yet is marked {one_kind!r}, not 'bound'")
    weighted_kind, _ = figure_kind(model, DRAWS)
    if weighted_kind != "estimate":
        problems.append(f"{model.name}: its importance-weighted figure is marked {weighted_kind!r}, "
                        f"not 'estimate'")
    return problems


@pytest.mark.parametrize("name", CHECKED)
def test_every_dequantized_figure_is_marked_what_it_is(name):
    cls = registered()[name]
    torch.manual_seed(0)
    model = cls(build_config(cls, "tiny", {}), SHAPE)
    update = plain_update(model)
    for _ in range(TRAIN_STEPS):  # a density with some structure (an untrained score is zero)
        model.train_step(structured_batch(8, SHAPE), update)
    model.eval()
    assert kind_problems(model, structured_batch(IMAGES, SHAPE)) == []


# --- made-up families: the check has power ------------------------------------------------------------
def ramp(y):
    """log p(y) of the density 2u on each cell, u the position in it: not constant on a cell."""
    return torch.log(2 * (y * L.NUM_BINS).frac().clamp_min(1e-12)).flatten(1).sum(1)


def flat(y):
    """log p(y) = 0 on [0, 1)^D: constant on every cell, so one draw is already the exact -log P(x)."""
    return torch.zeros(y.shape[0], dtype=y.dtype)


class Dequantized(GenerativeModel):
    name = "made_up"
    paper = "none"
    family = "Flow"
    Config = dict
    log_density = staticmethod(ramp)

    def __init__(self):
        super().__init__({}, SHAPE)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def configure_optimizers(self):
        return {}

    def samplers(self):
        return {"one_pass": 1}

    def generate(self, n, sampler):
        return torch.zeros(n, *SHAPE)

    def nll(self, x):
        return L.discrete_nll_from_density(self.log_density(L.dequantize(x)), self.num_dims)

    def nll_protocol(self):
        return {"dequantization": "uniform", "dequantization_draws": 1}

    def dequantized_log_prob(self, y):
        return self.log_density(y)


class NoWeights(Dequantized):
    dequantized_log_prob = GenerativeModel.dequantized_log_prob


class FlatDensity(Dequantized):
    log_density = staticmethod(flat)


class WrongJacobian(Dequantized):
    """nll() forgets a data transform's log-determinant that dequantized_log_prob counts."""

    def nll(self, x):
        return super().nll(x) + self.num_dims * math.log(2)


def made_up(cls, density: str) -> Dequantized:
    """An instance of ``cls`` that declares ``density``."""
    return type(cls.__name__, (cls,), {"capabilities": Capabilities(density, False, "one_pass")})()


def test_the_check_fails_a_family_that_calls_a_one_draw_bound_an_estimate():
    x = torch.randint(0, 256, (IMAGES, *SHAPE), dtype=torch.uint8)
    (problem,) = kind_problems(made_up(Dequantized, "estimate"), x)
    assert "yet is marked 'estimate', not 'bound'" in problem
    (problem,) = kind_problems(made_up(NoWeights, "estimate"), x)
    assert "offers no dequantized_log_prob" in problem
    (problem,) = kind_problems(made_up(WrongJacobian, "exact"), x)
    assert "nll() is" in problem
    # Declared exact or bound, the harness marks the one-draw figure a bound: nothing wrong.
    for density in ("exact", "bound"):
        assert kind_problems(made_up(Dequantized, density), x) == []
    # A density constant on each cell: one draw is -log P(x) itself, and may be called an estimate.
    assert kind_problems(made_up(FlatDensity, "estimate"), x) == []
