"""Nothing lost, nothing mixed, nothing run that was not asked for.

    * a table of bad inputs: each is one line on stderr, exit status 2, no traceback, nothing written;
    * non-finite training fails the run (and the suite goes on); a pickle in a checkpoint never runs;
    * a run killed at any point resumes to the same result as one that was never killed;
    * two runners on one results folder share the suite, each run trained once.
"""
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from trilemma.cli import main

from conftest import REPO

# A valid suite of one tiny model on synthetic data; each case below breaks one thing of it.
BASE = """name: rel
preset: tiny
models: [dcgan]
datasets: [{name: synthetic, synthetic_size: 8, synthetic_train: 32, synthetic_test: 8}]
train: {batch_size: 8, max_images: 16, warmup_steps: 0, eval_points: 1}
eval: {fid: false, curve_fid_samples: 0, sample_batch: 4, sample_repeats: 1, grid_images: 4}
"""


def _suite(tmp_path, text=BASE, name="suite.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _with(old: str, new: str) -> str:
    assert old in BASE, old
    return BASE.replace(old, new)


def _npz(folder: Path, train=None, test=None, **arrays):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (16, 8, 8, 1), dtype=np.uint8) if train is None else train
    test = rng.integers(0, 256, (4, 8, 8, 1), dtype=np.uint8) if test is None else test
    np.savez(folder / "train.npz", images=train, **arrays)
    np.savez(folder / "test.npz", images=test)
    return folder


NPZ = "datasets: [{name: synthetic, synthetic_size: 8, synthetic_train: 32, synthetic_test: 8}]"


def _npz_suite(folder: Path) -> str:
    return _with(NPZ, f"datasets: [{{name: npz, path: {folder}, label: data}}]")


# (case id, suite text or a callable(tmp_path) -> argv, extra argv, what the message must mention)
SUITE_CASES = [
    # --- suite structure
    ("top-level list", "- name: x\n- models: [dcgan]\n", [], "mapping"),
    ("top-level scalar", "just a string\n", [], "mapping"),
    ("empty file", "", [], "mapping"),
    ("invalid yaml", "name: [unclosed\n", [], "YAML"),
    ("tab-indented yaml", "name: x\n\tmodels: [dcgan]\n", [], "YAML"),
    ("datasets as a mapping", _with(NPZ, "datasets: {name: mnist}"), [], "datasets"),
    ("models as a mapping", _with("models: [dcgan]", "models: {dcgan: {}}"), [], "models"),
    ("models entry a number", _with("models: [dcgan]", "models: [3]"), [], "models"),
    ("unknown top-level key", BASE + "sedes: [1]\n", [], "sedes"),
    ("unknown train key", _with("max_images: 16", "max_imagse: 16"), [], "max_imagse"),
    ("unknown dataset key", _with("synthetic_size: 8", "synthetic_sise: 8"), [], "synthetic_sise"),
    ("missing name", BASE.replace("name: rel\n", ""), [], "name"),
    ("missing model name", _with("models: [dcgan]", "models: [{preset: tiny}]"), [], "name"),
    ("duplicate model entry", _with("models: [dcgan]", "models: [dcgan, dcgan]"), [], "twice"),
    ("two datasets one label", _with(NPZ, NPZ[:-1] + ", {name: synthetic}]"), [], "label"),
    # --- values
    ("negative max_images", _with("max_images: 16", "max_images: -100"), [], "max_images"),
    ("negative max_seconds", _with("max_images: 16", "max_seconds: -1"), [], "max_seconds"),
    ("zero max_seconds", _with("max_images: 16", "max_seconds: 0"), [], "max_seconds"),
    ("no budget", _with("max_images: 16, ", ""), [], "never ends"),
    ("zero batch", _with("batch_size: 8", "batch_size: 0"), [], "batch_size"),
    ("fractional batch", _with("batch_size: 8", "batch_size: 1.5"), [], "batch_size"),
    ("string batch", _with("batch_size: 8", "batch_size: many"), [], "batch_size"),
    ("zero max_images", _with("max_images: 16", "max_images: 0"), [], "max_images"),
    ("zero log_every_steps", _with("warmup_steps: 0", "warmup_steps: 0, log_every_steps: 0"), [], "log_every_steps"),
    ("negative warmup", _with("warmup_steps: 0", "warmup_steps: -2"), [], "warmup_steps"),
    ("negative eval_points", _with("eval_points: 1", "eval_points: -1"), [], "eval_points"),
    ("negative ema", _with("eval_points: 1", "eval_points: 1, ema_halflife_images: -5"), [], "ema_halflife_images"),
    ("zero nll_batch", _with("grid_images: 4", "grid_images: 4, nll_batch: 0"), [], "nll_batch"),
    ("zero sample_repeats", _with("sample_repeats: 1", "sample_repeats: 0"), [], "sample_repeats"),
    ("zero sample_batch", _with("sample_batch: 4", "sample_batch: 0"), [], "sample_batch"),
    ("negative grid", _with("grid_images: 4", "grid_images: -1"), [], "grid_images"),
    ("one FID sample", _with("fid: false", "fid: true, fid_samples: 1"), [], "fid_samples"),
    ("one curve sample", _with("curve_fid_samples: 0", "curve_fid_samples: 1"), [], "curve_fid_samples"),
    ("zero FID references", _with("fid: false", "fid: false, fid_ref_images: 0"), [], "fid_ref_images"),
    ("zero sample cap", _with("grid_images: 4", "grid_images: 4, sample_seconds_cap: 0"), [], "sample_seconds_cap"),
    ("zero resolution", _with("synthetic_test: 8", "synthetic_test: 8, resolution: 0"), [], "resolution"),
    ("tiny resolution", _with("synthetic_test: 8", "synthetic_test: 8, resolution: 2"), [], "resolution"),
    ("scaling resolution 0", _with("grid_images: 4", "grid_images: 4, scaling_resolutions: [0]"), [], "scaling_resolutions"),
    ("scaling resolutions empty", _with("grid_images: 4", "grid_images: 4, scaling_resolutions: []"), [], "scaling_resolutions"),
    ("scaling resolutions repeated", _with("grid_images: 4", "grid_images: 4, scaling_resolutions: [16, 16]"), [], "scaling_resolutions"),
    ("no seeds", BASE + "seeds: []\n", [], "seeds"),
    ("negative seed", BASE + "seeds: [-1]\n", [], "seeds"),
    ("repeated seeds", BASE + "seeds: [1, 1]\n", [], "seeds"),
    ("no datasets", _with(NPZ, "datasets: []"), [], "datasets"),
    ("no models", _with("models: [dcgan]", "models: []"), [], "models"),
    ("unknown dataset", _with("name: synthetic,", "name: imagenet,"), [], "imagenet"),
    ("synthetic channels", _with("synthetic_size: 8", "synthetic_size: 8, synthetic_channels: 2"), [], "synthetic_channels"),
    ("npz without path", _with(NPZ, "datasets: [{name: npz}]"), [], "path"),
    ("suite name escapes", _with("name: rel", "name: ../escape"), [], "name"),
    ("suite name absolute", _with("name: rel", "name: /tmp/abs"), [], "name"),
    ("dataset label escapes", _with("synthetic_test: 8", "synthetic_test: 8, label: ../x"), [], "label"),
    ("unknown model", _with("models: [dcgan]", "models: [stylegan9]"), [], "stylegan9"),
    ("unknown preset", _with("models: [dcgan]", "models: [{name: dcgan, preset: huge}]"), [], "huge"),
    ("model config wrong type", _with("models: [dcgan]", "models: [{name: dcgan, config: {lr: fast}}]"), [], "config.lr"),
    ("model config unknown key", _with("models: [dcgan]", "models: [{name: dcgan, config: {latnet_dim: 3}}]"), [], "latnet_dim"),
    ("model config bad choice", _with("models: [dcgan]", "models: [{name: ddpm, config: {nll_strata: logg}}]"), [], "nll_strata"),
    ("model config out of range", _with("models: [dcgan]", "models: [{name: ddpm, config: {timesteps: 1}}]"), [], "timesteps"),
    ("zero latent_dim", _with("models: [dcgan]", "models: [{name: vae, config: {latent_dim: 0}}]"), [], "config.latent_dim"),
    ("negative width", _with("models: [dcgan]", "models: [{name: dcgan, config: {ngf: -4}}]"), [], "config.ngf"),
    ("nan learning rate", _with("models: [dcgan]", "models: [{name: dcgan, config: {lr: .nan}}]"), [], "config.lr"),
    ("empty model preset", _with("models: [dcgan]", "models: [{name: dcgan, preset: ''}]"), [], "preset"),
    ("empty device", BASE + "device: ''\n", [], "device"),
    ("huge batch", _with("batch_size: 8", "batch_size: 1000000000000"), [], "batch_size"),
    ("empty data root", _with("synthetic_test: 8", "synthetic_test: 8, root: ''"), [], "root"),
    ("model train override type", _with("models: [dcgan]", "models: [{name: dcgan, train: {batch_size: x}}]"), [], "batch_size"),
    ("unknown tolerance", BASE + "tolerances: {fidd: 0.1}\n", [], "fidd"),
    ("negative tolerance", BASE + "tolerances: {fid: -0.1}\n", [], "tolerances.fid"),
    ("env interpolation", BASE + "description: ${oc.env:HOME}\n", [], "interpolation"),
    ("bad reference", BASE + "description: ${nowhere.key}\n", [], "nowhere"),
    ("unknown device", BASE + "device: tpu\n", [], "tpu"),
    ("cuda without a GPU", BASE + "device: cuda:7\n", [], "cuda"),
    # --- the command line
    ("malformed override", BASE, ["train.batch_size=[1"], "train.batch_size"),
    ("override out of range", BASE, ["datasets.3.name=mnist"], "datasets"),
    ("override of a section", BASE, ["train=5"], "train"),
    ("override unknown key", BASE, ["train.bogus=1"], "bogus"),
    ("override bad value", BASE, ["train.batch_size=-3"], "batch_size"),
    ("override env", BASE, ["description=${oc.env:HOME}"], "interpolation"),
    ("bare word", BASE, ["batchsize"], "batchsize"),
    ("unknown flag", BASE, ["--bogus"], "--bogus"),
    ("empty --models", BASE, ["--models", ""], "--models"),
    ("--models not in suite", BASE, ["--models", "vae"], "vae"),
    ("missing plugin", BASE, ["--plugin", "/nonexistent/plugin.py"], "plugin"),
    ("bad --name", BASE, ["--name", "../x"], "--name"),
]


def _run_case(tmp_path, capsys, argv):
    results = tmp_path / "results"
    code = main(argv + ["--results", str(results)] if argv and argv[0] == "run" else argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err, results


@pytest.mark.parametrize("text, extra, expect", [c[1:] for c in SUITE_CASES], ids=[c[0] for c in SUITE_CASES])
def test_a_bad_suite_is_one_line_and_writes_nothing(tmp_path, capsys, text, extra, expect):
    suite = _suite(tmp_path, text)
    code, err, results = _run_case(tmp_path, capsys, ["run", str(suite), *extra])
    assert code == 2 and len(err) == 1 and expect in err[0] and err[0].startswith("trilemma"), err
    assert not results.exists() or not any(results.rglob("*"))


def _write_plugin(tmp_path, body):
    path = tmp_path / "plugin.py"
    path.write_text(body)
    return path


def _files_cases():
    """Cases that need files: (id, setup(tmp_path) -> argv, what the message must mention)."""
    def truncated_mnist(t):
        raw = t / "data" / "MNIST" / "raw"
        raw.mkdir(parents=True)
        for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                     "t10k-labels-idx1-ubyte"):
            src = Path(os.environ.get("TRILEMMA_DATA", "/nonexistent")) / "MNIST" / "raw" / name
            if not src.is_file():
                pytest.skip("TRILEMMA_DATA does not hold MNIST")
            data = src.read_bytes()
            (raw / name).write_bytes(data[:len(data) // 3] if name.startswith("train-images") else data)
        return ["run", str(_suite(t, _with(NPZ, f"datasets: [{{name: mnist, root: {t / 'data'}, download: false}}]")))]

    def npz_objects(t):
        folder = t / "objs"
        folder.mkdir()
        np.savez(folder / "train.npz", images=np.array([object(), object()], dtype=object))
        np.savez(folder / "test.npz", images=np.zeros((2, 8, 8, 1), np.uint8))
        return ["run", str(_suite(t, _npz_suite(folder)))]

    def npz_not_zip(t):
        folder = _npz(t / "nz")
        (folder / "train.npz").write_bytes(b"definitely not a zip archive")
        return ["run", str(_suite(t, _npz_suite(folder)))]

    def npz_truncated(t):
        folder = _npz(t / "tr")
        data = (folder / "train.npz").read_bytes()
        (folder / "train.npz").write_bytes(data[:len(data) // 2])
        return ["run", str(_suite(t, _npz_suite(folder)))]

    def npz_no_images(t):
        folder = t / "ni"
        folder.mkdir()
        np.savez(folder / "train.npz", pixels=np.zeros((2, 8, 8, 1), np.uint8))
        np.savez(folder / "test.npz", images=np.zeros((2, 8, 8, 1), np.uint8))
        return ["run", str(_suite(t, _npz_suite(folder)))]

    def npz_float(t):
        folder = _npz(t / "fl", train=np.zeros((4, 8, 8, 1), np.float32))
        return ["run", str(_suite(t, _npz_suite(folder)))]

    def npz_resolutions(t):
        folder = _npz(t / "rs", test=np.zeros((4, 16, 16, 1), np.uint8))
        return ["run", str(_suite(t, _npz_suite(folder)))]

    def npz_labels(t):
        folder = _npz(t / "lb", labels=np.zeros(3, np.int64))
        return ["run", str(_suite(t, _npz_suite(folder)))]

    def npz_missing(t):
        return ["run", str(_suite(t, _npz_suite(t / "nothing-here")))]

    def no_data_root(t):
        return ["run", str(_suite(t, _with(NPZ, f"datasets: [{{name: mnist, root: {t / 'empty'}, download: false}}]")))]

    def results_is_file(t):
        (t / "afile").write_text("x")
        return ["run", str(_suite(t)), "--results", str(t / "afile")]

    def results_unwritable(t):
        if os.geteuid() == 0:
            return ["run", str(_suite(t)), "--results", "/proc/trilemma-results"]
        locked = t / "locked"
        locked.mkdir(mode=0o500)
        return ["run", str(_suite(t)), "--results", str(locked / "results")]

    def weights(content):
        def setup(t):
            (t / "w.pth").write_bytes(content(t))
            return ["run", str(_suite(t, _with("fid: false", f"fid: true, fid_samples: 4, fid_weights: {t / 'w.pth'}")))]
        return setup

    class Payload:
        def __reduce__(self):
            return (Path.touch, (Path("/tmp/trilemma-payload-ran"),))

    def weights_missing(t):
        return ["run", str(_suite(t, _with("fid: false", f"fid: true, fid_samples: 4, fid_weights: {t / 'no.pth'}")))]

    def plugin_registers_nothing(t):
        return ["run", str(_suite(t)), "--plugin", str(_write_plugin(t, "x = 1\n"))]

    def plugin_raises(t):
        return ["run", str(_suite(t)), "--plugin", str(_write_plugin(t, "raise RuntimeError('broken plugin')\n"))]

    def suite_missing(t):
        return ["run", str(t / "nope.yaml")]

    def suite_is_folder(t):
        return ["run", str(t)]

    def suite_binary(t):
        (t / "bin.yaml").write_bytes(bytes(range(256)) * 4)
        return ["run", str(t / "bin.yaml")]

    def garbage_result(content):
        def setup(t):
            run = t / "res" / "rel" / "dcgan-synthetic-s0"
            run.mkdir(parents=True)
            (run / "result.json").write_bytes(content)
            return ["show", str(t / "res" / "rel")]
        return setup

    def compare_garbage(t):
        run = t / "res" / "rel" / "dcgan-synthetic-s0"
        run.mkdir(parents=True)
        (run / "result.json").write_text("{not json")
        return ["compare", str(t / "res" / "rel"), str(t / "res" / "rel")]

    def result_without(key):
        def setup(t):
            run = t / "res" / "rel" / "dcgan-synthetic-s0"
            run.mkdir(parents=True)
            result = {"schema": "trilemma.result/1", "status": "done", "config": {}, "measurements": {}}
            del result[key]
            (run / "result.json").write_text(json.dumps(result))
            return ["show", str(t / "res" / "rel")]
        return setup

    def suite_folder_is_a_file(t):
        (t / "res").mkdir()
        (t / "res" / "rel").write_text("a file where the suite's results go")
        return ["run", str(_suite(t)), "--results", str(t / "res")]

    def run_folder_is_a_file(t):
        (t / "res" / "rel").mkdir(parents=True)
        (t / "res" / "rel" / "dcgan-synthetic-s0").write_text("a file where the run's results go")
        return ["run", str(_suite(t)), "--results", str(t / "res")]

    def report_garbage(t):
        run = t / "res" / "rel" / "dcgan-synthetic-s0"
        run.mkdir(parents=True)
        (run / "result.json").write_text("[]")
        return ["report", "rel", "--results", str(t / "res"), "--out", str(t / "rep")]

    return [
        ("truncated MNIST file", truncated_mnist, "truncated"),
        ("npz of objects", npz_objects, "npz"),
        ("npz not a zip", npz_not_zip, "npz"),
        ("npz truncated", npz_truncated, "npz"),
        ("npz without images", npz_no_images, "images"),
        ("npz of floats", npz_float, "uint8"),
        ("npz splits differ", npz_resolutions, "shape"),
        ("npz labels wrong", npz_labels, "labels"),
        ("npz folder missing", npz_missing, "not found"),
        ("no data root", no_data_root, "MNIST"),
        ("results is a file", results_is_file, "--results"),
        ("results unwritable", results_unwritable, "--results"),
        ("FID weights garbage", weights(lambda t: b"\x00garbage" * 100), "FID weights"),
        ("FID weights pickle", weights(lambda t: pickle.dumps({"x": Payload()})), "FID weights"),
        ("FID weights not inception", weights(lambda t: _saved({"w": torch.zeros(2)})), "inception"),
        ("FID weights missing", weights_missing, "does not exist"),
        ("plugin registers nothing", plugin_registers_nothing, "registered no model"),
        ("plugin raises", plugin_raises, "broken plugin"),
        ("suite missing", suite_missing, "not found"),
        ("suite is a folder", suite_is_folder, "not found"),
        ("suite binary", suite_binary, "YAML"),
        ("garbage result.json", garbage_result(b"\x89\x00garbage"), "result.json"),
        ("truncated result.json", garbage_result(b'{"schema": "trilemma.result/1", "run'), "result.json"),
        ("empty result.json", garbage_result(b""), "result.json"),
        ("foreign result.json", garbage_result(b'{"schema": "other/2"}'), "not a trilemma result"),
        ("compare garbage", compare_garbage, "result.json"),
        ("report garbage", report_garbage, "result.json"),
        ("compare tolerance nan", lambda t: ["compare", str(t), str(t), "--tolerance", "nan"], "tolerance"),
        ("compare tolerance negative", lambda t: ["compare", str(t), str(t), "--tolerance", "-1"], "tolerance"),
        ("compare missing", lambda t: ["compare", str(t / "a"), str(t / "b")], "not a results folder"),
        ("eval not a run", lambda t: ["eval", str(t)], "no finished run"),
        ("sample no weights", lambda t: ["sample", str(t), "-n", "4"], "no saved model"),
        ("sample zero", lambda t: ["sample", str(t), "-n", "0"], "-n"),
        ("show missing", lambda t: ["show", str(t / "none")], "not a results folder"),
        ("result.json without config", result_without("config"), "'config'"),
        ("result.json without status", result_without("status"), "'status'"),
        ("results folder is a file", suite_folder_is_a_file, "is a file"),
        ("run folder is a file", run_folder_is_a_file, "is a file"),
        ("unknown bundled suite", lambda t: ["run", "no_such_suite"], "bundled suites"),
    ]


def _saved(obj) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


FILE_CASES = _files_cases()


@pytest.mark.parametrize("setup, expect", [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_a_bad_file_or_flag_is_one_line_and_writes_nothing(tmp_path, capsys, setup, expect):
    argv = setup(tmp_path)
    if argv[0] == "run" and "--results" not in argv:
        argv += ["--results", str(tmp_path / "results")]
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and expect in err[0] and err[0].startswith("trilemma"), err
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before, sorted(set(after) ^ set(before))
    assert not Path("/tmp/trilemma-payload-ran").exists()


def test_the_table_covers_every_class_with_sixty_cases():
    assert len(SUITE_CASES) + len(FILE_CASES) >= 60
    assert len({c[0] for c in SUITE_CASES + FILE_CASES}) == len(SUITE_CASES) + len(FILE_CASES)


def test_errors_reach_a_user_as_one_line_from_the_real_command(tmp_path):
    # Through a subprocess, as a user meets them: no traceback anywhere, exit status 2.
    for text, extra in (("- a\n- b\n", []), (BASE, ["train.batch_size=[1"]), (BASE, ["--models", ""])):
        suite = _suite(tmp_path, text)
        proc = subprocess.run([sys.executable, "-m", "trilemma", "run", str(suite), *extra, "--results",
                               str(tmp_path / "r")], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


# --- runs that go wrong ------------------------------------------------------------------------------

def test_a_diverging_gan_fails_with_its_step_and_the_suite_goes_on(tmp_path, capsys):
    suite = _suite(tmp_path, _with("models: [dcgan]", "models: [{name: dcgan, config: {lr: 1.0e12}, "
                                   "train: {max_images: 200, log_every_steps: 5}}, vae]"))
    assert main(["run", str(suite), "--results", str(tmp_path / "results")]) == 1
    gan = json.loads((tmp_path / "results" / "rel" / "dcgan-synthetic-s0" / "result.json").read_text())
    vae = json.loads((tmp_path / "results" / "rel" / "vae-synthetic-s0" / "result.json").read_text())
    assert gan["status"] == "failed" and "non-finite" in gan["error"]["message"]
    assert "steps" in gan["error"]["message"] or "step" in gan["error"]["message"]
    assert "fid" not in gan["measurements"] and vae["status"] == "done"


def test_a_pickle_in_a_checkpoint_never_runs_and_the_run_starts_afresh(tmp_path, capsys):
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    run_dir = tmp_path / "results" / "rel" / "dcgan-synthetic-s0"
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint.pt").write_bytes(pickle.dumps({"model": Payload()}))
    assert main(["run", str(_suite(tmp_path)), "--results", str(tmp_path / "results")]) == 0
    assert not marker.exists() and (run_dir / "checkpoint.pt.corrupt").exists()
    assert json.loads((run_dir / "result.json").read_text())["status"] == "done"


def test_a_corrupt_result_is_moved_aside_and_the_run_redone(tmp_path, capsys):
    run_dir = tmp_path / "results" / "rel" / "dcgan-synthetic-s0"
    run_dir.mkdir(parents=True)
    (run_dir / "result.json").write_text('{"schema": "trilemma.res')
    assert main(["run", str(_suite(tmp_path)), "--results", str(tmp_path / "results")]) == 0
    assert (run_dir / "result.json.corrupt").exists()
    assert json.loads((run_dir / "result.json").read_text())["status"] == "done"


def test_a_config_change_keeps_the_earlier_result(tmp_path, capsys):
    suite = _suite(tmp_path)
    results = tmp_path / "results"
    assert main(["run", str(suite), "--results", str(results)]) == 0
    run_dir = results / "rel" / "dcgan-synthetic-s0"
    first = json.loads((run_dir / "result.json").read_text())
    suite.write_text(_with("max_images: 16", "max_images: 24"))
    assert main(["run", str(suite), "--results", str(results)]) == 0
    kept = run_dir / "previous" / first["config_hash"]
    assert json.loads((kept / "result.json").read_text()) == first and (kept / "model.safetensors").exists()
    assert json.loads((run_dir / "result.json").read_text())["measurements"]["train"]["images_seen"] == 24
    assert "kept in" in capsys.readouterr().err


def test_overrides_never_touch_the_suite_s_own_results(tmp_path, capsys):
    suite, results = _suite(tmp_path), tmp_path / "results"
    assert main(["run", str(suite), "--results", str(results)]) == 0
    own = (results / "rel" / "dcgan-synthetic-s0" / "result.json").read_bytes()
    assert main(["run", str(suite), "--results", str(results), "train.max_images=24"]) == 0
    assert (results / "rel" / "dcgan-synthetic-s0" / "result.json").read_bytes() == own
    variants = [d.name for d in results.iterdir() if d.name.startswith("rel+")]
    assert len(variants) == 1
    assert main(["report", str(suite), "train.max_images=24", "--results", str(results), "--out",
                 str(tmp_path / "reports")]) == 0
    assert (tmp_path / "reports" / variants[0] / "table.md").exists()


def test_stale_temporaries_are_cleaned_and_results_are_world_readable(tmp_path, capsys):
    run_dir = tmp_path / "results" / "rel" / "dcgan-synthetic-s0"
    run_dir.mkdir(parents=True)
    (run_dir / ".result.json.abc123.tmp").write_text("left by a killed writer")
    assert main(["run", str(_suite(tmp_path)), "--results", str(tmp_path / "results")]) == 0
    assert not list(run_dir.glob(".*.tmp"))
    for name in ("result.json", "model.safetensors", "samples.png", "config.json"):
        assert (run_dir / name).stat().st_mode & 0o044 == 0o044, name


# --- kills and concurrency ------------------------------------------------------------------------

KILL_SUITE = """name: kill
preset: tiny
models: [vae]
datasets: [{name: synthetic, synthetic_size: 8, synthetic_train: 64, synthetic_test: 32}]
train: {batch_size: 8, max_images: 400, warmup_steps: 0, eval_points: 2, checkpoint_seconds: 0, log_every_steps: 5}
eval: {fid: false, curve_fid_samples: 0, sample_batch: 4, sample_repeats: 1, grid_images: 4, nll_batch: 8}
"""


def _command(suite, results):
    return [sys.executable, "-m", "trilemma", "run", str(suite), "--results", str(results)]


def _final(results):
    from safetensors.torch import load_file

    run_dir = results / "kill" / "vae-synthetic-s0"
    result = json.loads((run_dir / "result.json").read_text())
    m = result["measurements"]
    weights = load_file(run_dir / "model.safetensors")
    return (result["status"], m["train"]["images_seen"], m["train"]["steps"], m["nll"]["bpd"],
            [p["images"] for p in result["curve"]], (run_dir / "samples.png").read_bytes(),
            {k: v.tolist() for k, v in sorted(weights.items())})


def _kill_and_resume(tmp_path, delays):
    suite = _suite(tmp_path, KILL_SUITE, "kill.yaml")
    reference = tmp_path / "reference"
    subprocess.run(_command(suite, reference), check=True, capture_output=True, timeout=600)
    results = tmp_path / "killed"
    for delay in delays:  # SIGKILL after `delay` seconds; each attempt resumes the last one
        proc = subprocess.Popen(_command(suite, results), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    subprocess.run(_command(suite, results), check=True, capture_output=True, timeout=600)
    assert _final(results) == _final(reference)
    assert not list((results / "kill" / "vae-synthetic-s0").glob(".*.tmp"))


def test_a_killed_run_resumes_to_the_same_result(tmp_path):
    _kill_and_resume(tmp_path, [4.5])


@pytest.mark.slow
def test_runs_killed_at_random_points_resume_to_the_same_result(tmp_path):
    rng = np.random.default_rng(1)
    _kill_and_resume(tmp_path, list(rng.uniform(2.5, 9.0, size=6)))


def test_two_concurrent_runners_train_each_run_once(tmp_path):
    suite = _suite(tmp_path, _with("models: [dcgan]", "models: [dcgan, vae, realnvp, gon]"))
    results = tmp_path / "results"
    procs = [subprocess.Popen(_command(suite, results), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    for run in ("dcgan", "vae", "realnvp", "gon"):
        run_dir = results / "rel" / f"{run}-synthetic-s0"
        kinds = [json.loads(line)["kind"] for line in (run_dir / "log.jsonl").read_text().splitlines()]
        assert kinds.count("start") == 1 and "resume" not in kinds, (run, kinds)
        assert json.loads((run_dir / "result.json").read_text())["status"] == "done"
    assert not list(results.rglob("*.tmp")) and not list(results.rglob("*.corrupt"))
