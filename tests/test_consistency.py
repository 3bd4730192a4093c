"""Consistency training's own invariants: the boundary condition by construction, iCT's curriculum and
index distribution, the loss's structure (same noise, lower level as target, pseudo-Huber, weighting),
and the samplers' NFE."""
import math

import pytest
import torch

from trilemma.contract.family import build_config
from trilemma.models.consistency import Consistency


def make(shape=(1, 4, 4), **overrides) -> Consistency:
    torch.manual_seed(0)
    return Consistency(build_config(Consistency, "tiny", overrides), shape)


def perturbed(model: Consistency) -> Consistency:
    with torch.no_grad():  # the output convolution starts at zero: give the network an output
        for p in model.net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("sigma_min", [0.002, 0.05])
def test_boundary_condition_holds_by_construction(sigma_min):
    m = perturbed(make(sigma_min=sigma_min))
    x = torch.randn(6, 1, 4, 4) * 3
    with torch.no_grad():
        at_min = m.consistency_fn(x, torch.full((6,), sigma_min))
        above = m.consistency_fn(x, torch.full((6,), 1.0))
    assert torch.equal(at_min, x)  # exactly, whatever the network computes
    assert (above - x).abs().max() > 0.1  # (and the network does compute something)


def test_curriculum_doubles_the_steps_from_s0_to_s1():
    m = make()  # s0 = 10, s1 = 1280: log2(128) + 1 = 8 stages of the budget
    steps = [m.discretisation_steps(k / 800) for k in range(800)]
    assert steps[0] == 11 and steps[-1] == 1281
    for stage in range(8):  # N(k) = min(s0 2^floor(k / K'), s1) + 1 with K' = K / 8
        assert set(steps[stage * 100:(stage + 1) * 100]) == {10 * 2 ** stage + 1}


def test_sigmas_and_index_distribution_are_icts():
    m = make()
    s = m.sigmas(11)
    assert s[0].item() == pytest.approx(0.002) and s[-1].item() == pytest.approx(80.0)
    assert (s[1:] > s[:-1]).all()
    p = m.index_probabilities(s)
    normal = torch.distributions.Normal(torch.tensor(-1.1, dtype=torch.float64),
                                        torch.tensor(2.0, dtype=torch.float64))
    want = normal.cdf(s[1:].log()) - normal.cdf(s[:-1].log())  # log-normal mass between adjacent levels
    torch.testing.assert_close(p, want / want.sum())


def test_loss_compares_adjacent_levels_on_one_noise():
    """Replayed: the online f at s_{i+1}, the target f at s_i, the same z, pseudo-Huber with
    c = 0.00054 sqrt(D), weighted by 1 / (s_{i+1} - s_i)."""
    m = perturbed(make()).train()
    m.progress = 0.3
    y = torch.rand(8, 1, 4, 4) * 2 - 1
    torch.manual_seed(4)
    with torch.no_grad():
        loss, n = m.consistency_loss(y)
    torch.manual_seed(4)
    sigmas = m.sigmas(n)
    i = torch.multinomial(m.index_probabilities(sigmas).float(), 8, replacement=True)
    lo, hi = sigmas[i].float(), sigmas[i + 1].float()
    z = torch.randn_like(y)
    with torch.no_grad():
        target = m.consistency_fn(y + lo[:, None, None, None] * z, lo)
        online = m.consistency_fn(y + hi[:, None, None, None] * z, hi)
    c = 0.00054 * math.sqrt(16)
    want = ((((online - target) ** 2).flatten(1).sum(1) + c ** 2).sqrt() - c) / (hi - lo)
    assert n == 41  # progress 0.3 is stage 2: 10 * 4 + 1
    torch.testing.assert_close(loss, want.mean())


def test_samplers_make_one_and_two_network_evaluations():
    m = perturbed(make())
    calls = []
    m.net.register_forward_hook(lambda *_: calls.append(1))
    for name, nfe in m.samplers().items():
        calls.clear()
        with torch.no_grad():
            x = m.sample(3, name)
        assert len(calls) == nfe and x.shape == (3, 1, 4, 4)
    assert m.samplers() == {"one_step": 1, "two_step": 2}

