"""Precision, loss scaling and compilation as recorded settings: smoke runs finish on the CPU and
every speed figure says how it ran."""
import pytest
import torch
from torch import nn

from trilemma.contract.errors import TrilemmaError
from trilemma.results.io import read_result
from trilemma.contract.family import GenerativeModel
from trilemma.contract.update import GradientRule, Update
from trilemma.run.execution import grad_scaler, precision_label
from trilemma.run.runner import Context, execute, run_dir_for
from trilemma.run.settings import LATER_DEFAULTS, expand, hashed_config, load_suite

from conftest import REPO

SMOKE = REPO / "suites" / "smoke.yaml"


def _run(model, overrides):
    return expand(load_suite(SMOKE, ["train.max_images=32", *overrides]), [model])[0]


@pytest.mark.parametrize("model", ["dcgan", "vae", "realnvp"])
def test_bf16_smoke_runs_finish_and_record_their_precision(tmp_path, model):
    run = _run(model, ["train.precision=bf16", "eval.sample_precision=bf16"])
    assert execute(run, run_dir_for(tmp_path, run), Context(torch.device("cpu"))) == "done"
    m = read_result(run_dir_for(tmp_path, run))["measurements"]
    assert m["train"]["precision"] == "bf16" and m["train"]["compile"] == "eager"
    assert m["train"]["torch"] == torch.__version__ and m["train"]["device_name"]
    assert m["train"]["batch_size"] == 16 and m["train"]["per_device_batch"] == 16
    sample = m["sample"]["samplers"][m["sample"]["default"]]
    assert sample["precision"] == "bf16" and sample["batch_size"] == 4
    if "nll" in m:  # the likelihood is never autocast
        assert m["nll"]["bpd"] > 0


class _Linear(GenerativeModel):
    """One linear layer and a squared loss: the optimizer step alone under test."""

    name = "linear_probe"

    def __init__(self, clip=None):
        super().__init__(None, (1, 1, 8))
        self.net, self.clip = nn.Linear(8, 1), clip

    def configure_optimizers(self):
        return {"model": torch.optim.SGD(self.net.parameters(), lr=0.1)}

    def loss(self, x):
        return {"model": self.net(x).pow(2).mean()}

    def gradient_rule(self, role):
        return GradientRule(clip=self.clip)

    samplers = generate = None


def test_fp16_loss_scaling_steps_a_model_like_fp32():
    """Under fp16 the loss is scaled before backward and the gradients unscaled before clipping and
    the step: one SGD step moves the weights as the unscaled fp32 step does (to fp16 rounding)."""
    torch.manual_seed(0)
    model, twin = _Linear(clip=1e9), _Linear()
    twin.load_state_dict(model.state_dict())
    x = torch.randn(32, 8)
    update = Update(model, model.configure_optimizers(), grad_scaler(torch.device("cpu"), "fp16"))
    logs = model.train_step(x, update)
    # The clip saw the true gradient's norm, not the scaled one (65536 times it at the start).
    loss = twin.net(x).pow(2).mean()
    loss.backward()
    assert torch.allclose(logs["grad_norm"], torch.cat([p.grad.flatten() for p in twin.parameters()]).norm())
    twin.configure_optimizers()["model"].step()
    assert torch.allclose(model.net.weight, twin.net.weight, atol=1e-5)


def test_fp16_smoke_run_of_a_two_optimizer_family_finishes(tmp_path):
    run = _run("dcgan", ["train.precision=fp16"])
    assert execute(run, run_dir_for(tmp_path, run), Context(torch.device("cpu"))) == "done"
    assert read_result(run_dir_for(tmp_path, run))["measurements"]["train"]["precision"] == "fp16"


def test_tf32_is_recorded_as_tf32_on_cuda_only():
    assert precision_label(torch.device("cuda"), "fp32", True) == "tf32"
    assert precision_label(torch.device("cuda"), "fp32", False) == "fp32"
    assert precision_label(torch.device("cpu"), "fp32", True) == "fp32"
    assert precision_label(torch.device("cuda"), "bf16", True) == "bf16"


def test_settings_at_their_old_defaults_leave_the_config_hash_as_it_was():
    run = _run("dcgan", [])
    hashed = hashed_config(run.config.to_dict())
    assert not set(LATER_DEFAULTS["train"]) & set(hashed["train"])
    bf16 = hashed_config(_run("dcgan", ["train.precision=bf16"]).config.to_dict())
    assert bf16["train"]["precision"] == "bf16"
    with pytest.raises(TrilemmaError, match="precision"):
        _run("dcgan", ["train.precision=fp8"])


# In the default run (about 30 s on 2 cores: inductor compiles the networks), so CI covers
# torch.compile and bf16 autocast; the second family is a slow test.
@pytest.mark.parametrize("model", ["dcgan", pytest.param("vae", marks=pytest.mark.slow)])
def test_compiled_smoke_runs_finish(tmp_path, model):
    run = _run(model, ["train.compile=true", "eval.compile=true", "train.precision=bf16"])
    assert execute(run, run_dir_for(tmp_path, run), Context(torch.device("cpu"))) == "done"
    m = read_result(run_dir_for(tmp_path, run))["measurements"]
    assert m["train"]["compile"] == "default"
    assert m["sample"]["samplers"][m["sample"]["default"]]["compile"] == "default"


def test_the_dry_run_lists_parameters_and_the_estimate_is_labelled(tmp_path, capsys):
    from trilemma.cli import main

    assert main(["run", str(SMOKE), "--dry-run", "--models", "dcgan,vae", "--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "dcgan-synthetic-s0" in out and "params" in out and "ESTIMATE" not in out
    assert main(["run", str(SMOKE), "--estimate", "--models", "dcgan,igebm", "--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ESTIMATE (not a measurement)" in out and "H100 hours" in out and "FLOPs not counted" not in out


def test_a_cached_autoregressive_sampler_is_counted_not_taken_as_nfe_full_passes():
    from trilemma.run.estimate import run_estimate

    suite = load_suite(SMOKE, [])
    ar, ddpm = (run_estimate(expand(suite, [m])[0]) for m in ("sparse_transformer", "ddpm"))
    assert ar["sample_flops_from"] == "counted" and ddpm["sample_flops_from"] == "nfe"
    # One position per network evaluation: a sample costs about one forward pass over the image,
    # far below NFE forward passes (and above zero: the count ran).
    assert 0 < ar["sample_gflop_per_image"] < ar["nfe"] * ar["train_gflop_per_image"] / 3 / 50
    assert ddpm["sample_gflop_per_image"] == pytest.approx(ddpm["nfe"] * ddpm["train_gflop_per_image"] / 3)


def test_flops_are_counted_through_autograd_grad_as_flop_counter_counts_them():
    """igebm's Langevin chain calls torch.autograd.grad inside its step, which FlopCounterMode cannot
    follow; the counter here gives FlopCounterMode's figure where both work (a plain matmul)."""
    from torch.utils.flop_counter import FlopCounterMode

    from trilemma.measure.flops import count_flops

    a, b = torch.randn(8, 16), torch.randn(16, 4, requires_grad=True)
    reference = FlopCounterMode(display=False)
    with reference:
        (a @ b).sum().backward()
    assert count_flops(lambda: (a @ b).sum().backward()) == reference.get_total_flops() == 2 * 2 * 8 * 16 * 4
    x = torch.randn(4, 16, requires_grad=True)
    assert count_flops(lambda: torch.autograd.grad((x @ b).sum(), x)) == 2 * (2 * 4 * 16 * 4)  # forward, dx


def test_profile_of_training_reports_flops_and_each_setting(capsys):
    from trilemma.cli import main

    assert main(["profile", "--model", "dcgan", "--shape", "1x16x16", "--batch", "8", "--steps", "2",
                 "--warmup", "1", "--no-compile", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "GFLOP per image" in out and "fp32 eager" in out and "bf16 eager" in out


@pytest.mark.parametrize("suite", ["cifar10_gpu", "nightly"])
def test_the_gpu_suites_load_with_every_family_at_its_gpu_preset(suite):
    """Each registered family has the suite's GPU preset (cifar10_gpu, mnist_gpu); a new family without
    one fails here, naming the preset."""
    from trilemma.contract.registry import registered

    loaded = load_suite(REPO / "suites" / f"{suite}.yaml")
    assert sorted(e.name for e in loaded.models) == sorted(registered())
    assert loaded.train.precision == "bf16" and loaded.train.tf32 and loaded.preset.endswith("_gpu")


def test_a_family_opts_out_of_compilation(monkeypatch):
    from trilemma.contract.registry import build_model
    from trilemma.models.dcgan import DCGAN
    from trilemma.run.execution import compile_networks

    model = build_model("dcgan", (1, 16, 16), "tiny", {})
    assert compile_networks(model, "default") == ["generator", "discriminator"]
    monkeypatch.setattr(DCGAN, "compilable", False)
    assert compile_networks(build_model("dcgan", (1, 16, 16), "tiny", {}), "default") == []


def test_plain_fp32_on_a_gpu_with_tf32_allowed_is_labelled_tf32():
    from trilemma.measure.timing import fp32_label
    from trilemma.run.execution import set_tf32

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        set_tf32(True)
        assert fp32_label(torch.device("cuda")) == "tf32" and fp32_label(torch.device("cpu")) == "fp32"
        set_tf32(False)
        assert fp32_label(torch.device("cuda")) == "fp32"
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
