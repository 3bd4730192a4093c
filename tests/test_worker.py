"""Each run executes in a fresh worker process: `trilemma run` stays the parent (claims, schedules,
collects), a worker that dies is a failed run with the reason and the suite goes on, and a run's CPU
peak memory is its own."""
import json
import sys

import pytest

from trilemma.cli import main
from trilemma.contract import registry
from trilemma.run import execution

from conftest import REPO

PLUGIN = REPO / "tests" / "fixtures" / "plugin" / "pixel_means.py"

SUITE = """name: workers
preset: tiny
models: [{models}]
plugins: [{plugin}]
datasets: [{{name: synthetic, synthetic_size: 8, synthetic_train: 32, synthetic_test: 8}}]
train: {{batch_size: 8, max_images: 16, warmup_steps: 0, eval_points: 1}}
eval: {{fid: false, curve_fid_samples: 0, sample_batch: 4, sample_repeats: 1, grid_images: 4}}
"""



def _dying_family(path):
    """The plugin's family renamed, its training step killing its own process (as the kernel's
    out-of-memory killer would)."""
    text = PLUGIN.read_text().replace('name = "pixel_means"', 'name = "sudden_death"')
    text = text.replace("class PixelMeans(", "class SuddenDeath(").replace(
        "    def loss(self, x):\n", "    def loss(self, x):\n        os.kill(os.getpid(), signal.SIGKILL)\n")
    path.write_text("import os\nimport signal\n" + text)
    return path


@pytest.fixture(autouse=True)
def _registry_as_it_was():
    """The plugins these tests load register families in this process too: gone after each test."""
    registry.model_names()  # the installed families discovered first, so that they are part of what is kept
    state = {name: getattr(registry, name) for name in vars(registry)
             if name.startswith("_") and not name.startswith("__")
             and isinstance(getattr(registry, name), (dict, list))}
    saved = {name: value.copy() for name, value in state.items()}
    modules = set(sys.modules)
    yield
    for name in set(sys.modules) - modules:  # the plugin files' modules: imported afresh next time
        if name.startswith("trilemma_plugin_"):
            del sys.modules[name]
    for name, value in state.items():
        value.clear()
        value.update(saved[name]) if isinstance(value, dict) else value.extend(saved[name])


def _suite(tmp_path, models, plugin=PLUGIN):
    path = tmp_path / "suite.yaml"
    path.write_text(SUITE.format(models=", ".join(models), plugin=plugin))
    return path


def _result(tmp_path, run):
    return json.loads((tmp_path / "results" / "workers" / run / "result.json").read_text())


def test_each_run_executes_in_a_fresh_worker_with_its_own_peak_memory(tmp_path):
    suite = _suite(tmp_path, ["dcgan", "pixel_means"])
    assert main(["run", str(suite), "--results", str(tmp_path / "results")]) == 0
    for run in ("dcgan-synthetic-s0", "pixel_means-synthetic-s0"):  # a plugin family too
        result = _result(tmp_path, run)
        assert result["status"] == "done"
        assert result["measurements"]["train"]["process"] == "fresh worker"
        memory = result["measurements"]["memory"]["train"]
        assert memory["kind"] == "cpu_peak_rss" and memory["peak_bytes"] >= memory["start_bytes"] > 0
    assert execution._process == "suite process"  # this process ran none of it


def test_in_process_runs_in_the_suite_process(tmp_path):
    suite = _suite(tmp_path, ["dcgan"])
    assert main(["run", str(suite), "--results", str(tmp_path / "results"), "--in-process"]) == 0
    assert _result(tmp_path, "dcgan-synthetic-s0")["measurements"]["train"]["process"] == "suite process"


def test_a_worker_that_dies_is_a_failed_run_and_the_suite_goes_on(tmp_path, capsys):
    suite = _suite(tmp_path, ["sudden_death", "dcgan"], plugin=_dying_family(tmp_path / "dying.py"))
    assert main(["run", str(suite), "--results", str(tmp_path / "results")]) == 1
    died = _result(tmp_path, "sudden_death-synthetic-s0")
    assert died["status"] == "failed" and died["error"]["type"] == "WorkerDied"
    assert "killed by SIGKILL" in died["error"]["message"]
    assert _result(tmp_path, "dcgan-synthetic-s0")["status"] == "done"
    out = capsys.readouterr().out
    assert "1 done, 1 failed" in out and "killed by SIGKILL" in out, out
