"""VAEBM: Langevin chains in the VAE's noise space lower the joint energy U(eps) = E(T(eps)) + |eps|^2 / 2
(step by step without noise; on average with it, against a data-space energy), the stages follow the
budget (the VAE first, then only the energy, the VAE held fixed), and samples come from the chain."""
import torch
from torch import nn

from trilemma.contract.family import build_config
from trilemma.contract.testing import structured_batch
from trilemma.contract.update import plain_update
from trilemma.models.vaebm import VAEBM

SHAPE = (1, 8, 8)


def make(**overrides):
    torch.manual_seed(0)
    return VAEBM(build_config(VAEBM, "tiny", overrides), SHAPE)


class Quadratic(nn.Module):
    """E(x) = k |x - 0.5|^2: low energy at a grey image, far from what an untrained decoder gives."""

    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, x):
        return self.k * (x - 0.5).pow(2).flatten(1).sum(1)


def test_noiseless_chain_decreases_the_joint_energy_every_step():
    model = make(step_size=1e-3)
    eps = model.prior_noise(64)
    energies = []
    for _ in range(10):
        with torch.no_grad():
            energies.append(model.joint_energy(*eps))
        eps = model.langevin(*eps, steps=1, noise=False)
    energies = torch.stack(energies)  # (10, 64)
    assert (energies[1:] < energies[:-1]).all()


def test_langevin_chain_lowers_the_data_space_energy():
    model = make(step_size=0.02)
    model.energy = Quadratic(2.0)
    eps = model.prior_noise(256)
    with torch.no_grad():
        start = model.energy(model.transform(*eps)[0]).mean()
    eps = model.langevin(*eps, steps=40)  # with noise (pixels clamped at -1 or 1 feel no force from E)
    with torch.no_grad():
        end = model.energy(model.transform(*eps)[0]).mean()
    assert end < 0.5 * start


def test_stages_follow_the_budget():
    model = make()
    update = plain_update(model)
    x = structured_batch(16, SHAPE)

    def snapshot(module):
        return [p.detach().clone() for p in module.parameters()]

    model.progress = 0.1  # stage 1: the VAE trains, the energy does not
    vae, energy = snapshot(model.vae), snapshot(model.energy)
    logs = model.train_step(x, update)
    assert "vae_loss_bpd" in logs
    assert any(not torch.equal(a, b) for a, b in zip(vae, model.vae.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(energy, model.energy.parameters()))

    model.progress = 0.9  # stage 2: the energy trains, the VAE is fixed
    vae, energy = snapshot(model.vae), snapshot(model.energy)
    logs = model.train_step(x, update)
    assert set(logs) >= {"ebm_cd", "e_pos", "e_neg"} and all(torch.isfinite(v) for v in logs.values())
    assert all(torch.equal(a, b) for a, b in zip(vae, model.vae.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(energy, model.energy.parameters()))


def test_samples_are_the_chains_decoder_means():
    model = make(sample_steps=3, sample_mean=True)
    torch.manual_seed(4)
    s = model.sample(5)
    torch.manual_seed(4)
    eps = model.langevin(*model.prior_noise(5), steps=3)
    with torch.no_grad():
        torch.testing.assert_close(s, model.transform(*eps)[1].clamp(-1, 1))
