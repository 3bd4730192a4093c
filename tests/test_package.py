"""The installable package: its layers import downwards only, the wheel holds what it needs, outside
models run from the command line, settings are type-checked at load, saved models re-measure."""
import ast
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from trilemma.contract.errors import TrilemmaError
from trilemma.run.settings import load_suite

from conftest import REPO

PLUGIN = REPO / "tests" / "fixtures" / "plugin" / "pixel_means.py"
# Each package of the harness and the layer it sits on; a module may import its own package and the
# packages of lower layers, nothing beside or above it.
LAYERS = {"contract": 0, "models": 1, "results": 1, "measure": 2, "run": 3, "report": 3, "cli": 4,
          "__main__": 5}


def trilemma(*args, cwd=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "trilemma", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=timeout)


def _modules():
    """(module name, package, imported trilemma modules) of every file of the package."""
    out = []
    for root, prefix in ((REPO / "harness", "trilemma"), (REPO / "models", "trilemma.models")):
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([prefix, *parts])
            package = "models" if prefix.endswith("models") else (parts[0] if parts else "__init__")
            imports = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    imports.add(node.module)
                elif isinstance(node, ast.Import):
                    imports.update(a.name for a in node.names)
            out.append((name, package, {i for i in imports if i.split(".")[0] in ("trilemma", "harness", "models")}))
    return out


def _package_of(module: str) -> str:
    parts = module.split(".")
    if parts[:2] == ["trilemma", "models"]:
        return "models"
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_import_points_down_a_layer():
    for name, package, imports in _modules():
        for imported in imports:
            assert imported.startswith("trilemma"), f"{name} imports {imported}: use the trilemma package"
            target = _package_of(imported)
            if target == package or package == "__init__":
                continue
            assert LAYERS[target] < LAYERS[package], f"{name} ({package}) imports {imported} ({target})"


def test_the_import_graph_has_no_circle():
    graph = {name: {i for i in imports} for name, _, imports in _modules()}
    state: dict[str, int] = {}

    def visit(node, path):
        if state.get(node) == 1:
            raise AssertionError("import circle: " + " -> ".join(path + [node]))
        if state.get(node) == 2 or node not in graph:
            return
        state[node] = 1
        for nxt in graph[node]:
            visit(nxt, path + [node])
        state[node] = 2

    for node in graph:
        visit(node, [])


def test_no_family_imports_another():
    # What two families share lives in trilemma.models.parts (or blocks, unet, ode), not in one of them.
    from importlib.metadata import entry_points

    families = {ep.value.split(":")[0] for ep in entry_points(group="trilemma.models")}
    for name, _, imports in _modules():
        if name in families:
            others = sorted(i for i in imports if i in families and i != name)
            assert not others, f"{name} imports the family {', '.join(others)}: share it through trilemma.models.parts"


def test_the_wheel_installs_one_package_with_its_data(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    wheel, = tmp_path.glob("trilemma-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"trilemma", wheel.name.split("-py")[0] + ".dist-info"}
    for needed in ("trilemma/contract/seed_table.csv", "trilemma/models/dcgan.py", "trilemma/models/README.md",
                   "trilemma/report/figures.py", "trilemma/__main__.py"):
        assert needed in names, needed
    # Every bundled suite, where `trilemma run NAME` finds it in an installed package.
    suites = sorted(p.name for p in (REPO / "suites").glob("*.yaml"))
    assert sorted(n.split("/")[-1] for n in names if n.startswith("trilemma/suites/")) == suites and suites
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "[trilemma.models]" in entry_points and "dcgan = trilemma.models.dcgan:DCGAN" in entry_points


def test_a_project_with_its_own_models_package_still_lists_every_family(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("")
    from importlib.metadata import entry_points

    proc = trilemma("list", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    listed = [line.split()[0] for line in proc.stdout.split("\n\n")[0].splitlines()[1:]]  # then its legend
    # The installed entry points (this process's registry may hold test-registered plugins too).
    built_in = {ep.name for ep in entry_points(group="trilemma.models")}
    assert sorted(listed) == sorted(built_in) and len(listed) >= 10


def test_listing_the_models_imports_no_family_dependency():
    code = ("import sys; from trilemma.contract.registry import registered; registered(); "
            "print('geomloss' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr


def test_an_outside_model_runs_through_run_show_and_report(tmp_path):
    suite = tmp_path / "outside.yaml"
    suite.write_text(f"name: outside\nplugins: [{PLUGIN}]\npreset: tiny\nmodels: [pixel_means, dcgan]\n"
                     "datasets: [{name: synthetic, synthetic_size: 8, synthetic_train: 64, synthetic_test: 32}]\n"
                     "train: {batch_size: 16, max_images: 32, warmup_steps: 1, eval_points: 1}\n"
                     "eval: {fid: false, curve_fid_samples: 0, sample_batch: 4, sample_repeats: 1, "
                     "grid_images: 4}\n")
    results, reports = tmp_path / "results", tmp_path / "reports"
    proc = trilemma("run", str(suite), "--results", str(results), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    run_dir = results / "outside" / "pixel_means-synthetic-s0"
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "done" and 7.0 < result["measurements"]["nll"]["bpd"] < 8.5
    assert (run_dir / "model.safetensors").is_file()
    shown = trilemma("show", str(results / "outside"), cwd=tmp_path)
    assert shown.returncode == 0 and "pixel_means-synthetic-s0" in shown.stdout, shown.stderr
    built = trilemma("report", "outside", "--results", str(results), "--out", str(reports), cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    assert "`pixel_means`" in (reports / "outside" / "table.md").read_text(encoding="utf-8")
    # The same model from the command line's --plugin instead of the suite's plugins.
    listed = trilemma("list", "--plugin", str(PLUGIN), cwd=tmp_path)
    assert listed.returncode == 0 and any(l.startswith("pixel_means ") for l in listed.stdout.splitlines())


@pytest.mark.parametrize("config, key", [("{lr: fast}", "config.lr"), ("{ngf: 2.5}", "config.ngf"),
                                          ("{latent_dim: [3]}", "config.latent_dim")])
def test_a_model_config_of_the_wrong_type_is_one_line_at_load(tmp_path, config, key):
    suite = tmp_path / "bad.yaml"
    suite.write_text(f"name: t\nmodels:\n  - {{name: dcgan, preset: tiny, config: {config}}}\n")
    with pytest.raises(TrilemmaError) as e:
        load_suite(suite)
    message = str(e.value)
    assert str(suite) in message and "dcgan" in message and key in message and "\n" not in message
    proc = trilemma("run", str(suite), "--results", str(tmp_path / "results"))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and key in proc.stderr
    assert not (tmp_path / "results").exists()


def test_a_literal_choice_names_the_allowed_values(tmp_path):
    suite = tmp_path / "bad.yaml"
    suite.write_text("name: t\nmodels:\n  - {name: ddpm, preset: tiny, config: {nll_strata: logg}}\n")
    with pytest.raises(TrilemmaError, match=r"config.nll_strata' must be one of 'log', 'uniform'"):
        load_suite(suite)


def test_models_all_means_every_registered_family(tmp_path):
    from trilemma.contract.registry import model_names

    suite = tmp_path / "all.yaml"
    suite.write_text("name: t\npreset: tiny\nmodels: all\ntrain: {max_images: 16}\n")
    assert [e.name for e in load_suite(suite).models] == model_names()
    suite.write_text("name: t\npreset: tiny\nmodels: [all, {name: ddpm, config: {timesteps: 70}}]\ntrain: {max_images: 16}\n")
    entries = {e.name: e for e in load_suite(suite).models}
    assert sorted(entries) == sorted(model_names()) and entries["ddpm"].config == {"timesteps": 70}
    assert all(e.preset == "tiny" for e in entries.values())


def test_eval_reproduces_the_run_fid_and_records_a_larger_n(tmp_path, fid_weights):
    suite = tmp_path / "fid.yaml"
    suite.write_text("name: fid\nmodels: [{name: dcgan, preset: tiny}]\n"
                     "datasets: [{name: synthetic, synthetic_size: 16, synthetic_train: 128, synthetic_test: 16}]\n"
                     "train: {batch_size: 16, max_images: 64, warmup_steps: 1, eval_points: 1}\n"
                     f"eval: {{fid_samples: 16, fid_ref_images: 24, curve_fid_samples: 0, sample_batch: 8, "
                     f"sample_repeats: 1, grid_images: 4, fid_cache: {tmp_path / 'cache'}, nll: false}}\n")
    from trilemma.cli import main

    results = tmp_path / "results"
    assert main(["run", str(suite), "--results", str(results)]) == 0
    run_dir = results / "fid" / "dcgan-synthetic-s0"
    own = json.loads((run_dir / "result.json").read_text())["measurements"]["fid"]
    assert own["real_data"]["fid_samples"] == 16 and own["real_data"]["fid"] > 0  # the row the table's FID is read against
    # A result written without it (before it was stored) gets it on the next run, without retraining.
    result = json.loads((run_dir / "result.json").read_text())
    del result["measurements"]["fid"]["real_data"]
    (run_dir / "result.json").write_text(json.dumps(result))
    assert main(["run", str(suite), "--results", str(results)]) == 0
    again = json.loads((run_dir / "result.json").read_text())
    assert again["measurements"]["fid"] == own and again["measurements"]["train"] == result["measurements"]["train"]
    assert main(["eval", str(run_dir)]) == 0
    assert main(["eval", str(run_dir), "--fid-samples", "24"]) == 0
    result = json.loads((run_dir / "result.json").read_text())
    same, larger = result["evaluations"]
    assert same["fid"]["fid_samples"] == 16 and abs(same["fid"]["fid"] - own["fid"]) <= 1e-6 * own["fid"]
    assert larger["fid"]["fid_samples"] == 24 and result["measurements"]["fid"] == own  # never overwritten
    grid = tmp_path / "grid.png"
    assert main(["sample", str(run_dir), "-n", "9", "-o", str(grid)]) == 0
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_scores_a_saved_flow_by_the_importance_weighted_nll(tmp_path):
    suite = tmp_path / "nll.yaml"
    suite.write_text("name: nll\nmodels: [{name: realnvp, preset: tiny}]\n"
                     "datasets: [{name: synthetic, synthetic_size: 8, synthetic_train: 64, synthetic_test: 16}]\n"
                     "train: {batch_size: 16, max_images: 32, warmup_steps: 1, eval_points: 0}\n"
                     "eval: {fid: false, curve_fid_samples: 0, sample_batch: 4, sample_repeats: 1, grid_images: 0}\n")
    from trilemma.cli import main

    results = tmp_path / "results"
    assert main(["run", str(suite), "--results", str(results)]) == 0
    run_dir = results / "nll" / "realnvp-synthetic-s0"
    assert main(["eval", str(run_dir), "--nll-draws", "0"]) == 2  # a one-line error
    assert main(["eval", str(run_dir), "--nll-draws", "8"]) == 0
    result = json.loads((run_dir / "result.json").read_text())
    own, (weighted,) = result["measurements"]["nll"], result["evaluations"]
    assert own["kind"] == "bound" and weighted["nll"]["kind"] == "estimate"
    assert weighted["nll"]["protocol"]["dequantization_draws"] == 8 and "fid" not in weighted


def test_checkpoints_load_without_unpickling(tmp_path):
    import pickle

    import torch

    from trilemma.run.checkpoint import load_checkpoint

    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "checkpoint.pt"
    path.write_bytes(pickle.dumps({"model": Payload()}))
    with pytest.raises(TrilemmaError, match="checkpoint.pt.corrupt"):
        load_checkpoint(path, torch.device("cpu"))
    assert not marker.exists() and (tmp_path / "checkpoint.pt.corrupt").exists() and not path.exists()
