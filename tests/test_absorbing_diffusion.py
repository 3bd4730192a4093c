"""Absorbing diffusion's invariants: the masking process, its prior, the parallel sampler, the bound."""
import torch
from torch import nn

from trilemma.contract.family import build_config
from trilemma.contract.likelihood import discretized_logistic_nll
from trilemma.contract.testing import structured_batch
from trilemma.contract.update import plain_update
from trilemma.models.absorbing_diffusion import AbsorbingDiffusion


def make(shape=(1, 28, 28), **overrides) -> AbsorbingDiffusion:
    torch.manual_seed(0)
    return AbsorbingDiffusion(build_config(AbsorbingDiffusion, "tiny", overrides), shape)


class FixedLogits(nn.Module):
    """A denoiser that ignores its input: the same categorical at each position, whatever is masked."""

    def __init__(self, positions: int, num_codes: int):
        super().__init__()
        self.logits = nn.Parameter(torch.randn(1, positions, num_codes))

    def forward(self, z):
        return self.logits.expand(z.shape[0], -1, -1)


def test_masks_the_expected_fraction_at_t_and_keeps_the_rest():
    model = make(timesteps=8)  # 7x7 codes
    z0 = torch.randint(0, model.config.num_codes, (400, 49))
    for step in (1, 3, 8):
        t = torch.full((400,), step)
        zt, mask = model.q_sample(z0, t)
        assert torch.equal(zt[mask], torch.full_like(zt[mask], model.mask_id))
        assert torch.equal(zt[~mask], z0[~mask])  # unmasked codes are untouched
        # 19600 Bernoulli(t/T) draws: the fraction is within ~4 standard errors of t/T.
        p = step / 8
        assert abs(mask.float().mean().item() - p) <= 4 * (p * (1 - p) / mask.numel()) ** 0.5 + 1e-9


def test_a_fully_masked_grid_is_the_prior_and_the_samplers_start_there():
    model = make(timesteps=8).eval()
    z0 = torch.randint(0, model.config.num_codes, (16, 49))
    zt, mask = model.q_sample(z0, torch.full((16,), 8))
    assert mask.all() and (zt == model.mask_id).all()  # q(z_T | z_0) is one point, whatever z_0
    inputs = []
    model.denoiser.register_forward_hook(lambda m, args, out: inputs.append(args[0].clone()))
    with torch.no_grad():
        model.sample(3, "parallel")
    assert (inputs[0] == model.mask_id).all()


def test_sampler_unmasks_in_nfe_steps_and_never_changes_a_revealed_code():
    model = make(timesteps=8, sample_steps=3).eval()
    assert model.samplers() == {"parallel": 3, "ancestral": 8}
    for sampler, steps in model.samplers().items():
        inputs = []
        hook = model.denoiser.register_forward_hook(lambda m, args, out: inputs.append(args[0].clone()))
        with torch.no_grad():
            z = model.sample_codes(64, steps)
        hook.remove()
        assert len(inputs) == steps, f"{sampler}: {len(inputs)} network evaluations, not {steps}"
        assert (z < model.mask_id).all(), "codes still masked after the last step"
        for before, after in zip(inputs + [z], (inputs + [z])[1:]):
            revealed = before != model.mask_id
            assert torch.equal(after[revealed], before[revealed]), "a revealed code changed"
        # Several codes a step on average: no step of the 3-step sampler is left empty for all samples.
        masked = [int((i == model.mask_id).sum()) for i in inputs + [z]]
        assert all(a > b for a, b in zip(masked, masked[1:]))


def test_bound_is_exact_for_a_denoiser_that_ignores_context():
    # With p(z_0^i | z_t) independent of z_t, the reverse chain draws each code once from its own
    # categorical: -log p(z_0) = sum_i CE_i exactly, and the ELBO sum_t (1/t) E[sum_masked CE] equals it
    # in expectation (E[#masked at t] = L t/T). A wrong weight of the terms (e.g. the training loss's
    # (T - t + 1)/T) would miss it by a large factor.
    model = make(timesteps=8)
    model.denoiser = FixedLogits(49, model.config.num_codes)
    z0 = torch.randint(0, model.config.num_codes, (1, 49)).expand(4000, -1)
    exact = nn.functional.cross_entropy(model.denoiser.logits[0], z0[0], reduction="sum")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for k in (8, 2):  # every t, and two strata (unbiased too)
            bound = model.prior_bound(z0, k=k, generator=g)
            assert abs(bound.mean() / exact - 1) < 0.03, (k, float(bound.mean()), float(exact))


def test_loss_touches_only_the_masked_codes():
    model = make(timesteps=8)
    model.denoiser = FixedLogits(49, model.config.num_codes)
    z0 = torch.randint(0, model.config.num_codes, (1, 49))
    zt, mask = model.q_sample(z0, torch.full((1,), 4))
    assert 0 < mask.sum() < 49
    model.masked_nll(z0, zt, mask).sum().backward()
    grad = model.denoiser.logits.grad[0].abs().sum(1)  # (49,)
    assert (grad[~mask[0]] == 0).all() and (grad[mask[0]] > 0).all()


def test_budget_is_split_between_the_autoencoder_and_the_prior():
    model = make((1, 16, 16), vq_fraction=0.4)
    update = plain_update(model)
    x = structured_batch(8, (1, 16, 16))

    def snapshot(module):
        return [p.detach().clone() for p in module.parameters()]

    def changed(before, module):
        return any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))

    for progress, trains_vq in ((0.0, True), (0.39, True), (0.4, False), (0.9, False)):
        model.progress = progress
        vq, prior = snapshot(model.vq), snapshot(model.denoiser)
        losses = model.train_step(x, update)
        assert changed(vq, model.vq) == trains_vq and changed(prior, model.denoiser) != trains_vq
        assert ("recon_nats_per_dim" in losses) == trains_vq


def test_nll_adds_the_decoder_term_to_the_prior_bound():
    model = make().eval()
    x = structured_batch(4, (1, 28, 28))
    with torch.no_grad():
        torch.manual_seed(1)
        total = model.nll(x)
        _, codes = model.vq.encode(x)
        mean, log_scale = model.vq.decode(model.vq.embed_codes(codes))
        decoder = discretized_logistic_nll(x, mean, log_scale)
        torch.manual_seed(1)
        prior = model.prior_bound(codes.flatten(1))
    assert torch.allclose(total, decoder + prior)
    assert (prior > 0).all() and model.nll_protocol()["timesteps"] == model.config.timesteps
