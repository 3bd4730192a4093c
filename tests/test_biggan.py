"""BigGAN invariants: the class label conditions both networks (the default, as the paper's figure is
conditional; an unconditional option still trains); truncated latents respect the threshold."""
import json

import numpy as np
import pytest
import torch

from trilemma.cli import main
from trilemma.contract.family import build_config
from trilemma.contract.testing import structured_batch
from trilemma.contract.update import plain_update
from trilemma.models.biggan import BigGAN, off_diagonal_gram
from trilemma.models.blocks import random_labels


def make(shape=(1, 28, 28), **overrides):
    torch.manual_seed(0)
    return BigGAN(build_config(BigGAN, "tiny", overrides), shape)


def trained(shape=(1, 28, 28), **overrides):
    model = make(shape, **overrides)
    update = plain_update(model)
    x = structured_batch(8, shape)
    for _ in range(2):
        model.train_step(x, update, labels=torch.arange(8) % model.config.num_classes)
    return model.eval()


def test_a_class_label_changes_a_sample_and_only_its_own():
    model = trained()
    z = model.latents(4)
    y = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        base = model.generator(z, y)
        other = model.generator(z, torch.tensor([5, 1, 2, 3]))  # only the first label differs
    assert (base[0] - other[0]).abs().max() > 1e-3
    torch.testing.assert_close(base[1:], other[1:])  # eval-mode batch norm: images are independent


def test_the_discriminator_projects_the_label():
    model = trained()
    x = structured_batch(4, (1, 28, 28)).float() / 127.5 - 1
    with torch.no_grad():
        a = model.discriminator(x, torch.zeros(4, dtype=torch.long))
        b = model.discriminator(x, torch.ones(4, dtype=torch.long))
    assert (a - b).abs().min() > 1e-4


def test_truncated_latents_lie_within_the_threshold():
    model = make(truncation=0.4)
    torch.manual_seed(0)
    z = model.latents(2000, model.config.truncation)  # (2000, Z)
    assert z.abs().max() <= 0.4
    assert (z.abs() > 0.399).float().mean() < 0.01  # drawn inside, not clipped to the edge
    assert 0.2 < z.std() < 0.25  # a normal truncated at 0.4 sigma has std ~0.227
    assert model.latents(2000).abs().max() > 2  # the default sampler is not truncated


def test_samplers_draw_classes_uniformly():
    model = make()
    labels = []
    model.generator.forward = lambda z, y: (labels.append(y), torch.zeros(len(y), 1, 28, 28))[1]
    torch.manual_seed(0)
    model.sample(5000, "truncated")
    counts = torch.bincount(labels[-1], minlength=model.config.num_classes).float()
    assert counts.min() > 400 and counts.max() < 600  # 500 expected per class


def test_ortho_penalty_is_zero_for_orthogonal_filters_of_any_norm():
    torch.manual_seed(0)
    q = torch.linalg.qr(torch.randn(27, 27))[0][:8]  # 8 orthonormal rows of length 27
    filters = (q * torch.linspace(0.5, 3, 8)[:, None]).view(8, 3, 3, 3)  # (out, in, k, k)
    assert off_diagonal_gram(filters) < 1e-8
    filters[1] += 0.1 * filters[0]  # two filters now overlap
    assert off_diagonal_gram(filters) > 1e-3
    # The model's penalty is the sum over the generator's weights, the shared embedding excepted.
    model = make()
    expected = sum(float(off_diagonal_gram(p.detach())) for n, p in model.generator.named_parameters()
                   if p.ndim >= 2 and n != "shared.weight")
    assert abs(float(model.ortho_penalty().detach()) - expected) < 1e-4 * expected


def test_train_step_needs_labels():
    model = make()
    with pytest.raises(ValueError, match="labels"):
        model.train_step(structured_batch(8, (1, 28, 28)), plain_update(model))


def test_the_default_is_class_conditional_and_each_instance_says_which_it_is():
    assert all(build_config(BigGAN, preset, {}).conditional for preset in BigGAN.presets)
    assert make().capabilities.conditional
    plain = make(conditional=False)
    assert not plain.capabilities.conditional and BigGAN.capabilities.conditional  # the class: the default
    assert BigGAN.capabilities_for(plain.config) == plain.capabilities
    assert plain.generator.shared is None and plain.discriminator.embed is None


def test_an_unconditional_biggan_trains_and_samples_without_labels():
    model = make(conditional=False)
    update = plain_update(model)
    before = [p.detach().clone() for p in model.generator.parameters()]
    losses = model.train_step(structured_batch(8, (1, 28, 28)), update)
    assert all(torch.isfinite(v) for v in losses.values())
    assert any((a - p).abs().max() > 0 for a, p in zip(before, model.generator.parameters()))
    assert random_labels(4, model.config, model.device) is None
    with torch.no_grad():
        samples = model.eval().sample(4)
    assert samples.shape == (4, 1, 28, 28) and torch.isfinite(samples).all()


SUITE = """name: cond
preset: tiny
models: [{{name: biggan, config: {config}}}]
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
    assert recorded == {"cond/biggan-unlabeled-s0": False, "cond/biggan-synthetic-s0": True}, recorded
