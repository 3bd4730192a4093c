"""StyleGAN2-ADA invariants: demodulation keeps unit variance; ADA's p follows the r_t heuristic; the
class label conditions both networks as in the authors' code (the default, as the paper's CIFAR-10
figure is conditional), samples draw their classes uniformly, and an unconditional option still trains."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trilemma.cli import main
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
    labels = torch.arange(8) % model.config.num_classes
    first, second = model.train_step(x, update, labels=labels), model.train_step(x, update, labels=labels)
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


def trained(shape=(1, 28, 28), **overrides):
    model = make(shape, **overrides)
    update = plain_update(model)
    x = structured_batch(8, shape)
    for _ in range(2):
        model.train_step(x, update, labels=torch.arange(8) % model.config.num_classes)
    return model.eval()


def test_the_default_is_class_conditional_and_each_instance_says_which_it_is():
    assert all(build_config(StyleGAN2ADA, preset, {}).conditional for preset in StyleGAN2ADA.presets)
    assert make().capabilities.conditional
    plain = make(conditional=False)
    assert not plain.capabilities.conditional and StyleGAN2ADA.capabilities.conditional
    assert StyleGAN2ADA.capabilities_for(plain.config) == plain.capabilities
    assert plain.generator.mapping.embed is None and plain.discriminator.mapping is None


def test_a_class_label_changes_a_sample_and_only_its_own():
    model = trained()
    z = torch.randn(4, model.config.latent_dim)

    def images(y):
        torch.manual_seed(3)  # the same noise inputs for both
        with torch.no_grad():
            return model.generator.synthesis(model.generator.map(z, torch.tensor(y)))

    base, other = images([0, 1, 2, 3]), images([5, 1, 2, 3])  # only the first label differs
    assert (base[0] - other[0]).abs().max() > 1e-3
    torch.testing.assert_close(base[1:], other[1:])
    torch.testing.assert_close(images([0, 1, 2, 3]), base)


def test_the_label_embedding_enters_the_mapping_normalised():
    # The authors' code normalises the label's embedding to unit second moment before the concatenation.
    model = trained()
    z, y = torch.randn(4, model.config.latent_dim), torch.tensor([0, 1, 2, 3])
    embed = model.generator.mapping.embed
    with torch.no_grad():
        w = model.generator.map(z, y)
        embed.weight.mul_(7.0), embed.bias.mul_(7.0)  # the embedding 7x larger
        torch.testing.assert_close(model.generator.map(z, y), w)
    assert model.generator.mapping.layers[0].weight.shape[1] == 2 * model.config.latent_dim  # [z, embedding]


def test_the_discriminator_projects_onto_the_label():
    model = trained()
    x = structured_batch(4, (1, 28, 28)).float() / 127.5 - 1
    with torch.no_grad():
        a = model.discriminator(x, torch.tensor([0, 1, 2, 3]))
        b = model.discriminator(x, torch.tensor([5, 1, 2, 3]))  # only the first label differs
    assert (a[0] - b[0]).abs() > 1e-4
    torch.testing.assert_close(a[1:], b[1:])  # the label enters after the minibatch statistics


def test_samples_draw_their_classes_uniformly():
    model = make().eval()
    seen = []
    model.generator.mapping.register_forward_pre_hook(lambda module, args: seen.append(args[1]))
    torch.manual_seed(0)
    with torch.no_grad():
        model.sample(1000)
    counts = torch.bincount(torch.cat(seen), minlength=model.config.num_classes)
    assert counts.sum() == 1000 and counts.min() > 60 and counts.max() < 140, counts  # 100 expected


def test_a_conditional_step_needs_labels_and_an_unconditional_one_trains_without():
    model = make()
    with pytest.raises(ValueError, match="labels"):
        model.train_step(structured_batch(8, (1, 28, 28)), plain_update(model))
    model = make(conditional=False)
    update = plain_update(model)
    before = [p.detach().clone() for p in model.generator.parameters()]
    losses = model.train_step(structured_batch(8, (1, 28, 28)), update)
    assert all(torch.isfinite(v) for v in losses.values())
    assert any((a - p).abs().max() > 0 for a, p in zip(before, model.generator.parameters()))
    with torch.no_grad():
        samples = model.eval().sample(4)
    assert samples.shape == (4, 1, 28, 28) and torch.isfinite(samples).all()


SUITE = """name: cond
preset: tiny
models: [{{name: stylegan2_ada, config: {config}}}]
datasets: [{data}]
train: {{batch_size: 8, max_images: 16, warmup_steps: 0, eval_points: 1}}
eval: {{fid: false, curve_fid_samples: 0, sample_batch: 4, sample_repeats: 1, grid_images: 4}}
"""


def run_suite(tmp_path, capsys, config: str, data: str):
    suite = tmp_path / "suite.yaml"
    suite.write_text(SUITE.format(config=config, data=data))
    code = main(["run", str(suite), "--results", str(tmp_path / "results")])
    return code, capsys.readouterr().err.strip().splitlines()


def test_unlabeled_data_needs_the_unconditional_option_and_the_result_records_the_variant(tmp_path, capsys):
    images = np.random.default_rng(0).integers(0, 256, (32, 8, 8, 1), dtype=np.uint8)
    (tmp_path / "unlabeled").mkdir()
    for split in ("train", "test"):
        np.savez(tmp_path / "unlabeled" / f"{split}.npz", images=images)  # no labels
    unlabeled = f"{{name: npz, path: {tmp_path / 'unlabeled'}}}"
    code, err = run_suite(tmp_path, capsys, "{}", unlabeled)
    assert code == 2 and len(err) == 1 and "class-conditional" in err[0] and "no labels" in err[0], err
    assert run_suite(tmp_path, capsys, "{conditional: false}", unlabeled)[0] == 0
    labeled = "{name: synthetic, synthetic_size: 8, synthetic_train: 32, synthetic_test: 8}"
    assert run_suite(tmp_path, capsys, "{}", labeled)[0] == 0
    recorded = {path.parent.parent.name + "/" + path.parent.name:
                json.loads(path.read_text())["model"]["capabilities"]["conditional"]
                for path in (tmp_path / "results").rglob("result.json")}
    assert recorded == {"cond/stylegan2_ada-unlabeled-s0": False,
                        "cond/stylegan2_ada-synthetic-s0": True}, recorded
