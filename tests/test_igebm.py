"""IGEBM invariants: Langevin dynamics descends the energy, the replay buffer is checkpointed state
that training updates, the energy network is what the paper describes, the model is class-conditional
by default (as the literature figure's) with uniform classes in its samples, and the default sampler
is the paper's evaluation procedure (persistent chains in blocks, restarts and new classes, NFE)."""
import pytest
import torch
from torch.nn.utils import parametrize

from trilemma.contract.errors import TrilemmaError
from trilemma.contract.family import build_config
from trilemma.contract.testing import check_contract, structured_batch
from trilemma.contract.update import plain_update
from trilemma.models.igebm import IGEBM
from trilemma.models.parts.energy import ResBlock


def make(shape=(1, 28, 28), **overrides):
    torch.manual_seed(0)
    return IGEBM(build_config(IGEBM, "tiny", overrides), shape)


def classes(n):
    return torch.arange(n) % 10  # (n,) labels, as a labelled data set gives them


def trained(steps=2, **overrides):
    """A tiny model after a few updates, so its energy is shaped by data and not only by init."""
    model = make(**overrides)
    update = plain_update(model)
    x = structured_batch(8, (1, 28, 28))
    model.train()
    for _ in range(steps):
        model.train_step(x, update, labels=classes(8))
    return model.eval()


@pytest.mark.parametrize("shape", [(3, 8, 8), (1, 28, 28)])
def test_contract(shape):
    check_contract(IGEBM, shape)


def test_noiseless_langevin_step_lowers_the_energy():
    model = trained(step_size=5.0)
    torch.manual_seed(1)
    x, y = torch.rand(32, 1, 28, 28) * 2 - 1, classes(32)
    with torch.no_grad():
        before = model.energy(x, y)  # (32,)
        after = model.energy(model.langevin(x, steps=1, noise=False, labels=y), y)
    assert after.mean() < before.mean()
    assert (after < before).float().mean() > 0.9  # a small gradient step descends nearly every chain


def test_noisy_langevin_lowers_the_energy_on_average():
    model = trained()
    torch.manual_seed(2)
    x, y = torch.rand(128, 1, 28, 28) * 2 - 1, classes(128)
    with torch.no_grad():
        before = model.energy(x, y).mean()
        after = model.energy(model.langevin(x, steps=3, labels=y), y).mean()
    assert after < before


def test_langevin_leaves_parameter_gradients_alone_and_stays_in_range():
    model = make()
    x = torch.rand(8, 1, 28, 28) * 2 - 1
    out = model.langevin(x, steps=4, labels=classes(8))
    assert all(p.grad is None for p in model.parameters())
    assert not out.requires_grad and out.min() >= -1 and out.max() <= 1


def test_replay_buffer_is_checkpointed_and_updated_by_a_train_step():
    model = make()
    assert "replay" in model.state_dict()
    assert model.state_dict()["replay"].shape == (model.config.buffer_size, 1, 28, 28)
    before = model.replay.clone()
    update = plain_update(model)
    model.train()
    model.train_step(structured_batch(8, (1, 28, 28)), update, labels=classes(8))
    changed = (model.replay != before).flatten(1).any(1)  # (buffer_size,) rows rewritten
    assert 0 < changed.sum() <= 8  # at most one row per negative sample
    # A fresh model loading the checkpoint continues from the same chains.
    other = make()
    other.load_state_dict(model.state_dict())
    torch.testing.assert_close(other.replay, model.replay)


def test_restarts_draw_uniform_noise():
    # With every chain restarted and one Langevin step, the buffer receives (nearly) fresh uniform noise.
    model = make(restart_prob=1.0, langevin_steps=1, buffer_size=8)
    model.replay.zero_()
    update = plain_update(model)
    model.train_step(structured_batch(256, (1, 28, 28)), update, labels=classes(256))
    values = model.replay.flatten()
    assert (values != 0).float().mean() > 0.99
    assert values.min() >= -1 and values.max() <= 1 and values.std() > 0.5  # U[-1,1]: std 0.577


def test_the_noise_samplers_do_not_read_the_training_buffer():
    model = make(sample_steps=7, langevin_steps=3)
    assert model.samplers()["langevin"] == 7 and model.samplers()["replay_buffer"] == 3
    # The default and the "langevin" samplers start from noise: poisoning the buffer changes nothing.
    model.eval()
    for sampler in (None, "langevin"):
        torch.manual_seed(5)
        s1 = model.sample(4, sampler)
        model.replay.fill_(float("nan"))
        torch.manual_seed(5)
        torch.testing.assert_close(model.sample(4, sampler), s1)
    assert torch.isnan(model.sample(2, sampler="replay_buffer")).all()


@pytest.mark.parametrize("side,levels", [(16, 2), (28, 2), (32, 3), (64, 4)])
def test_one_downsampling_level_per_halving(side, levels):
    model = make(shape=(3, side, side))
    down = [m for m in model.modules() if isinstance(m, ResBlock) and m.downsample]
    assert len(down) == levels
    with torch.no_grad():
        assert model.energy(torch.zeros(2, 3, side, side), classes(2)).shape == (2,)


def test_every_layer_is_spectrally_normalised():
    model = make()
    layers = [m for m in model.energy.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert layers and all(parametrize.is_parametrized(m, "weight") for m in layers)
    # After enough power iterations (one per training-mode forward), each weight matrix has
    # largest singular value 1.
    model.train()
    with torch.no_grad():
        for _ in range(30):
            model.energy(torch.rand(2, 1, 28, 28), classes(2))
    model.eval()
    for m in layers:
        sigma = torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2)
        assert sigma == pytest.approx(1.0, rel=0.05)


# --- class conditioning --------------------------------------------------------------------------

def test_conditional_is_the_default_and_follows_the_config():
    assert IGEBM.capabilities.conditional and make().capabilities.conditional
    assert IGEBM.presets["cifar10_gpu"].get("conditional", True)  # the literature figure's variant
    plain = make(conditional=False)
    assert not plain.capabilities.conditional
    assert not any("bias1" in k for k in plain.state_dict())  # no per-class tables
    with pytest.raises(TrilemmaError, match="labels"):
        make().loss(structured_batch(4, (1, 28, 28)))


def test_the_energy_depends_on_the_class_after_training():
    model = make().eval()
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    with torch.no_grad():  # the per-class tables start neutral (biases 0, gains 1)
        torch.testing.assert_close(model.energy(x, torch.zeros(4, dtype=torch.long)),
                                   model.energy(x, torch.ones(4, dtype=torch.long)))
    model = trained(steps=3)
    with torch.no_grad():
        zeros = torch.zeros(4, dtype=torch.long)
        gap = model.energy(x, zeros) - model.energy(x, zeros + 1)
    assert gap.abs().max() > 1e-6


def test_negative_chains_run_under_the_batchs_classes():
    model = make()
    seen = []
    langevin = model.langevin
    model.langevin = lambda x, steps, **kw: seen.append(kw.get("labels")) or langevin(x, steps, **kw)
    labels = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    model.train()
    model.train_step(structured_batch(8, (1, 28, 28)), plain_update(model), labels=labels)
    assert len(seen) == 1 and torch.equal(seen[0], labels)


def test_samples_draw_their_classes_uniformly():
    model = make((1, 8, 8), eval_buffer=1000, eval_batch=500, eval_rounds=4, eval_steps=1,
                 sample_steps=1).eval()
    torch.manual_seed(6)
    _, persistent = model.persistent_langevin(4000)  # the default sampler's classes, new ones included
    first = []  # the "langevin" sampler's: those of its chain's first energy evaluation
    forward = model.energy.forward
    model.energy.forward = lambda x, labels=None: first.append(labels) or forward(x, labels)
    model.sample(4000, "langevin")
    for labels in (persistent, first[0]):
        counts = torch.bincount(labels, minlength=10).float()  # 400 expected, sd 19
        assert len(labels) == 4000 and counts.min() > 320 and counts.max() < 480


# --- the evaluation sampler ----------------------------------------------------------------------

def langevin_runs(model):
    """Record each Langevin run of a sampler: its start x, labels, steps, clip and result."""
    runs = []
    langevin = model.langevin

    def spy(x, steps, noise=True, labels=None, clip=None):
        out = langevin(x, steps, noise, labels, clip)
        runs.append({"x": x.clone(), "labels": labels, "steps": steps, "clip": clip, "out": out})
        return out
    model.langevin = spy
    return runs


def test_the_default_sampler_is_the_papers_evaluation_procedure():
    gpu = build_config(IGEBM, "cifar10_gpu", {})  # the official test_inception.py's defaults
    assert (gpu.eval_buffer, gpu.eval_batch, gpu.eval_rounds, gpu.eval_steps) == (1000, 512, 200, 20)
    assert (gpu.eval_restart_prob, gpu.eval_relabel_prob, gpu.eval_settle_rounds) == (0.01, 0.1, 10)
    assert IGEBM(gpu, (3, 32, 32)).samplers() == {"persistent_langevin": 2048, "langevin": 60,
                                                    "replay_buffer": 60}
    model = make(eval_buffer=8, eval_batch=4, eval_rounds=5, eval_steps=2, eval_restart_prob=0.0,
                 eval_relabel_prob=0.0, eval_settle_rounds=1).eval()
    name, nfe = next(iter(model.samplers().items()))
    assert (name, nfe) == ("persistent_langevin", 5 * 4 * 2 // 8)
    runs = langevin_runs(model)
    torch.manual_seed(7)
    samples = model.sample(8)
    assert len(runs) == 5 and all(r["steps"] == 2 and r["clip"] == model.config.eval_grad_clip_langevin
                                  for r in runs)
    # NFE is every Langevin step spent per image.
    assert sum(len(r["x"]) * r["steps"] for r in runs) / len(samples) == nfe
    # The first rounds start each chain from uniform noise (the block's buffer fills)...
    start = torch.cat([runs[0]["x"], runs[1]["x"]])  # (8, 1, 28, 28)
    assert start.min() >= -1 and start.max() <= 1 and 0.5 < float(start.std()) < 0.65
    # ...and the later ones continue chains (no restart here): each start is an earlier result.
    for i, run in enumerate(runs[2:], start=2):
        earlier = torch.cat([r["out"] for r in runs[:i]]).flatten(1)
        for row in run["x"].flatten(1):
            assert (earlier == row).all(1).any()
    # The samples are the block's chains as the rounds left them.
    outputs = torch.cat([r["out"] for r in runs]).flatten(1)
    assert all((outputs == row).all(1).any() for row in samples.flatten(1))


def test_evaluation_restarts_except_in_the_settling_rounds():
    model = make(eval_buffer=8, eval_batch=4, eval_rounds=5, eval_steps=1, eval_restart_prob=1.0,
                 eval_settle_rounds=2).eval()
    runs = langevin_runs(model)
    torch.manual_seed(8)
    model.sample(8)
    outputs = [r["out"].flatten(1) for r in runs]

    def continued(i):  # every start of round i is an earlier round's result
        earlier = torch.cat(outputs[:i])
        return all((earlier == row).all(1).any() for row in runs[i]["x"].flatten(1))
    assert not continued(2)  # a mixing round: every chain restarted from noise
    assert continued(3) and continued(4)  # the settling rounds continue their chains


def test_a_smaller_call_advances_the_same_fraction_of_its_chains():
    model = make(eval_buffer=8, eval_batch=4, eval_rounds=3, eval_steps=2).eval()
    runs = langevin_runs(model)
    model.sample(4)  # one block of 4 chains, 2 per round
    assert [len(r["x"]) for r in runs] == [2, 2, 2]
    runs.clear()
    model.sample(12)  # a block of 8, then one of 4
    assert [len(r["x"]) for r in runs] == [4, 4, 4, 2, 2, 2]
