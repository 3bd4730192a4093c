"""StyleGAN2-ADA invariants: demodulation keeps unit variance; ADA's p follows the r_t heuristic."""
import torch
import torch.nn.functional as F

from trilemma.contract.family import build_config
from trilemma.contract.testing import structured_batch
from trilemma.contract.update import plain_update
from trilemma.models.stylegan2_ada import ModConv, StyleGAN2ADA, augment


def make(shape=(1, 28, 28), **overrides):
    torch.manual_seed(0)
    return StyleGAN2ADA(build_config(StyleGAN2ADA, "tiny", overrides), shape)


def test_demodulation_keeps_unit_output_variance():
    torch.manual_seed(0)
    conv = ModConv(16, 8, 3, w_dim=8)
    x = torch.randn(4, 16, 34, 34)  # unit-variance input
    w = 3 * torch.randn(4, 8)  # styles far from 1, different per image
    with torch.no_grad():
        y = conv(x, w)[:, :, 1:-1, 1:-1]  # away from the zero padding
        var = y.var(dim=(2, 3))  # (B, O)
        assert torch.allclose(var, torch.ones_like(var), atol=0.2), var
        conv.demodulate = False  # without demodulation the styles scale the variance
        raw = conv(x, w)[:, :, 1:-1, 1:-1].var(dim=(2, 3))
    assert (raw - 1).abs().max() > 0.5


def test_modulated_conv_equals_per_image_weights():
    # The non-fused form (scale inputs, shared conv, scale outputs) is the paper's per-image weights.
    torch.manual_seed(0)
    conv = ModConv(6, 5, 3, w_dim=4)
    x, w = torch.randn(3, 6, 9, 9), torch.randn(3, 4)
    with torch.no_grad():
        s = conv.affine(w)
        for i in range(3):
            weight = conv.weight * conv.gain * s[i].view(1, -1, 1, 1)  # (O, I, k, k)
            weight = weight / weight.square().sum(dim=(1, 2, 3), keepdim=True).add(1e-8).sqrt()
            ref = F.conv2d(x[i:i + 1], weight, padding=1)
            torch.testing.assert_close(conv(x, w)[i:i + 1], ref, rtol=1e-4, atol=1e-5)


def test_ada_p_rises_on_an_overfitting_discriminator_and_falls_on_a_fooled_one():
    model = make(ada_interval=2, ada_images=64)
    overfit, fooled = torch.full((8,), 3.0), torch.full((8,), -3.0)  # sign(D(real)): +1 / -1
    trace = []
    for _ in range(8):
        model.ada_update(overfit)
        trace.append(float(model.ada_p))
    assert trace[-1] > 0.9 and all(b >= a for a, b in zip(trace, trace[1:]))
    assert float(model.ada_rt) == 1.0
    for _ in range(8):
        model.ada_update(fooled)
    assert float(model.ada_p) < 0.1 and float(model.ada_rt) == -1.0
    # r_t = 0.75 (7 of 8 reals called real), above the target 0.6: p rises again.
    p = float(model.ada_p)
    model.ada_update(torch.tensor([1.0] * 7 + [-1.0]))
    model.ada_update(torch.tensor([1.0] * 7 + [-1.0]))
    assert float(model.ada_p) > p


def test_augmentations_are_identity_at_p0_differentiable_and_active_at_p1():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 16, 16, requires_grad=True)
    torch.testing.assert_close(augment(x, torch.tensor(0.0)), x, rtol=1e-4, atol=1e-4)
    y = augment(x, torch.tensor(1.0))
    assert (y - x).abs().mean() > 0.1
    (g,) = torch.autograd.grad(y.square().sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_train_step_logs_p_and_applies_r1_lazily():
    model = make(r1_interval=2)
    update = plain_update(model)
    x = structured_batch(8, (1, 28, 28))
    first, second = model.train_step(x, update), model.train_step(x, update)
    assert "ada_p" in first and "ada_rt" in first
    assert float(first["r1"]) > 0 and float(second["r1"]) == 0  # R1 on step 0, not on step 1


def test_truncation_psi_scales_w_towards_its_mean_in_the_sampler():
    seen = []

    def draw(psi):
        model = make(truncation_psi=psi)
        model.generator.w_avg.normal_(generator=torch.Generator().manual_seed(2))
        model.generator.synthesis = lambda w: (seen.append(w), torch.zeros(len(w), 1, 28, 28))[1]
        torch.manual_seed(1)
        with torch.no_grad():
            model.sample(5)
        return seen[-1] - model.generator.w_avg  # (5, W)

    full, truncated = draw(1.0), draw(0.25)
    torch.testing.assert_close(truncated, 0.25 * full)
    assert full.norm() > 0
