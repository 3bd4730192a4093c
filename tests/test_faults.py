"""Faults a long run meets and rough edges a new user meets (issue 29).

    * every typed setting, suite keys and each family's ``Config``, swept over its boundary values
      (0, negative, empty, huge, wrong type): a bad value is one line at load naming the key;
    * bad files: a result without its config, a results folder that is a file, another model's
      checkpoint: each a one-line error or set aside, never a traceback;
    * a measurement that fails is recorded, and the run, ``show``, the report and the exit status say so;
    * the preflight finds what a suite lacks (FID weights, disk space) before anything trains;
    * plugins: one class reached twice is one registration, a broken one names itself, a saved plugin
      run says which ``--plugin`` to pass;
    * bundled suites by name, legends, the latest ``eval`` in ``show`` and the report, Inception
      calibration only when features are computed.
"""
import dataclasses
import inspect
import json
import math
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch

from trilemma.cli import main
from trilemma.contract.errors import TrilemmaError
from trilemma.contract.registry import registered
from trilemma.contract.testing import structured_batch
from trilemma.contract.update import plain_update
from trilemma.run.data import DataConfig
from trilemma.run.settings import (EvalConfig, LauncherConfig, ModelEntry, SuiteConfig, TrainConfig,
                                   checked_config, load_suite)

from conftest import REPO

HUGE_INT, HUGE_FLOAT = 10 ** 12, 1e300
SHAPE = (3, 8, 8)


# --- the sweep over every family's Config --------------------------------------------------------

def _comments(config_cls) -> dict[str, str]:
    """Each field's trailing comment in the source: where a family documents what 0 means."""
    out, last = {}, None
    for line in inspect.getsource(config_cls).splitlines():
        match = re.match(r"\s+(\w+)\s*:[^=]+=.*?#\s*(.*)$", line)
        if match:
            last = match.group(1)
            out[last] = match.group(2)
        elif last and re.match(r"\s+#", line):  # the comment goes on, on its own line
            out[last] += " " + line.strip().lstrip("#").strip()
        else:
            last = None
    return out


ZERO_DOCUMENTED = re.compile(r"(?<![\w.])0(\.0)?\s*(:|disables|picks|turns|=|\(off|means)")
LEARNING_RATE = re.compile(r"(^|_)lr($|_)")
# Floats whose zero is no setting (a scale, a tolerance, a step, a noise level of a schedule): they
# must be > 0 unless the family's comment says what 0 means.
POSITIVE_FLOATS = {"init_std", "step_size", "blur", "scaling", "temperature", "sigma_data", "sigma_max",
                   "sigma_min", "rho", "p_std", "kernel_radius", "mollifier_std", "rtol", "atol", "test_rtol",
                   "test_atol", "ode_rtol", "ode_atol", "nll_rtol", "nll_atol", "inverse_tol", "coeff",
                   "bottleneck", "subsample", "min_step", "train_eps", "sample_eps", "sinkhorn_blur", "kappa",
                   "beta_start", "beta_end", "beta_min", "beta_max", "poisson_rate", "geometric_p",
                   "scale_bound", "s_noise", "two_step_sigma", "sigma", "truncation"}


def _family_cases():
    """(family, field, kind, value, rule) for every field of every registered family's Config.

    ``rule``: "reject" (a one-line error naming the key), or "works" (rejected, or accepted and then
    the model builds, trains a step and samples), or "no crash" (rejected or accepted, never another
    exception: a huge value that is legal but cannot be built here)."""
    cases = []
    for name, cls in registered().items():
        hints = typing.get_type_hints(cls.Config)
        comments = _comments(cls.Config)
        used = [dict(preset) for preset in cls.presets.values()] + [{}]
        for f in dataclasses.fields(cls.Config):
            tp, origin = hints[f.name], typing.get_origin(hints[f.name])
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            values = [p.get(f.name, default) for p in used]
            zero_ok = bool(ZERO_DOCUMENTED.search(comments.get(f.name, ""))) or any(v == 0 for v in values
                                                                                 if isinstance(v, (int, float)))
            negative_ok = any(isinstance(v, (int, float)) and v < 0 for v in values)
            if tp is int:
                cases += [(name, f.name, "zero", 0, "works" if zero_ok else "reject"),
                          (name, f.name, "negative", -1, "works" if negative_ok else "reject"),
                          (name, f.name, "huge", HUGE_INT, "no crash"),
                          (name, f.name, "wrong type", 2.5, "reject")]
            elif tp is float:
                positive = (LEARNING_RATE.search(f.name) or f.name in POSITIVE_FLOATS) and not zero_ok
                cases += [(name, f.name, "zero", 0.0, "reject" if positive else "works"),
                          (name, f.name, "negative", -1.0, "works" if negative_ok else "reject"),
                          (name, f.name, "huge", HUGE_FLOAT, "no crash"),
                          (name, f.name, "nan", math.nan, "reject"),
                          (name, f.name, "infinite", math.inf, "reject"),
                          (name, f.name, "wrong type", "fast", "reject")]
            elif tp is tuple or origin in (tuple, list):
                cases += [(name, f.name, "empty", [], "works" if any(v == () or v == [] for v in values)
                           else "reject"),
                          (name, f.name, "negative", [-1], "reject"),
                          (name, f.name, "wrong type", "x", "reject")]
            else:  # bool, str, Literal choices
                cases += [(name, f.name, "empty", "", "reject" if tp is not str else "no crash"),
                          (name, f.name, "wrong type", [1], "reject")]
    return cases


FAMILY_CASES = _family_cases()


def _trains(cls, config) -> None:
    """Build at the tiny shape, take a training step and draw two samples, all finite."""
    torch.manual_seed(0)
    model = cls(config, SHAPE)
    update = plain_update(model)
    x = structured_batch(4, SHAPE)
    extra = {"labels": torch.arange(4) % config.num_classes} if cls.capabilities.conditional else {}
    model.train()
    losses = model.train_step(x, update, **extra)
    assert all(math.isfinite(float(v)) for v in losses.values()), losses
    model.eval()
    with torch.no_grad():
        samples = model.sample(2)
    assert samples.shape == (2, *SHAPE) and bool(torch.isfinite(samples).all())


def _verdict(name, field, value, rule):
    """None when the value is handled as ``rule`` asks, else what went wrong (one line)."""
    cls = registered()[name]
    where = f"suite.yaml: models[0] ({name})"
    try:
        config = checked_config(cls, "tiny", {field: value}, where)
    except TrilemmaError as e:
        message = str(e)
        if "\n" in message or not message.startswith(where) or not re.search(rf"\b{field}\b", message):
            return f"rejected, but the message does not name 'config.{field}' in one line: {message}"
        return None
    except Exception as e:  # noqa: BLE001 (the finding: a traceback instead of a one-line error)
        return f"{type(e).__name__} at load instead of a one-line error: {e}"
    if rule == "reject":
        return "accepted at load"
    if rule == "works":
        try:
            _trains(cls, config)
        except Exception as e:  # noqa: BLE001
            text = str(e).strip().splitlines()[0] if str(e).strip() else ""
            return f"accepted at load, then the model fails: {type(e).__name__}: {text}"
    return None


def test_the_family_sweep_covers_every_field_of_every_family():
    fields = {(c[0], c[1]) for c in FAMILY_CASES}
    assert len(fields) == sum(len(dataclasses.fields(cls.Config)) for cls in registered().values())
    assert len(FAMILY_CASES) > 1000


@pytest.mark.parametrize("family", sorted(registered()))
def test_every_config_value_is_rejected_at_load_or_works(family):
    torch.set_num_threads(1)
    problems = [f"{field} = {value!r} ({kind}): {why}" for name, field, kind, value, rule in FAMILY_CASES
                if name == family and (why := _verdict(name, field, value, rule))]
    assert not problems, "\n".join(problems)


# --- the sweep over every suite key --------------------------------------------------------------

BASE_SUITE = {"name": "sweep", "preset": "tiny", "models": ["dcgan"],
              "datasets": [{"name": "synthetic", "synthetic_size": 8}], "train": {"max_images": 16}}
# The suite sections, where each sits in a suite file.
SECTIONS = ((SuiteConfig, ""), (TrainConfig, "train."), (EvalConfig, "eval."), (DataConfig, "datasets.0."),
            (LauncherConfig, "launcher."), (ModelEntry, "models.0."))
# Boundary values a key accepts, each for a reason; every other boundary value must be refused.
ACCEPTED = {
    "description": {"empty"}, "plugins": {"empty"}, "tolerances": {"empty"},
    "train.max_images": {"huge"}, "train.max_seconds": {"huge"}, "train.max_flops": {"huge"},  # long runs
    "train.flops_every_steps": {"huge"}, "train.log_every_steps": {"huge"},  # counted or logged once
    "train.ema_halflife_images": {"zero", "huge"}, "train.ema_rampup": {"zero", "huge"},  # 0: off
    "train.warmup_steps": {"zero", "huge"}, "train.eval_points": {"zero"},
    "train.checkpoint_seconds": {"zero", "huge"},  # 0: after every step; huge: at the end only
    "eval.fid_ref_images": {"huge"}, "eval.nll_images": {"huge"},  # at most the split's images
    "eval.fid_batch": {"zero"}, "eval.curve_fid_samples": {"zero"}, "eval.scaling_batch": {"zero"},
    "eval.grid_images": {"zero"}, "eval.coverage_samples": {"zero"},  # 0: eval.fid_samples
    "eval.nll_draws": {"huge"}, "eval.sample_repeats": {"huge"},
    "eval.scaling_repeats": {"huge"},  # as many as the seconds caps allow
    "eval.nll_seconds_cap": {"huge"}, "eval.sample_seconds_cap": {"huge"}, "eval.scaling_seconds_cap": {"huge"},
    "datasets.0.path": {"empty"},  # read by npz data sets only, which refuse it empty
    "launcher.jobs": {"huge"}, "launcher.cpus_per_job": {"huge"}, "launcher.time_minutes": {"huge"},
    "launcher.memory_gb": {"huge"}, "launcher.gpus_per_job": {"zero", "huge"},  # the scheduler's limits
    "launcher.extra": {"empty", "negative"},  # any other parameter of submitit, passed as it is
    "models.0.config": {"empty"}, "models.0.train": {"empty"}, "models.0.eval": {"empty"},
    "threads": {"zero"},  # 0: torch's own thread count
}


def _suite_values(tp):
    """(kind, value) boundary values of a setting of type ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return _suite_values(inner[0]) if len(inner) == 1 else [("empty", ""), ("wrong type", {"a": 1})]
    if tp is int:
        return [("zero", 0), ("negative", -1), ("huge", HUGE_INT), ("wrong type", 2.5)]
    if tp is float:
        return [("zero", 0.0), ("negative", -1.0), ("huge", HUGE_FLOAT), ("nan", math.nan),
                ("infinite", math.inf), ("wrong type", "x")]
    if tp is str:
        return [("empty", ""), ("wrong type", 5)]
    if tp is bool or origin is typing.Literal:
        return [("empty", ""), ("wrong type", [1])]
    if origin in (list, tuple):
        element = [("negative", [-1]), ("huge", [HUGE_INT])] if args and args[0] is int else []
        return [("empty", []), *element, ("wrong type", "x")]
    if origin is dict or tp is dict:
        return [("empty", {}), ("negative", {"fid": -1.0}), ("wrong type", "x")]
    return [("empty", []), ("wrong type", 5)]


def _suite_cases():
    cases = []
    for cls, prefix in SECTIONS:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]) or f.name == "datasets":
                continue  # sections: swept field by field
            key = prefix + f.name
            cases += [(key, kind, value) for kind, value in _suite_values(hints[f.name])]
    return cases


SUITE_SWEEP = _suite_cases()


def _with_value(key: str, value):
    values = json.loads(json.dumps(BASE_SUITE))
    node, parts = values, key.split(".")
    for part in parts[:-1]:
        if part.isdigit():
            node = node[int(part)]
        else:
            if isinstance(node.get(part), str):  # models: [dcgan] -> an entry
                node[part] = {"name": node[part]}
            node = node.setdefault(part, {})
    if parts[0] == "models" and isinstance(values["models"][0], str):
        values["models"][0] = {"name": values["models"][0]}
        node = values["models"][0]
    node[parts[-1]] = value
    return values


def test_the_suite_sweep_covers_every_key():
    keys = {case[0] for case in SUITE_SWEEP}
    assert {"train.batch_size", "eval.fid_samples", "datasets.0.root", "launcher.folder", "models.0.preset",
            "seeds", "device"} <= keys and len(SUITE_SWEEP) > 250
    assert set(ACCEPTED) <= keys


def test_every_suite_value_is_rejected_at_load_naming_the_key_or_is_meant(tmp_path):
    import yaml

    path = tmp_path / "suite.yaml"
    problems = []
    for key, kind, value in SUITE_SWEEP:
        text = yaml.safe_dump(_with_value(key, value)).replace("nan", ".nan").replace("inf", ".inf")
        path.write_text(text)
        try:
            load_suite(path)
        except TrilemmaError as e:
            message = str(e)
            if "\n" in message or key.split(".")[-1] not in message:
                problems.append(f"{key} = {value!r} ({kind}): the message does not name it: {message}")
            elif kind in ACCEPTED.get(key, ()):
                problems.append(f"{key} = {value!r} ({kind}): refused, but meant to be accepted: {message}")
        except Exception as e:  # noqa: BLE001 (the finding: a traceback instead of a one-line error)
            problems.append(f"{key} = {value!r} ({kind}): {type(e).__name__}: {e}")
        else:
            if kind not in ACCEPTED.get(key, ()):
                problems.append(f"{key} = {value!r} ({kind}): accepted at load")
    assert not problems, "\n".join(problems)


# --- bad files --------------------------------------------------------------------------------------

TINY = """name: faults
preset: tiny
models: [dcgan]
datasets: [{name: synthetic, synthetic_size: 8, synthetic_train: 32, synthetic_test: 8}]
train: {batch_size: 8, max_images: 16, warmup_steps: 0, eval_points: 1}
eval: {fid: false, curve_fid_samples: 0, sample_batch: 4, sample_repeats: 1, grid_images: 4}
"""


def _run(tmp_path, capsys, text=TINY, *extra):
    suite = tmp_path / "suite.yaml"
    suite.write_text(text)
    code = main(["run", str(suite), "--results", str(tmp_path / "results"), *extra])
    return code, capsys.readouterr()


def _result(tmp_path, run="dcgan-synthetic-s0", suite="faults"):
    return json.loads((tmp_path / "results" / suite / run / "result.json").read_text())


def test_a_result_without_its_config_is_set_aside_and_the_run_redone(tmp_path, capsys):
    assert _run(tmp_path, capsys)[0] == 0
    run_dir = tmp_path / "results" / "faults" / "dcgan-synthetic-s0"
    result = _result(tmp_path)
    del result["config"]
    (run_dir / "result.json").write_text(json.dumps(result))
    assert main(["show", str(run_dir)]) == 2  # a one-line error naming the file and the key
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "result.json" in err[0] and "'config'" in err[0], err
    code, out = _run(tmp_path, capsys)
    assert code == 0 and "Traceback" not in out.err, out.err
    assert (run_dir / "result.json.corrupt").is_file() and _result(tmp_path)["status"] == "done"


def test_a_results_folder_that_is_a_file_is_one_line_and_nothing_is_written(tmp_path, capsys):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "faults").write_text("not a folder")
    code, out = _run(tmp_path, capsys)
    err = out.err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "is a file" in err[0] and "faults" in err[0], err
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["faults"]


def test_a_checkpoint_of_another_model_is_set_aside_and_training_starts_afresh(tmp_path, capsys):
    from trilemma.contract.family import build_config
    from trilemma.contract.registry import get_model_class

    vae = get_model_class("vae")
    other = vae(build_config(vae, "tiny", {}), (1, 8, 8))
    run_dir = tmp_path / "results" / "faults" / "dcgan-synthetic-s0"
    run_dir.mkdir(parents=True)
    torch.save({"model": other.state_dict(), "ema": None, "optimizers": {}, "state": {}, "rng": {}},
               run_dir / "checkpoint.pt")
    code, out = _run(tmp_path, capsys)
    assert code == 0, out.err
    assert (run_dir / "checkpoint.pt.corrupt").is_file() and "another model" in out.err
    assert _result(tmp_path)["status"] == "done"


# --- failed measurements are visible ----------------------------------------------------------------

def test_a_failed_measurement_is_recorded_shown_reported_and_retried(tmp_path, capsys, monkeypatch):
    from trilemma.measure import nll as nll_measure
    from trilemma.report.build import build_report

    text = TINY.replace("models: [dcgan]", "models: [vae]")
    real = nll_measure.nll

    def broken(*args, **kwargs):
        raise RuntimeError("the NLL pass broke\nsecond line")

    monkeypatch.setattr(nll_measure, "nll", broken)
    code, out = _run(tmp_path, capsys, text, "--in-process")  # the patch is this process's, not a worker's
    result = _result(tmp_path, "vae-synthetic-s0")
    assert code == 1 and result["status"] == "incomplete", out.err
    assert result["errors"]["nll"] == {"type": "RuntimeError", "message": "the NLL pass broke\nsecond line"}
    assert "sample" in result["measurements"] and "nll" not in result["measurements"]  # the rest measured
    assert "1 incomplete" in out.out and "nll failed: RuntimeError: the NLL pass broke" in out.out
    assert (tmp_path / "results" / "faults" / "vae-synthetic-s0" / "checkpoint.pt").is_file()
    # show and the report say so, with the error's first line; the cell says why it is empty.
    assert main(["show", str(tmp_path / "results" / "faults")]) == 0
    shown = capsys.readouterr().out
    assert "incomplete" in shown and "nll failed: RuntimeError: the NLL pass broke" in shown
    assert "second line" not in shown.split("\n\n")[1]
    table = (build_report("faults", tmp_path / "results", tmp_path / "reports") / "table.md").read_text()
    assert "`vae` (incomplete)" in table and "failed (RuntimeError)" in table
    assert "its nll failed (RuntimeError: the NLL pass broke)" in table
    # The next run measures what failed, without training again.
    monkeypatch.setattr(nll_measure, "nll", real)
    code, out = _run(tmp_path, capsys, text)
    result = _result(tmp_path, "vae-synthetic-s0")
    assert code == 0 and result["status"] == "done" and "nll" in result["measurements"], out.err
    assert "errors" not in result and result["error"] is None
    log = (tmp_path / "results" / "faults" / "vae-synthetic-s0" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["kind"] for line in log].count("start") == 1


def test_the_scaling_study_trains_families_with_batch_statistics_at_two_images():
    from trilemma.contract.family import build_config
    from trilemma.contract.registry import get_model_class
    from trilemma.measure.scaling import resolution_scaling

    cls = get_model_class("ot_decoder")  # BatchNorm: "Expected more than 1 value per channel" at batch 1
    config = dataclasses.asdict(build_config(cls, "tiny", {}))
    for batch in (0, 1):
        study = resolution_scaling("ot_decoder", config, 1, [8, 12], batch, 1, torch.device("cpu"),
                                   seconds_cap=5, fill_seconds=0.0, max_batch=4)
        assert [p["status"] for p in study["points"]] == ["ok", "ok"], study["points"]
        assert all(p["train_batch"] >= 2 for p in study["points"]) and study["slopes"]["train"] is not None


def test_a_scaling_study_that_failed_reads_as_incomplete_also_in_earlier_results():
    from trilemma.results.schema import summarize

    result = json.loads((REPO / "tests" / "fixtures" / "results" / "fixture" / "dcgan-mnist-s0" /
                         "result.json").read_text())
    result["measurements"]["scaling"] = {"points": [
        {"resolution": 16, "pixels": 256, "status": "error", "type": "ValueError",
         "message": "Expected more than 1 value per channel when training"},
        {"resolution": 32, "pixels": 1024, "status": "oom", "message": "out of memory"}], "slopes": {}}
    summary = summarize(result)
    assert summary.status == "incomplete"
    assert summary.errors == {"scaling": "ValueError: Expected more than 1 value per channel when training "
                                         "(at 16x16)"}


# --- preflight --------------------------------------------------------------------------------------

def test_missing_fid_weights_stop_the_suite_at_its_preflight(tmp_path, capsys, monkeypatch):
    from trilemma.measure import fid as fidlib

    monkeypatch.delenv("TRILEMMA_FID_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no cached download
    monkeypatch.setattr(fidlib, "WEIGHTS_URL", "http://127.0.0.1:9/weights-inception.pth")  # refused
    code, out = _run(tmp_path, capsys, TINY.replace("fid: false", "fid: true, fid_samples: 4"))
    err = out.err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "FID weights" in err[0] and "unreachable" in err[0], err
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").rglob("*.json"))


def test_the_preflight_checks_the_disk_and_says_what_it_checked(tmp_path, capsys, monkeypatch):
    from trilemma.run import runner

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    code, out = _run(tmp_path / "a", capsys)
    assert code == 0
    lines = [line for line in out.err.splitlines() if line.startswith("preflight:")]
    assert [line.split()[1] for line in lines] == ["data", "1", "disk:"], lines
    full = shutil.disk_usage(tmp_path)._replace(free=1000)
    monkeypatch.setattr(runner.shutil, "disk_usage", lambda path: full)
    code, out = _run(tmp_path / "b", capsys)
    err = out.err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "1.0 kB free" in err[0] and "need about" in err[0], err
    assert not any((tmp_path / "b" / "results").rglob("*.json"))


# --- plugins ----------------------------------------------------------------------------------------

PLUGIN = REPO / "tests" / "fixtures" / "plugin" / "pixel_means.py"


def _trilemma(*args, cwd=None, env=None):
    import os

    return subprocess.run([sys.executable, "-m", "trilemma", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, env={**os.environ, **(env or {})}, timeout=300)


def _distribution(site: Path, name: str, entry_points: str) -> None:
    """An installed distribution as importlib.metadata finds it on the path: its entry points only."""
    info = site / f"{name}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[trilemma.models]\n{entry_points}\n")


def test_an_entry_point_to_a_decorated_class_is_one_registration_and_a_broken_one_hides_nothing(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(PLUGIN, site / "outside_families.py")  # decorated with @trilemma.register, as the docs say
    _distribution(site, "outside", "pixel_means = outside_families:PixelMeans\n"
                                   "broken_family = no_such_module:Nothing\ntwin = outside_families:PixelMeans")
    _distribution(site, "another", "twin = another_module:Twin")
    proc = _trilemma("list", cwd=tmp_path, env={"PYTHONPATH": str(site)})
    listed = [line.split()[0] for line in proc.stdout.split("\n\n")[0].splitlines()[1:]]
    assert listed.count("pixel_means") == 1 and "dcgan" in listed and len(listed) >= 29, proc.stdout
    assert "broken_family" not in listed and "twin" not in listed
    errors = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(errors) == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert any("broken_family" in e and "no_such_module" in e for e in errors)
    assert any("'twin' is registered twice" in e for e in errors)


def test_a_plugin_whose_family_is_invalid_names_the_plugin(tmp_path):
    from trilemma.contract.registry import load_plugins

    bad = tmp_path / "bad_family.py"
    bad.write_text(PLUGIN.read_text().replace('family = "AR"', 'family = "Diffusion"')
                   .replace('"pixel_means"', '"bad_family"'))
    with pytest.raises(TrilemmaError) as e:
        load_plugins([str(bad)], "--plugin")
    assert str(bad) in str(e.value) and "Diffusion" in str(e.value) and "\n" not in str(e.value)


def test_eval_and_sample_of_a_plugin_run_say_which_plugin_to_pass(tmp_path, capsys):
    code, out = _run(tmp_path, capsys, TINY.replace("models: [dcgan]", "models: [pixel_means]"), "--plugin",
                     str(PLUGIN))
    assert code == 0, out.err
    run_dir = tmp_path / "results" / "faults" / "pixel_means-synthetic-s0"
    # A fresh process, where the plugin is not loaded: each command is one line naming the plugin.
    script = ("import sys; from trilemma.cli import main; "
              f"print(main(['sample', {str(run_dir)!r}, '-n', '4', '-o', {str(tmp_path / 'g.png')!r}]), "
              f"main(['eval', {str(run_dir)!r}]))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.stdout.split() == ["2", "2"] and len(lines) == 2, proc.stderr
    assert all(f"--plugin {PLUGIN}" in line and "pixel_means" in line for line in lines), lines
    assert main(["sample", str(run_dir), "-n", "4", "-o", str(tmp_path / "g.png"), "--plugin", str(PLUGIN)]) == 0


# --- the wheel is enough ----------------------------------------------------------------------------

def test_bundled_suites_are_listed_and_run_by_name_from_anywhere(tmp_path, capsys, monkeypatch):
    assert main(["suites"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.split("\n\n")[0].splitlines()]
    assert {"smoke", "mnist", "cifar10"} <= set(listed)
    monkeypatch.chdir(tmp_path)  # no suites/ folder here
    assert main(["run", "smoke", "--dry-run", "--results", str(tmp_path / "r")]) == 0
    assert "runs in suite 'smoke'" in capsys.readouterr().out
    assert main(["run", "smoek", "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bundled suites:" in err[0] and "smoke" in err[0]


def test_list_and_show_print_a_legend_of_their_columns_and_marks(capsys):
    assert main(["list"]) == 0
    blocks = capsys.readouterr().out.split("\n\n")  # the table, the variants, the legend
    table, legend = blocks[0], blocks[-1]
    marks = {line.split()[0]: line.split()[5] for line in table.splitlines()[1:]}
    assert marks["biggan"] == "c" and marks["inf_diff"] == "r" and marks["dcgan"] == "-"
    for column in ("family", "density", "free-form", "sampling", "marks", "presets"):
        assert any(line.startswith(column + " ") for line in legend.splitlines()), column
    assert main(["show", str(REPO / "tests" / "fixtures" / "results" / "fixture")]) == 0
    shown = capsys.readouterr().out
    for mark in ("status", "img/s", "FID", "KID×10³", "bits/dim", "≤ an upper bound", "* timed while"):
        assert mark in shown, mark


def _with_evaluations(tmp_path) -> Path:
    """The fixture suite, each FID re-measured by `trilemma eval` at the same n as 12.5 more."""
    folder = tmp_path / "results" / "fixture"
    shutil.copytree(REPO / "tests" / "fixtures" / "results" / "fixture", folder)
    for path in folder.glob("*/result.json"):
        result = json.loads(path.read_text())
        fid = result["measurements"].get("fid")
        if fid:
            again = {k: v for k, v in fid.items() if k not in ("real_data", "bootstrap")}
            result["evaluations"] = [{"time": "2026-01-01T00:00:00+00:00", "fid": again | {"fid": 1.0}},
                                     {"time": "2026-01-02T00:00:00+00:00", "fid": again | {"fid": fid["fid"] + 12.5}}]
            path.write_text(json.dumps(result))
    return folder


def test_show_and_report_take_the_latest_eval_when_asked(tmp_path, capsys):
    folder = _with_evaluations(tmp_path)
    own = json.loads((folder / "dcgan-mnist-s0" / "result.json").read_text())["measurements"]["fid"]["fid"]
    assert main(["show", str(folder / "dcgan-mnist-s0")]) == 0
    assert f" {own:.1f}@" in capsys.readouterr().out.splitlines()[1]
    assert main(["show", str(folder / "dcgan-mnist-s0"), "--evaluations", "latest"]) == 0
    shown = capsys.readouterr().out
    assert f" {own + 12.5:.1f}@" in shown.splitlines()[1] and '"measured_by"' in shown
    assert main(["report", "fixture", "--results", str(tmp_path / "results"), "--out", str(tmp_path / "reports"),
                 "--evaluations", "latest"]) == 0
    latest = (tmp_path / "reports" / "fixture" / "table.md").read_text()
    own_table = (REPO / "tests" / "fixtures" / "golden" / "fixture" / "table.md").read_text()  # --evaluations own
    fids = [json.loads((folder / f"dcgan-mnist-s{s}" / "result.json").read_text())["measurements"]["fid"]["fid"]
            for s in (0, 1)]
    mean = lambda values: f"| {sum(values) / len(values):.0f} ± "  # noqa: E731 (two seeds of dcgan: one row)
    assert mean(fids) in own_table and mean([f + 12.5 for f in fids]) in latest
    assert "From the latest `trilemma eval` re-measurement" in latest


def test_inception_calibrates_only_when_features_are_computed_and_once_per_machine(tmp_path, monkeypatch,
                                                                                    fid_weights):
    from trilemma.measure import fid as fidlib
    from trilemma.measure import inception

    calls = []
    monkeypatch.setattr(inception, "CALIBRATION_FILE", tmp_path / "calibration.json")
    monkeypatch.setattr(inception, "calibrate", lambda net, device: calls.append(1) or
                        {"threads": 1, "batch": 4, "trials": []})
    monkeypatch.setattr(inception, "load_average", lambda: 0.5)  # a quiet machine
    extractor = fidlib.FeatureExtractor(fid_weights, torch.device("cpu"))
    assert calls == []  # built, nothing computed: no calibration
    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    assert extractor(iter([images])).shape == (3, 2048) and calls == [1] and extractor.batch_size == 4
    again = fidlib.FeatureExtractor(fid_weights, torch.device("cpu"))
    again(iter([images]))
    assert calls == [1] and again.calibration["cached"] and again.protocol()["batch"] == 4  # read, not timed


def test_an_inception_calibration_timed_beside_other_work_is_not_kept_for_the_machine(tmp_path, monkeypatch,
                                                                                      fid_weights):
    from trilemma.measure import fid as fidlib
    from trilemma.measure import inception

    calls, load = [], [9.0]  # a 2-core machine with seven processes waiting
    monkeypatch.setattr(inception, "CALIBRATION_FILE", tmp_path / "calibration.json")
    monkeypatch.setattr(inception, "calibrate", lambda net, device: calls.append(1) or
                        {"threads": 1, "batch": 4, "trials": []})
    monkeypatch.setattr(inception, "load_average", lambda: load[0])
    monkeypatch.setattr(inception.os, "cpu_count", lambda: 2)
    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    fidlib.FeatureExtractor(fid_weights, torch.device("cpu"))(iter([images]))
    busy = fidlib.FeatureExtractor(fid_weights, torch.device("cpu"))
    busy(iter([images]))
    assert calls == [1, 1] and busy.calibration["contended"] and not busy.calibration["cached"]
    load[0] = 1.0
    fidlib.FeatureExtractor(fid_weights, torch.device("cpu"))(iter([images]))  # quiet now: kept
    kept = fidlib.FeatureExtractor(fid_weights, torch.device("cpu"))
    kept(iter([images]))
    assert calls == [1, 1, 1] and kept.calibration["cached"] and kept.calibration["load"] == [1.0, 1.0]
    stored = json.loads((tmp_path / "calibration.json").read_text())
    for entry in stored.values():
        del entry["load"]  # made before loads were recorded: made again
    (tmp_path / "calibration.json").write_text(json.dumps(stored))
    load[0] = 9.0
    busy = fidlib.FeatureExtractor(fid_weights, torch.device("cpu"))
    busy(iter([images]))  # timed again, but busy: the stored choice is kept and used
    assert calls == [1, 1, 1, 1] and busy.calibration["cached"] and "load" not in busy.calibration
    load[0] = 1.0
    fidlib.FeatureExtractor(fid_weights, torch.device("cpu"))(iter([images]))
    assert calls == [1, 1, 1, 1, 1] and "load" in json.loads((tmp_path / "calibration.json").read_text()).popitem()[1]
