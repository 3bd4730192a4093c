"""Flow Contrastive Estimation: the flow part inverts exactly (both ways, after training steps), an EBM
equal to the flow leaves the classifier undecided (V = -2 log 2), the EBM's step raises V and the flow's
lowers it, and the reported NLL is the EBM's: its normaliser, estimated by importance sampling from the
flow, is the integral of exp(-E) over the flow's support (closed forms on a 2x2 image), an EBM equal to
its flow scores the flow's NLL, and the estimate is made once per set of weights."""
import copy
import math

import pytest
import torch
from torch import nn

from trilemma.contract.family import build_config
from trilemma.contract.likelihood import importance_weighted_nll
from trilemma.contract.testing import structured_batch
from trilemma.contract.update import plain_update
from trilemma.models.flow_ce import FlowCE

SHAPE = (1, 8, 8)


def trained(steps=2, **overrides):
    torch.manual_seed(0)
    model = FlowCE(build_config(FlowCE, "tiny", overrides), SHAPE)
    update = plain_update(model)
    x = structured_batch(16, SHAPE)
    for _ in range(steps):
        model.train_step(x, update)
    return model.eval(), update, x


def test_flow_part_inverts_exactly():
    model, _, x = trained()
    y = (x.double() + torch.rand(x.shape, dtype=torch.float64)) / 256
    model.double()
    with torch.no_grad():
        eps, _ = model.flow.encode(y)
        torch.testing.assert_close(model.flow.decode(eps), y, rtol=0, atol=1e-9)
        latents = [e.double() for e in model.flow.latents(4)]
        again, _ = model.flow.encode(model.flow.decode(latents))
        for a, b in zip(again, latents):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-8)


def test_an_ebm_equal_to_the_flow_leaves_the_classifier_undecided():
    model, _, x = trained()
    model.ebm_log_prob = model.flow.log_prob  # p_theta = q_alpha: D = 1/2 everywhere
    y = (x.float() + torch.rand(x.shape)) / 256
    with torch.no_grad():
        y_flow = model.flow.decode(model.flow.latents(16))
        torch.testing.assert_close(model.value(y, y_flow), torch.tensor(-2 * math.log(2)))


def test_the_ebm_ascends_the_value_and_the_flow_descends_it():
    model, update, x = trained(steps=1, lr=1e-4)
    model.train()
    torch.manual_seed(1)
    y = (x.float() + torch.rand(x.shape)) / 256
    latents = model.flow.latents(16)
    with torch.no_grad():
        y_flow = model.flow.decode(latents)
    before = float(model.value(y, y_flow).detach())
    update("energy", -model.value(y, y_flow))
    after_ebm = float(model.value(y, y_flow).detach())
    assert after_ebm > before
    update("flow", model.value(y, model.flow.decode(latents)))
    with torch.no_grad():
        assert float(model.value(y, model.flow.decode(latents))) < after_ebm


def test_the_capabilities_are_the_ebms():
    caps = FlowCE.capabilities
    assert caps.density == "estimate"  # log Z estimated: neither the flow's exact density nor a bound
    assert caps.free_form_jacobian  # the energy network is unconstrained
    assert caps.sampling == "one_pass"  # the paper's samples (and FID) are the flow's


class ReluEnergy(nn.Module):
    """E(x) = beta * sum relu(x): its normaliser over a box factorises into one-dimensional integrals."""

    def __init__(self, beta: float):
        super().__init__()
        self.beta = beta

    def forward(self, x):
        return self.beta * torch.relu(x).flatten(1).sum(1)


@pytest.mark.parametrize("beta", [0.0, 2.0])
def test_the_normaliser_integrates_exp_minus_e_over_the_flows_support(beta):
    # The EBM is p(y) = exp(-E(2y - 1)) / Z on the flow's support, the box (-a, 1 + a)^D of its logit
    # transform (a = 0.05 / 0.9): with u = 2y - 1, Z = prod over pixels of 1/2 int_{-b}^{b} exp(-beta
    # relu(u)) du, b = 1 + 2a. E = 0 is the uniform density on the box. (A tilt of the flow, q exp(-E),
    # would give log Z = 0 at beta = 0; the data's cube 0 too; the energy's sign flipped 3.8 at beta = 2.)
    torch.manual_seed(0)
    shape = (1, 2, 2)
    model = FlowCE(build_config(FlowCE, "tiny", {"ebm_nll_draws": 4096}), shape).eval()
    model.energy = ReluEnergy(beta)  # and c = 0, as built
    b = 1 + 2 * 0.05 / 0.9
    per_pixel = 0.5 * (b + ((1 - math.exp(-beta * b)) / beta if beta else b))
    exact = 4 * math.log(per_pixel)
    with torch.no_grad():
        z = model.log_normaliser()
        assert z["log_z"] == pytest.approx(exact, abs=0.2)  # the estimate's bias is low, ~0.1 here
        assert 0 < z["se"] < 0.2 and 1 < z["ess"] < 4096 and z["dropped"] == 0
        nll = model.nll(structured_batch(8, shape))
    if beta == 0:  # uniform on the box: -log P(x) = D log (256 b) for every image, with Z estimated
        torch.testing.assert_close(nll, torch.full((8,), z["log_z"] + 4 * math.log(256), dtype=nll.dtype))
        assert float(nll.mean()) == pytest.approx(4 * math.log(256 * b), abs=0.2)


def test_an_ebm_equal_to_its_flow_scores_the_flows_nll():
    model, _, x = trained()
    model.ebm_log_prob = model.flow.log_prob  # p~ = q: every importance weight is 1, Z = 1
    with torch.no_grad():
        z = model.log_normaliser()
        assert z["log_z"] == 0 and z["se"] == 0 and z["ess"] == pytest.approx(model.config.ebm_nll_draws)
        torch.manual_seed(2)
        nll = model.nll(x)
        torch.manual_seed(2)
        flow = importance_weighted_nll(model.flow.log_prob, x, model.config.nll_dequantization_draws)
    torch.testing.assert_close(nll, flow)


def test_the_normaliser_is_estimated_once_per_set_of_weights_and_recorded():
    model, update, x = trained()
    with torch.no_grad():
        first = model.log_normaliser()
        assert model.log_normaliser() is first  # every batch of one evaluation shares it
        nll = model.nll(x)
        protocol = model.nll_protocol()
    assert torch.isfinite(nll).all() and nll.shape == (len(x),)
    assert protocol["model"] == "ebm" and protocol["normaliser_draws"] == model.config.ebm_nll_draws
    assert protocol["log_normaliser"] == pytest.approx(float(model.log_norm.detach()) + first["log_z"])
    assert protocol["log_normaliser_se"] == first["se"] and math.isfinite(protocol["flow_bpd"])
    assert protocol["flow_bpd_images"] == len(x)

    def draws_again(m) -> bool:  # whether m's estimate draws from the flow (else it is the cached one)
        state = torch.get_rng_state()
        with torch.no_grad():
            m.log_normaliser()
        return not torch.equal(torch.get_rng_state(), state)

    assert not draws_again(model)
    assert draws_again(copy.deepcopy(model))  # an EMA's copy: its own estimate
    model.train()
    model.train_step(x, update)  # new weights: a new estimate
    assert draws_again(model.eval())
