"""IGEBM invariants: Langevin dynamics descends the energy, the replay buffer is checkpointed state
that training updates, and the energy network is what the paper describes."""
import pytest
import torch
from torch.nn.utils import parametrize

from trilemma.contract.family import build_config
from trilemma.contract.testing import check_contract, structured_batch
from trilemma.contract.update import plain_update
from trilemma.models.igebm import IGEBM, ResBlock


def make(shape=(1, 28, 28), **overrides):
    torch.manual_seed(0)
    return IGEBM(build_config(IGEBM, "tiny", overrides), shape)


def trained(steps=2, **overrides):
    """A tiny model after a few updates, so its energy is shaped by data and not only by init."""
    model = make(**overrides)
    update = plain_update(model)
    x = structured_batch(8, (1, 28, 28))
    model.train()
    for _ in range(steps):
        model.train_step(x, update)
    return model.eval()


@pytest.mark.parametrize("shape", [(3, 8, 8), (1, 28, 28)])
def test_contract(shape):
    check_contract(IGEBM, shape)


def test_noiseless_langevin_step_lowers_the_energy():
    model = trained(step_size=5.0)
    torch.manual_seed(1)
    x = torch.rand(32, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        before = model.energy(x)  # (32,)
        after = model.energy(model.langevin(x, steps=1, noise=False))
    assert after.mean() < before.mean()
    assert (after < before).float().mean() > 0.9  # a small gradient step descends nearly every chain


def test_noisy_langevin_lowers_the_energy_on_average():
    model = trained()
    torch.manual_seed(2)
    x = torch.rand(128, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        before = model.energy(x).mean()
        after = model.energy(model.langevin(x, steps=3)).mean()
    assert after < before


def test_langevin_leaves_parameter_gradients_alone_and_stays_in_range():
    model = make()
    x = torch.rand(8, 1, 28, 28) * 2 - 1
    out = model.langevin(x, steps=4)
    assert all(p.grad is None for p in model.parameters())
    assert not out.requires_grad and out.min() >= -1 and out.max() <= 1


def test_replay_buffer_is_checkpointed_and_updated_by_a_train_step():
    model = make()
    assert "replay" in model.state_dict()
    assert model.state_dict()["replay"].shape == (model.config.buffer_size, 1, 28, 28)
    before = model.replay.clone()
    update = plain_update(model)
    model.train()
    model.train_step(structured_batch(8, (1, 28, 28)), update)
    changed = (model.replay != before).flatten(1).any(1)  # (buffer_size,) rows rewritten
    assert 0 < changed.sum() <= 8  # at most one row per negative sample
    # A fresh model loading the checkpoint continues from the same chains.
    other = make()
    other.load_state_dict(model.state_dict())
    torch.testing.assert_close(other.replay, model.replay)


def test_restarts_draw_uniform_noise():
    # With every chain restarted and no Langevin step, the buffer receives fresh uniform noise.
    model = make(restart_prob=1.0, langevin_steps=0, buffer_size=8)
    model.replay.zero_()
    update = plain_update(model)
    model.train_step(structured_batch(256, (1, 28, 28)), update)
    values = model.replay.flatten()
    assert (values != 0).float().mean() > 0.99
    assert values.min() >= -1 and values.max() <= 1 and values.std() > 0.5  # U[-1,1]: std 0.577


def test_default_sampler_starts_from_noise_with_configured_steps():
    model = make(sample_steps=7, langevin_steps=3)
    assert list(model.samplers().items())[0] == ("langevin", 7)
    # The default sampler does not read the replay buffer: poisoning it changes nothing.
    model.eval()
    torch.manual_seed(5)
    s1 = model.sample(4)
    model.replay.fill_(float("nan"))
    torch.manual_seed(5)
    s2 = model.sample(4)
    torch.testing.assert_close(s1, s2)
    assert torch.isnan(model.sample(2, sampler="replay_buffer")).all()


@pytest.mark.parametrize("side,levels", [(16, 2), (28, 2), (32, 3), (64, 4)])
def test_one_downsampling_level_per_halving(side, levels):
    model = make(shape=(3, side, side))
    down = [m for m in model.modules() if isinstance(m, ResBlock) and m.downsample]
    assert len(down) == levels
    with torch.no_grad():
        assert model.energy(torch.zeros(2, 3, side, side)).shape == (2,)


def test_every_layer_is_spectrally_normalised():
    model = make()
    layers = [m for m in model.energy.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert layers and all(parametrize.is_parametrized(m, "weight") for m in layers)
    # After enough power iterations (one per training-mode forward), each weight matrix has
    # largest singular value 1.
    model.train()
    with torch.no_grad():
        for _ in range(30):
            model.energy(torch.rand(2, 1, 28, 28))
    model.eval()
    for m in layers:
        sigma = torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2)
        assert sigma == pytest.approx(1.0, rel=0.05)
