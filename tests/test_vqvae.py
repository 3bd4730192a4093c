"""VQ-VAE invariants: codebook usage, the straight-through gradient, a causal prior, the NLL bound."""
import pytest
import torch

from trilemma.contract.family import build_config
from trilemma.contract.testing import structured_batch
from trilemma.contract.update import plain_update
from trilemma.models.vqvae import VQVAE


def make(shape=(1, 28, 28), **overrides):
    torch.manual_seed(0)
    return VQVAE(build_config(VQVAE, "tiny", overrides), shape)


def test_several_codes_in_use_after_training():
    model = make()
    update = plain_update(model)
    x = structured_batch(16, (1, 28, 28))
    for _ in range(5):
        losses = model.train_step(x, update)
    _, codes = model.encode(x)
    assert codes.unique().numel() > 1, "codebook collapsed to a single code"
    assert losses["codes_used"] > 1


def test_reconstruction_gradient_passes_straight_through_the_quantizer():
    model = make()
    model.codebook_ready.fill_(True)  # skip the data-dependent init; random codebook is fine here
    x = structured_batch(8, (1, 28, 28))
    recon, _, _, _ = model.ae_losses(x)
    recon.backward()  # the reconstruction term alone: no commitment loss to carry gradient
    grads = [p.grad for p in model.encoder.parameters()]
    assert all(g is not None for g in grads), "the reconstruction loss did not reach the encoder"
    assert sum(g.abs().sum() for g in grads) > 0
    # The codebook gets no gradient from the reconstruction term (its value is copied, not used).
    assert model.codebook.weight.grad is None or model.codebook.weight.grad.abs().sum() == 0


def test_prior_is_causal_in_raster_order_and_has_no_blind_spot():
    # A 4x4 latent grid (16x16 images) and 4 gated layers: the receptive field covers the whole past.
    model = make((1, 16, 16), prior_layers=4, prior_channels=8)
    prior = model.prior
    h, w = model.latent_hw
    assert (h, w) == (4, 4)
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, model.config.num_codes, (1, h, w), generator=g)
    with torch.no_grad():
        base = prior(codes)  # (1, K, h, w)
        for pos in range(h * w):
            i, j = divmod(pos, w)
            changed_from = []  # positions whose change moves the logits at (i, j)
            for other in range(h * w):
                perturbed = codes.clone()
                oi, oj = divmod(other, w)
                perturbed[0, oi, oj] = (perturbed[0, oi, oj] + 1) % model.config.num_codes
                if not torch.allclose(prior(perturbed)[0, :, i, j], base[0, :, i, j]):
                    changed_from.append(other)
            # Only strictly earlier positions, and every one of them (no blind spot).
            assert changed_from == list(range(pos)), f"position {(i, j)} depends on {changed_from}"


def test_sampler_counts_prior_positions_plus_decoder():
    model = make()
    assert model.samplers() == {"ancestral": 7 * 7 + 1}


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 16, 16)])
def test_latent_grid_is_a_quarter_of_the_image(shape):
    model = make(shape)
    x = structured_batch(2, shape)
    z_e, codes = model.encode(x)
    assert codes.shape == (2, shape[1] // 4, shape[2] // 4)
    mean, log_scale = model.decode(model.embed_codes(codes))
    assert mean.shape == log_scale.shape == (2, *shape)


def test_nll_is_reconstruction_plus_prior_code_cost():
    model = make()
    model.eval()
    x = structured_batch(4, (1, 28, 28))
    with torch.no_grad():
        nll = model.nll(x)
        _, codes = model.encode(x)
        prior = model.prior_nll(codes)
    # The prior term is a proper code likelihood: positive, and below log K per position when the
    # untrained prior is near uniform (the paper's "KL = log K" for a uniform prior).
    assert (prior > 0).all() and (nll > prior).all()
    log_k = torch.log(torch.tensor(float(model.config.num_codes)))
    assert torch.allclose(prior, torch.full_like(prior, 49 * log_k), rtol=0.2)
