"""VAEBM on a hierarchical VAE: the VAE has several latent groups, each feeding the sample; T pushes
standard-normal eps_x to the decoder's logistic; a Langevin step is the paper's, over every eps_z group
and eps_x, and the samples are T(eps) at the chain's end (eps_x included); the energy stage leaves the
VAE as it was; a run interrupted on either side of the stage boundary resumes to the same weights."""
import json

import pytest
import torch

from trilemma.contract.family import build_config
from trilemma.contract.testing import structured_batch
from trilemma.contract.update import plain_update
from trilemma.results.schema import CHECKPOINT_FILE, LOG_FILE
from trilemma.run.loop import train
from trilemma.run.settings import TrainConfig
from trilemma.models.vaebm import VAEBM

SHAPE = (1, 8, 8)


def make(shape=SHAPE, preset="tiny", **overrides):
    torch.manual_seed(0)
    return VAEBM(build_config(VAEBM, preset, overrides), shape)


def test_the_vae_has_several_latent_groups_and_each_moves_the_sample():
    assert make((1, 28, 28), "mnist").vae.latent_shapes() == [(8, 1, 1), (8, 7, 7), (8, 14, 14), (8, 28, 28)]
    model = make()
    eps_z, eps_x = model.prior_noise(4)
    assert len(eps_z) == model.vae.stochastic_layers == 3  # 1x1, 4x4, 8x8
    assert [tuple(e.shape[1:]) for e in eps_z] == model.vae.latent_shapes()
    for layer in model.vae.modules():  # priors away from N(0, I), so each group's mean and std matter
        if hasattr(layer, "prior"):
            torch.nn.init.normal_(layer.prior.convs[-1].weight, std=0.3)
    eps = [e.requires_grad_(True) for e in (*eps_z, eps_x)]
    _, mean = model.transform(eps[:-1], eps[-1])
    grads = torch.autograd.grad(mean.sum(), eps[:-1])
    assert all(g.abs().sum() > 0 for g in grads)


def test_the_transform_draws_the_decoders_logistic_from_normal_noise():
    model = make()
    conv = model.vae.output.conv  # channels: logit, mean, log-scale
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.copy_(torch.tensor([0.0, 0.2, -2.0]))
    eps_z, _ = model.prior_noise(1)
    eps_x = torch.randn(4096, *SHAPE)
    with torch.no_grad():
        x, mean = model.transform([e.expand(4096, -1, -1, -1) for e in eps_z], eps_x)
    t = (x - mean) / torch.exp(torch.tensor(-2.0))  # a standard logistic's draws (none clamped here)
    for point in (-3.0, -1.0, 0.0, 1.0, 3.0):  # its CDF is the sigmoid (a normal's would be Phi)
        assert float((t <= point).float().mean()) == pytest.approx(float(torch.sigmoid(torch.tensor(point))),
                                                                   abs=0.01)


def test_a_langevin_step_follows_the_joint_energy_over_every_group_and_eps_x():
    model = make(step_size=0.05).eval()  # eval: the energy's spectral norms hold still
    eps_z, eps_x = model.prior_noise(6)
    new_z, new_x = model.langevin(eps_z, eps_x, steps=1, noise=False)
    # The paper's step on U(eps) = E(T(eps)) + |eps|^2 / 2, by hand.
    eps = [e.clone().requires_grad_(True) for e in (*eps_z, eps_x)]
    x, _ = model.transform(eps[:-1], eps[-1])
    u = model.energy(x) + sum(0.5 * e.pow(2).flatten(1).sum(1) for e in eps)
    grads = torch.autograd.grad(u.sum(), eps)
    for before, after, g in zip((*eps_z, eps_x), (*new_z, new_x), grads):
        torch.testing.assert_close(after, before - 0.025 * g)
    # eps_x feels the energy through the decoder's draw, not only its prior's pull.
    assert (grads[-1] - eps_x).abs().max() > 1e-3
    # With noise, every group and eps_x move.
    moved_z, moved_x = model.langevin(eps_z, eps_x, steps=2)
    assert all(not torch.equal(a, b) for a, b in zip((*eps_z, eps_x), (*moved_z, moved_x)))


def test_samples_are_the_decoders_draw_at_the_chains_end():
    model = make(sample_steps=3).eval()
    torch.manual_seed(4)
    samples = model.sample(5)
    torch.manual_seed(4)
    eps_z, eps_x = model.langevin(*model.prior_noise(5), steps=3)
    with torch.no_grad():
        x, mean = model.transform(eps_z, eps_x)
        other, _ = model.transform(eps_z, -eps_x)
    torch.testing.assert_close(samples, x)  # T(eps), eps_x included: not the decoder mean
    assert not torch.allclose(samples, mean.clamp(-1, 1)) and not torch.allclose(samples, other)


def test_the_energy_stage_leaves_the_vae_as_it_was():
    model = make()
    update = plain_update(model)
    x = structured_batch(8, SHAPE)
    model.progress = 0.0  # a VAE step first, so its optimizer holds moments
    model.train_step(x, update)
    vae = {k: v.clone() for k, v in model.vae.state_dict().items()}
    energy = [p.detach().clone() for p in model.energy.parameters()]
    vae_moments = {k: v.clone() for k, v in update.optimizers["vae"].state_dict()["state"][0].items()}
    for progress in (0.5, 0.7, 0.9):  # the energy stage (tiny: vae_fraction 0.5)
        model.progress = progress
        logs = model.train_step(x, update)
        assert float(logs["stage"]) == 2 and "energy_loss" in logs and "vae_loss" not in logs
    assert all(torch.equal(v, model.vae.state_dict()[k]) for k, v in vae.items())
    assert not any(p.requires_grad for p in model.vae.parameters())  # frozen, as the paper's
    assert any(not torch.equal(a, b) for a, b in zip(energy, model.energy.parameters()))
    state = update.optimizers["vae"].state_dict()["state"][0]
    assert all(torch.equal(v, state[k]) for k, v in vae_moments.items())


def _run(folder, images, stop_after_steps=None):
    model = make(vae_fraction=0.5)
    cfg = TrainConfig(batch_size=8, max_images=48, ema_halflife_images=16, eval_points=0,
                      checkpoint_seconds=0, log_every_steps=1)
    _, state = train(model, images, cfg, folder, seed=0, evaluate=lambda m, final=False: {},
                     stop_after_steps=stop_after_steps)
    return model if state.finished else None  # None: stopped by the hook


@pytest.mark.parametrize("stop", [3, 4])  # the last VAE step, the first energy step
def test_a_run_resumes_exactly_across_the_stage_boundary(tmp_path, stop):
    images = structured_batch(32, SHAPE)
    reference = _run(tmp_path / "a", images)
    assert _run(tmp_path / "b", images, stop_after_steps=stop) is None
    saved = torch.load(tmp_path / "b" / CHECKPOINT_FILE, weights_only=False)
    assert int(saved["model"]["stage"]) == (1 if stop == 3 else 2)  # the checkpoint holds the stage
    resumed = _run(tmp_path / "b", images)
    expected = reference.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in resumed.state_dict().items())
    # Six steps of 8 of the 48 images: three of the VAE, then three of the energy, in both logs.
    for folder in ("a", "b"):
        lines = [json.loads(line) for line in (tmp_path / folder / LOG_FILE).read_text().splitlines()]
        assert [line["stage"] for line in lines if line["kind"] == "train"] == [1, 1, 1, 2, 2, 2]
