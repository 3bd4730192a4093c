"""OT decoder invariants: the Sinkhorn divergence is a sound distance between batches, and training
on it moves the generated batch towards the data."""
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from trilemma.contract.likelihood import to_signed
from trilemma.contract.family import build_config
from trilemma.contract.testing import check_contract, structured_batch
from trilemma.contract.update import plain_update
from trilemma.models.ot_decoder import OTDecoder


def make(shape=(1, 28, 28), **overrides):
    torch.manual_seed(0)
    return OTDecoder(build_config(OTDecoder, "tiny", overrides), shape)


@pytest.mark.parametrize("shape", [(3, 8, 8), (1, 28, 28)])
def test_contract(shape):
    check_contract(OTDecoder, shape)


def test_sinkhorn_of_a_batch_against_itself_is_zero():
    model = make()
    a = to_signed(structured_batch(32, (1, 28, 28), seed=0))
    b = to_signed(structured_batch(32, (1, 28, 28), seed=1))
    self_loss = model.ot_loss(a, a).item()
    cross = model.ot_loss(a, b).item()
    # Debiased: S(a, a) = 0 up to rounding, while two different batches are far apart.
    assert abs(self_loss) < 1e-3 * cross
    assert cross > 1.0
    # Symmetric in its two arguments (uniform weights, same solver on both sides).
    torch.testing.assert_close(model.ot_loss(b, a).item(), cross, rtol=1e-3, atol=0)


def test_sinkhorn_approaches_exact_squared_w2_for_small_blur():
    # Reference: the exact OT between two uniform clouds of equal size is an assignment problem,
    # solved by the Hungarian algorithm; cost |x - y|^2 / 2 as geomloss's p = 2.
    model = make(shape=(1, 8, 8), blur=0.01, scaling=0.95)
    a = to_signed(structured_batch(16, (1, 8, 8), seed=0)).double()
    b = to_signed(structured_batch(16, (1, 8, 8), seed=1)).double()
    cost = 0.5 * torch.cdist(a.flatten(1), b.flatten(1)) ** 2  # (16, 16)
    rows, cols = linear_sum_assignment(cost.numpy())
    exact = cost[rows, cols].mean().item()
    approx = model.ot_loss(a, b).item()
    assert approx == pytest.approx(exact, rel=0.05)


def test_translating_a_batch_costs_half_the_squared_shift():
    # OT between a cloud and its translate by t is |t|^2 / 2 (cost |x - y|^2 / 2), for any cloud.
    model = make(shape=(1, 8, 8), blur=0.01, scaling=0.95)
    a = to_signed(structured_batch(16, (1, 8, 8), seed=3)).double() * 0.5
    shift = torch.full_like(a[:1], 0.1)  # (1, 1, 8, 8): |t|^2 = 64 * 0.01
    assert model.ot_loss(a, a + shift).item() == pytest.approx(0.5 * 64 * 0.01, rel=0.05)


def test_training_lowers_the_loss_on_a_fixed_pair_of_batches():
    model = make(lr=1e-2)
    update = plain_update(model)
    x = structured_batch(16, (1, 28, 28), seed=0)
    torch.manual_seed(123)
    z = torch.randn(16, model.config.latent_dim)
    model.train()
    with torch.no_grad():
        before = model.sinkhorn_loss(x, z).item()
    for _ in range(10):
        torch.manual_seed(123)  # train_step draws the same z as above from the global RNG
        model.train_step(x, update)
    with torch.no_grad():
        after = model.sinkhorn_loss(x, z).item()
    assert after < 0.8 * before


@pytest.mark.parametrize("side,stages", [(16, 2), (28, 2), (32, 3), (64, 4)])
def test_decoder_grows_one_stage_per_doubling(side, stages):
    model = make(shape=(3, side, side))
    convs = [m for m in model.decoder.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert len(convs) == stages
    with torch.no_grad():
        model.eval()
        assert model.sample(2).shape == (2, 3, side, side)


def test_sampling_follows_the_global_rng_and_only_needs_the_decoder():
    model = make().eval()
    torch.manual_seed(7)
    s1 = model.sample(4)
    torch.manual_seed(7)
    s2 = model.sample(4)
    torch.testing.assert_close(s1, s2)
    assert not torch.equal(s1[0], s1[1])
    assert model.sampling_modules() == [model.decoder]
