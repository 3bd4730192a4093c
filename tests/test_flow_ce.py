"""Flow Contrastive Estimation: the flow part inverts exactly (both ways, after training steps), an EBM
equal to the flow leaves the classifier undecided (V = -2 log 2), the EBM's step raises V and the flow's
lowers it, and the reported NLL is the flow's."""
import math

import torch

from trilemma.contract.family import build_config
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
        latents = [e.double() for e in model.flow_latents(4)]
        again, _ = model.flow.encode(model.flow.decode(latents))
        for a, b in zip(again, latents):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-8)


def test_an_ebm_equal_to_the_flow_leaves_the_classifier_undecided():
    model, _, x = trained()
    model.ebm_log_prob = model.flow.log_prob  # p_theta = q_alpha: D = 1/2 everywhere
    y = (x.float() + torch.rand(x.shape)) / 256
    with torch.no_grad():
        y_flow = model.flow.decode(model.flow_latents(16))
        torch.testing.assert_close(model.value(y, y_flow), torch.tensor(-2 * math.log(2)))


def test_the_ebm_ascends_the_value_and_the_flow_descends_it():
    model, update, x = trained(steps=1, lr=1e-4)
    model.train()
    torch.manual_seed(1)
    y = (x.float() + torch.rand(x.shape)) / 256
    latents = model.flow_latents(16)
    with torch.no_grad():
        y_flow = model.flow.decode(latents)
    before = float(model.value(y, y_flow).detach())
    update("energy", -model.value(y, y_flow))
    after_ebm = float(model.value(y, y_flow).detach())
    assert after_ebm > before
    update("flow", model.value(y, model.flow.decode(latents)))
    with torch.no_grad():
        assert float(model.value(y, model.flow.decode(latents))) < after_ebm


def test_nll_is_the_flows_and_the_ebm_nll_is_finite():
    model, _, x = trained()
    with torch.no_grad():
        torch.manual_seed(2)
        nll = model.nll(x)
        torch.manual_seed(2)
        torch.testing.assert_close(nll, model.flow.nll(x))
        assert torch.isfinite(model.ebm_nll(x)).all()
