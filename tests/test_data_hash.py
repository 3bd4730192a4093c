"""Data identified by content: a run's config hash names each split by a hash of its files.

A changed file makes a finished run stale; the same files under another data root do not; a result
written before (its data named by the resolved root) stays done while the root is where it was. The
committed reference (results/archive/mnist-30s-three-seeds) stays done with the data of this workplace.
"""
import json

import numpy as np
import pytest

from trilemma.results.io import atomic_write_json, config_hash
from trilemma.results.schema import SCHEMA
from trilemma.run import data
from trilemma.run.data import DataConfig, data_identity
from trilemma.run.runner import results_config, status_of
from trilemma.run.settings import Run, RunConfig, expand, load_suite

from conftest import REPO

SMOKE = REPO / "suites" / "smoke.yaml"


@pytest.fixture(autouse=True)
def hash_cache(tmp_path, monkeypatch):
    """A cache of this test's own, and no hash remembered from another test."""
    monkeypatch.setattr(data, "HASH_CACHE", tmp_path / "cache" / "data-hashes.json")
    monkeypatch.setattr(data, "_SEEN", {})
    return tmp_path / "cache" / "data-hashes.json"


def _write_npz(folder, seed):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", 32), ("test", 8)):
        np.savez(folder / f"{split}.npz", images=rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8))


def _run(root):
    """The smoke suite's DCGAN on the npz data set ``root/digits`` (one results folder whatever the root)."""
    run = expand(load_suite(SMOKE, [f"datasets=[{{name: npz, path: digits, root: {root}}}]"]), ["dcgan"])[0]
    return Run("smoke", run.name, run.config)


def _done(results, run, config):
    """A finished result of ``run`` whose hashed config is ``config``."""
    atomic_write_json(results / run.suite / run.name / "result.json",
                      {"schema": SCHEMA, "suite": run.suite, "run": run.name, "status": "done",
                       "config_hash": config_hash(config), "config": config, "measurements": {}})


def test_each_split_is_named_by_its_contents_and_hashed_once(tmp_path, hash_cache, monkeypatch):
    _write_npz(tmp_path / "a" / "digits", seed=0)
    cfg = DataConfig(name="npz", path="digits", root=str(tmp_path / "a"))
    first = data_identity(cfg)
    assert set(first) == {"train", "test"} and first["train"] != first["test"]
    cached = json.loads(hash_cache.read_text())  # path|size|mtime -> sha256, one per file
    assert len(cached) == 2 and all(str(tmp_path / "a" / "digits") in key for key in cached)
    reads = []
    monkeypatch.setattr(data, "_SEEN", {})
    monkeypatch.setattr(data, "_sha256", lambda path: reads.append(path))  # the bytes are not read again
    assert data_identity(cfg) == first and reads == []
    assert data_identity(DataConfig(name="synthetic")) is None


def test_a_changed_file_makes_a_run_stale_and_a_moved_root_does_not(tmp_path):
    _write_npz(tmp_path / "a" / "digits", seed=0)
    run, results = _run(tmp_path / "a"), tmp_path / "results"
    _done(results, run, results_config(run))
    assert results_config(run)["inputs"]["data"] == data_identity(run.config.data)
    assert status_of(results, run) == "done"
    before = config_hash(results_config(run))
    # The same files under another root: the run is the same run.
    (tmp_path / "a").rename(tmp_path / "b")
    moved = _run(tmp_path / "b")
    assert status_of(results, moved) == "done" and config_hash(results_config(moved)) == before
    # Other images of the same shape in train.npz: stale.
    _write_npz(tmp_path / "b" / "digits", seed=1)
    assert status_of(results, moved) == "stale"


def test_a_result_that_named_its_data_root_stays_done_where_the_root_is(tmp_path):
    _write_npz(tmp_path / "a" / "digits", seed=0)
    run, results = _run(tmp_path / "a"), tmp_path / "results"
    legacy = results_config(run)
    legacy["inputs"] = {"data_root": str((tmp_path / "a").resolve()),  # as results before this were written
                        **{k: v for k, v in legacy["inputs"].items() if k != "data"}}
    _done(results, run, legacy)
    assert status_of(results, run) == "done"
    (tmp_path / "a").rename(tmp_path / "b")  # its root elsewhere: the legacy hash no longer matches
    assert status_of(results, _run(tmp_path / "b")) == "stale"


def test_the_committed_reference_is_done_with_this_workplaces_data(data_root, fid_weights, monkeypatch):
    reference = REPO / "results" / "archive" / "mnist-30s-three-seeds"
    if not (reference / "vae-mnist-s0" / "config.json").is_file():
        pytest.skip("the three-seed reference is not in this checkout")
    stored = json.loads((reference / "vae-mnist-s0" / "result.json").read_text())
    if stored["config"]["inputs"].get("data_root") != str(data_root):
        pytest.skip(f"the three-seed reference was measured with the data root {stored['config']['inputs'].get('data_root')}")
    for name in ("vae-mnist-s0", "dcgan-mnist-s2"):
        config = RunConfig.from_dict(json.loads((reference / name / "config.json").read_text()), name)
        assert status_of(reference.parent, Run(reference.name, name, config)) == "done", name
