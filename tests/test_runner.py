"""Runs resume after a kill with nothing lost; the smoke suite runs every model end to end."""
import json

import torch

from trilemma.cli import main
from trilemma.run.settings import expand, load_suite
from trilemma.contract.registry import registered
from trilemma.results.show import show
from trilemma.results.io import load_results, read_result
from trilemma.results.schema import CHECKPOINT_FILE
from trilemma.run.runner import Context, execute, run_dir_for

from conftest import REPO

SMOKE = REPO / "suites" / "smoke.yaml"
OVERRIDES = ["train.max_images=96", "train.checkpoint_seconds=0", "train.eval_points=3"]


def _dcgan_run():
    suite = load_suite(SMOKE, OVERRIDES)
    return expand(suite, ["dcgan"])[0]


def test_killed_run_resumes_and_matches_an_uninterrupted_one(tmp_path):
    run = _dcgan_run()
    ctx = Context(torch.device("cpu"))

    # Uninterrupted reference.
    assert execute(run, run_dir_for(tmp_path / "a", run), ctx) == "done"
    reference = read_result(run_dir_for(tmp_path / "a", run))

    # Killed after 2 of 6 steps, then resumed by running it again.
    run_dir = run_dir_for(tmp_path / "b", run)
    assert execute(run, run_dir, ctx, stop_after_steps=2) == "running"  # stopped by the hook: resumable
    partial = read_result(run_dir)
    assert partial["status"] == "running" and (run_dir / CHECKPOINT_FILE).exists()
    assert execute(run, run_dir, ctx) == "done"
    resumed = read_result(run_dir)

    assert resumed["measurements"]["train"]["images_seen"] == 96
    assert resumed["measurements"]["train"]["steps"] == reference["measurements"]["train"]["steps"]
    # Same batches and RNG state: the evaluation curve's images and the final samples agree.
    assert [p["images"] for p in resumed["curve"]] == [p["images"] for p in reference["curve"]]
    assert (run_dir / "samples.png").read_bytes() == (run_dir_for(tmp_path / "a", run) / "samples.png").read_bytes()
    kinds = [json.loads(line)["kind"] for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert kinds.count("resume") == 1
    _check_tensorboard(run_dir_for(tmp_path / "a", run))


def _check_tensorboard(run_dir):
    """The training curves are in TensorBoard's event files too, against images seen."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return  # the package is optional at run time: only the JSON lines are written
    board = EventAccumulator(str(run_dir / "tensorboard"))
    board.Reload()
    tags = board.Tags()["scalars"]
    assert "train/images_per_second" in tags and any(t.startswith("train/") and "loss" in t for t in tags)
    logged = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [e.step for e in board.Scalars("train/images_per_second")] == \
        [line["images"] for line in logged if line["kind"] == "train"]


def test_a_failing_run_is_recorded_and_the_suite_goes_on(tmp_path, monkeypatch):
    from trilemma.models.dcgan import DCGAN

    def broken(self, x, optimizers):
        raise RuntimeError("boom")

    monkeypatch.setattr(DCGAN, "train_step", broken)
    run = _dcgan_run()
    status = execute(run, run_dir_for(tmp_path, run), Context(torch.device("cpu")))
    result = read_result(run_dir_for(tmp_path, run))
    assert status == "failed" and result["error"]["message"] == "boom"
    assert "RuntimeError" in result["error"]["traceback"]


def test_smoke_suite_writes_one_result_per_registered_model(tmp_path):
    assert main(["run", str(SMOKE), "--results", str(tmp_path)]) == 0
    results = load_results(tmp_path / "smoke")
    assert sorted(r["model"]["name"] for r in results) == sorted(registered())
    for r in results:
        m = r["measurements"]
        assert r["status"] == "done", (r["run"], r["error"])
        assert m["train"]["images_seen"] >= 64 and m["params"]["total"] > 0
        assert m["sample"]["samplers"][m["sample"]["default"]]["images_per_second"] > 0
        assert ("nll" in m) == (r["model"]["capabilities"]["density"] != "none")
        assert (tmp_path / "smoke" / r["run"] / "samples.png").exists()
        assert r["provenance"]["device"] == "cpu" and r["provenance"]["versions"]["torch"]
        assert r["timings"]["train"] > 0 and r["timings"]["sample_speed"] > 0
    timings = show(tmp_path / "smoke", timings=True).splitlines()  # the README's phase budget
    assert len(timings) == len(results) + 3 and timings[-2].startswith("total")
    # Running again skips every run (their config did not change).
    mtimes = {r["run"]: (tmp_path / "smoke" / r["run"] / "result.json").stat().st_mtime for r in results}
    assert main(["run", str(SMOKE), "--results", str(tmp_path)]) == 0
    assert mtimes == {r: (tmp_path / "smoke" / r / "result.json").stat().st_mtime for r in mtimes}


def test_turning_on_the_scaling_study_adds_it_without_retraining(tmp_path):
    assert main(["run", str(SMOKE), "--models", "dcgan", "--results", str(tmp_path)]) == 0
    path = tmp_path / "smoke" / "dcgan-synthetic-s0"
    before = read_result(path)
    assert "scaling" not in before["measurements"]
    # Overrides name a variant's own results folder; --name puts the study into the suite's own.
    assert main(["run", str(SMOKE), "--models", "dcgan", "--results", str(tmp_path), "--name", "smoke",
                 "eval.scaling=true",
                 "eval.scaling_resolutions=[8,16]", "eval.scaling_batch=2", "eval.scaling_repeats=1"]) == 0
    after = read_result(path)
    assert after["measurements"]["train"] == before["measurements"]["train"]  # not retrained
    scaling = after["measurements"]["scaling"]
    assert scaling["resolutions"] == [8, 16] and scaling["slopes"]["train"] is not None


def test_the_config_hash_names_the_data_root_and_the_fid_weights(tmp_path, monkeypatch):
    """Another data root or other FID weights make a finished run stale (its hash changes)."""
    from trilemma.results.io import config_hash
    from trilemma.run.runner import results_config

    def hashed(root, weights):
        suite = load_suite(SMOKE, OVERRIDES + [f"datasets=[{{name: mnist, root: {root}}}]", "eval.fid=true",
                                               f"eval.fid_weights={weights}"])
        return config_hash(results_config(expand(suite, ["dcgan"])[0]))

    one, two = tmp_path / "w1.pth", tmp_path / "w2.pth"
    one.write_bytes(b"weights one")
    two.write_bytes(b"weights two")
    base = hashed(tmp_path / "a", one)
    assert base == hashed(tmp_path / "a", one)
    assert base != hashed(tmp_path / "b", one) and base != hashed(tmp_path / "a", two)


def test_the_foreach_ema_equals_lerp_tensor_by_tensor():
    import copy

    from trilemma.contract.family import build_config
    from trilemma.contract.registry import get_model_class
    from trilemma.run.loop import update_ema
    from trilemma.run.settings import TrainConfig

    cls = get_model_class("vqvae")  # parameters and buffers (a codebook's counts)
    torch.manual_seed(0)
    model = cls(build_config(cls, "tiny", {}), (1, 8, 8))
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        for b in model.buffers():
            b.add_(1) if b.is_floating_point() else b.fill_(7)
    cfg = TrainConfig(ema_halflife_images=500, ema_rampup=0)
    expected = [(e.detach().clone().lerp_(p.detach(), 1 - 0.5 ** (16 / 500))) for e, p in
                zip(ema.parameters(), model.parameters())]
    update_ema(ema, model, images=1000, batch=16, cfg=cfg)
    for got, want in zip(ema.parameters(), expected):
        assert torch.equal(got, want)
    assert list(ema.buffers()) and all(torch.equal(a, b) for a, b in zip(ema.buffers(), model.buffers()))


def test_a_flops_budget_ends_at_the_same_step_however_long_the_steps_take(tmp_path, monkeypatch):
    """train.max_flops: counted FLOPs, not seconds, end training; a slowed-down machine trains the
    same model (same steps, same FLOPs, same samples)."""
    import time
    from trilemma.contract.family import GenerativeModel

    suite = load_suite(SMOKE, ["train.max_images=null", "train.max_flops=3e8", "train.flops_every_steps=2"])
    run = expand(suite, ["vae"])[0]
    ctx = Context(torch.device("cpu"))
    assert execute(run, run_dir_for(tmp_path / "a", run), ctx) == "done"
    fast = read_result(run_dir_for(tmp_path / "a", run))["measurements"]["train"]

    step = GenerativeModel.train_step
    monkeypatch.setattr(GenerativeModel, "train_step", lambda *a, **k: (time.sleep(0.02), step(*a, **k))[1])
    assert execute(run, run_dir_for(tmp_path / "b", run), ctx) == "done"
    slow = read_result(run_dir_for(tmp_path / "b", run))["measurements"]["train"]

    assert slow["train_seconds"] > 0.02 * (slow["steps"] - 1)  # the slowed steps were timed as training
    assert slow["steps"] == fast["steps"] > 1 and slow["train_flops"] == fast["train_flops"]
    per_step = fast["flops_per_image"] * 16
    assert 3e8 <= fast["train_flops"] < 3e8 + per_step  # it stops at the first step past the budget
    assert (run_dir_for(tmp_path / "a", run) / "samples.png").read_bytes() == \
        (run_dir_for(tmp_path / "b", run) / "samples.png").read_bytes()
