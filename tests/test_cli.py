"""User errors end in one line, exit status 2, no traceback and nothing written."""
import subprocess
import sys

import pytest

from trilemma.run.settings import load_suite
from trilemma.contract.errors import TrilemmaError

from conftest import REPO

SMOKE = REPO / "suites" / "smoke.yaml"


def trilemma(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "trilemma", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, env=env, timeout=300)


def write_suite(tmp_path, text):
    path = tmp_path / "suite.yaml"
    path.write_text(text)
    return path


def test_typo_in_a_suite_names_key_and_file(tmp_path):
    path = write_suite(tmp_path, "name: t\ntrain:\n  max_imagse: 10\nmodels:\n  - {name: dcgan}\n")
    with pytest.raises(TrilemmaError) as e:
        load_suite(path)
    assert "max_imagse" in str(e.value) and str(path) in str(e.value)


def test_wrong_type_names_key(tmp_path):
    path = write_suite(tmp_path, "name: t\ntrain:\n  batch_size: many\nmodels:\n  - {name: dcgan}\n")
    with pytest.raises(TrilemmaError, match="batch_size"):
        load_suite(path)


def test_typo_in_a_model_config_names_key(tmp_path):
    path = write_suite(tmp_path, "name: t\nmodels:\n  - {name: dcgan, config: {latnet_dim: 3}}\n")
    with pytest.raises(TrilemmaError, match="latnet_dim"):
        load_suite(path)


def test_command_line_override_typo(tmp_path):
    with pytest.raises(TrilemmaError, match="eval.fid_smaples"):
        load_suite(SMOKE, ["eval.fid_smaples=3"])


@pytest.mark.parametrize("case", ["typo", "unknown_model", "missing_data"])
def test_errors_are_one_line_and_leave_nothing(tmp_path, case):
    results = tmp_path / "results"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    if case == "typo":
        suite = write_suite(tmp_path, "name: t\neval:\n  fid_sampels: 5\nmodels:\n  - {name: dcgan}\n")
        expect = "fid_sampels"
    elif case == "unknown_model":
        suite = write_suite(tmp_path, "name: t\nmodels:\n  - {name: stylegan9}\n")
        expect = "stylegan9"
    else:
        suite = write_suite(tmp_path, f"name: t\ndatasets:\n  - {{name: mnist, root: {tmp_path / 'nodata'}, "
                                      "download: false}\ntrain: {max_images: 16}\nmodels:\n  - {name: dcgan, preset: tiny}\n")
        expect = "train-images-idx3-ubyte"
    proc = trilemma("run", str(suite), "--results", str(results), env=env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert not any(p.is_file() for p in results.rglob("*")) if results.exists() else True


def test_dry_run_prints_the_runs():
    proc = trilemma("run", str(SMOKE), "--dry-run", "--results", "/nonexistent")
    assert proc.returncode == 0, proc.stderr
    assert "runs in suite 'smoke'" in proc.stdout and "dcgan-synthetic-s0" in proc.stdout
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == len(_built_in()) + 2  # a header, one line per run, the count
    dcgan = next(line for line in lines if line.startswith("dcgan-synthetic-s0"))
    assert dcgan.split()[1:5] == ["dcgan", "tiny", "synthetic", "0"] and "64 images, batch 16" in dcgan
    assert dcgan.split()[-1] == "new" and "model_config" not in proc.stdout
    assert dcgan.split()[-3].replace(",", "").isdigit()  # its parameter count
    verbose = trilemma("run", str(SMOKE), "--dry-run", "--verbose", "--results", "/nonexistent")
    assert "model_config" in verbose.stdout and "# dcgan-synthetic-s0 [new]" in verbose.stdout


@pytest.mark.parametrize("command", ["run", "status", "list", "suites", "show", "report", "compare", "eval",
                                     "sample", "profile"])
def test_every_command_has_help(command):
    proc = trilemma(command, "--help")
    assert proc.returncode == 0 and "usage: trilemma" in proc.stdout


def _built_in():
    """The installed families (this process's registry may hold plugins other tests registered)."""
    from importlib.metadata import entry_points

    from trilemma.contract.registry import get_model_class

    return {ep.name: get_model_class(ep.name) for ep in entry_points(group="trilemma.models")}


def test_list_shows_every_model_with_capabilities():
    proc = trilemma("list")
    assert proc.returncode == 0
    table, variants, legend = proc.stdout.split("\n\n")
    assert variants.startswith("variants:")
    for name, cls in _built_in().items():
        line = next(l for l in table.splitlines() if l.startswith(name + " "))
        assert cls.capabilities.density in line and cls.capabilities.sampling in line
    assert "density" in legend and "marks" in legend  # what the columns and marks mean
