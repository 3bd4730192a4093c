"""Weights trained elsewhere: a suite's `weights:` measures them without training, `trilemma export`
writes what it reads back, and only tensor formats that fit the configured model load."""
import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch
import yaml

from trilemma.cli import main
from trilemma.contract.errors import TrilemmaError
from trilemma.results.protocol import fingerprint
from trilemma.results.schema import summarize
from trilemma.run.settings import load_suite

DATA = "datasets: [{name: synthetic, synthetic_size: 8, synthetic_train: 64, synthetic_test: 16}]\n"
TRAIN = "train: {batch_size: 16, max_images: 32, warmup_steps: 1, eval_points: 0, log_every_steps: 1}\n"
NO_FID = "eval: {fid: false, curve_fid_samples: 0, sample_batch: 4, sample_repeats: 1, grid_images: 4}\n"


def _suite(folder: Path, name: str, entry: dict, evaluation: str = NO_FID, train: str = TRAIN) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(f"name: {name}\nmodels: [{json.dumps(entry)}]\n{DATA}{train}{evaluation}")
    return path


def _result(results: Path, suite: str, run: str) -> dict:
    return json.loads((results / suite / run / "result.json").read_text())


def _round_trip(tmp_path: Path, model: str, evaluation: str, extra: dict = ()) -> tuple[dict, dict, Path]:
    """Train ``model`` (tiny) by `trilemma run`, export it, and measure the export through `weights:`."""
    results, run = tmp_path / "results", f"{model}-synthetic-s0"
    assert main(["run", str(_suite(tmp_path, "trained", {"name": model, "preset": "tiny"}, evaluation)),
                 "--results", str(results)]) == 0
    export = tmp_path / "export"
    assert main(["export", str(results / "trained" / run), "-o", str(export)]) == 0
    entry = {"name": model, "preset": "tiny", "weights": "export", **dict(extra)}
    assert main(["run", str(_suite(tmp_path, "measured", entry, evaluation)), "--results", str(results)]) == 0
    return _result(results, "trained", run), _result(results, "measured", run), export


def test_an_exported_model_measured_through_weights_gives_the_same_nll_and_parameters(tmp_path, capsys):
    trained, measured, export = _round_trip(tmp_path, "realnvp", NO_FID, {"train_speed": True})
    a, b = trained["measurements"], measured["measurements"]
    assert b["nll"]["bpd"] == a["nll"]["bpd"] and b["nll"]["n_images"] == a["nll"]["n_images"]
    assert b["params"] == a["params"]
    run = "realnvp-synthetic-s0"
    assert (tmp_path / "results/measured" / run / "samples.png").read_bytes() == \
        (tmp_path / "results/trained" / run / "samples.png").read_bytes()  # the same samples
    # Marked pretrained, by the weights' hash: the trained run's own bytes, exported unchanged.
    sha = hashlib.sha256((tmp_path / "results/trained" / run / "model.safetensors").read_bytes()).hexdigest()
    assert measured["provenance"]["weights"]["sha256"] == sha == measured["config"]["inputs"]["weights"]
    assert measured["provenance"]["weights"]["format"] == "trilemma export"
    assert summarize(measured).pretrained and not summarize(trained).pretrained
    assert fingerprint(measured)["weights"] == f"pretrained {sha}" and fingerprint(trained)["weights"] is None
    assert fingerprint(measured)["budget"] is None  # no budget trained the weights here
    # Training speed was asked for: a short timed run from the weights, marked so; no curve.
    assert b["train"]["from_pretrained"] is True and b["train"]["images_seen"] == 32 and measured["curve"] == []
    # The model card names the family and the measured row; its suite entry reads the folder back.
    card = (export / "README.md").read_text()
    assert "`realnvp`" in card and "bits/dim" in card and sha in card
    snippet = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert snippet["models"][0]["name"] == "realnvp" and snippet["models"][0]["preset"] == "tiny"
    # Every table marks the row: `trilemma show` and the report.
    capsys.readouterr()
    assert main(["show", str(tmp_path / "results" / "measured")]) == 0
    assert f"{run} (pretrained)" in capsys.readouterr().out
    assert main(["report", "measured", "--results", str(tmp_path / "results"),
                 "--out", str(tmp_path / "reports")]) == 0
    table = (tmp_path / "reports/measured/table.md").read_text()
    assert "`realnvp` (pretrained)" in table and "pretrained, not trained here" in table


def test_an_exported_model_measured_through_weights_gives_the_same_fid(tmp_path, fid_weights):
    evaluation = (f"eval: {{fid_samples: 16, fid_ref_images: 24, curve_fid_samples: 0, sample_batch: 8, "
                  f"sample_repeats: 1, grid_images: 4, fid_cache: {tmp_path / 'cache'}, nll: false}}\n")
    trained, measured, _ = _round_trip(tmp_path, "dcgan", evaluation)
    a, b = trained["measurements"], measured["measurements"]
    assert b["fid"]["fid_samples"] == a["fid"]["fid_samples"] == 16
    assert b["fid"]["fid"] == pytest.approx(a["fid"]["fid"], rel=1e-6)
    assert b["params"] == a["params"] and "train" not in b  # no training speed unless asked


def _trained_state(tmp_path: Path) -> tuple[Path, dict]:
    """A tiny realnvp trained and measured by `trilemma run`; its suite and its weights' tensors."""
    from safetensors.torch import load_file

    results = tmp_path / "results"
    suite = _suite(tmp_path, "trained", {"name": "realnvp", "preset": "tiny"})
    assert main(["run", str(suite), "--results", str(results)]) == 0
    return results, load_file(results / "trained" / "realnvp-synthetic-s0" / "model.safetensors")


def _error(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err  # one line, no traceback
    return err


def test_a_state_dict_file_loads_and_a_mismatched_one_names_the_first_wrong_key(tmp_path, capsys):
    from safetensors.torch import save_file

    results, tensors = _trained_state(tmp_path)
    # A plain state dict, as torch.save and safetensors write it, loads and gives the run's NLL.
    torch.save(tensors, tmp_path / "weights.pt")
    suite = _suite(tmp_path, "from_pt", {"name": "realnvp", "preset": "tiny", "weights": "weights.pt"})
    assert main(["run", str(suite), "--results", str(results)]) == 0
    own = _result(results, "trained", "realnvp-synthetic-s0")["measurements"]["nll"]["bpd"]
    assert _result(results, "from_pt", "realnvp-synthetic-s0")["measurements"]["nll"]["bpd"] == own
    # A key missing, a key renamed, a shape changed: each one line naming the key, nothing run.
    first, second = list(tensors)[:2]
    cases = {"missing": ({k: v for k, v in tensors.items() if k != second}, f"'{second}' is missing"),
             "shape": ({**tensors, first: torch.zeros(3, *tensors[first].shape)}, f"'{first}' has shape (3,")}
    for name, (state, expected) in cases.items():
        save_file(state, tmp_path / f"{name}.safetensors")
        suite = _suite(tmp_path, name, {"name": "realnvp", "preset": "tiny", "weights": f"{name}.safetensors"})
        err = _error(capsys, ["run", str(suite), "--results", str(results)])
        assert expected in err and f"{name}.safetensors does not fit realnvp" in err
        assert not (results / name / "realnvp-synthetic-s0").exists()  # refused before anything ran
    torch.save({**tensors, "extra.weight": torch.zeros(2)}, tmp_path / "extra.pt")
    suite = _suite(tmp_path, "extra", {"name": "realnvp", "preset": "tiny", "weights": "extra.pt"})
    err = _error(capsys, ["run", str(suite), "--results", str(results)])
    assert "'extra.weight' is in the weights but not in the model" in err


class _Payload:
    """Unpickling it would create a file: the proof that a pickle ran code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_is_refused_in_one_line_without_running_it(tmp_path, capsys):
    marker = tmp_path / "executed"
    (tmp_path / "model.pt").write_bytes(pickle.dumps({"net.weight": _Payload(marker)}, protocol=2))
    suite = _suite(tmp_path, "pickle", {"name": "realnvp", "preset": "tiny", "weights": "model.pt"})
    err = _error(capsys, ["run", str(suite), "--results", str(tmp_path / "results")])
    assert "model.pt: not a tensor file: torch.load(weights_only=True) refused it" in err
    assert not marker.exists()
    torch.save({"a": torch.zeros(1), "b": [1, 2]}, tmp_path / "nested.pt")  # loads, but is no state dict
    suite = _suite(tmp_path, "nested", {"name": "realnvp", "preset": "tiny", "weights": "nested.pt"})
    err = _error(capsys, ["run", str(suite), "--results", str(tmp_path / "results")])
    assert "key 'b' holds a list, not a tensor" in err


def test_weights_are_checked_when_the_suite_loads(tmp_path):
    entry = {"name": "realnvp", "preset": "tiny", "weights": "nowhere.safetensors"}
    with pytest.raises(TrilemmaError, match=r"models\[0\] \(realnvp\): weights: .*nowhere.safetensors does not"):
        load_suite(_suite(tmp_path, "missing", entry))
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(TrilemmaError, match=r"weights.npz is a '.npz' file that realnvp cannot load"):
        load_suite(_suite(tmp_path, "npz", {**entry, "weights": "weights.npz"}))
    (tmp_path / "folder").mkdir()
    with pytest.raises(TrilemmaError, match=r"folder is a folder that realnvp cannot load"):
        load_suite(_suite(tmp_path, "folder", {**entry, "weights": "folder"}))
    # A pretrained entry needs no budget; train_speed needs one, and weights.
    (tmp_path / "w.safetensors").write_bytes(b"")
    suite = load_suite(_suite(tmp_path, "ok", {**entry, "weights": "w.safetensors"}, train=""))
    assert suite.models[0].weights == str(tmp_path / "w.safetensors")  # resolved beside the suite file
    with pytest.raises(TrilemmaError, match="the training budget never ends.*train_speed"):
        load_suite(_suite(tmp_path, "speed", {**entry, "weights": "w.safetensors", "train_speed": True}, train=""))
    with pytest.raises(TrilemmaError, match="train_speed"):
        load_suite(_suite(tmp_path, "speed", {"name": "realnvp", "preset": "tiny", "train_speed": True}))


def test_a_family_reads_its_own_format_through_from_pretrained(tmp_path, monkeypatch, capsys):
    """The optional contract method: called for a path no other route reads, its model checked against
    the configured one; the weights' hash is of the whole folder."""
    from safetensors.torch import load_file, save_file

    from trilemma.models.realnvp import RealNVP

    results, tensors = _trained_state(tmp_path)
    folder = tmp_path / "their_format"
    folder.mkdir()
    save_file({f"theirs/{k}": v for k, v in tensors.items()}, folder / "weights.safetensors")

    def from_pretrained(cls, path, data_shape, config):
        model = cls(config, data_shape)
        theirs = load_file(path / "weights.safetensors")
        model.load_state_dict({k.removeprefix("theirs/"): v for k, v in theirs.items()})
        return model

    monkeypatch.setattr(RealNVP, "from_pretrained", classmethod(from_pretrained))
    assert RealNVP.reads_pretrained()
    suite = _suite(tmp_path, "theirs", {"name": "realnvp", "preset": "tiny", "weights": "their_format"})
    # In-process: the patched class is this process's (a worker would import its own).
    assert main(["run", "--in-process", str(suite), "--results", str(results)]) == 0
    measured = _result(results, "theirs", "realnvp-synthetic-s0")
    assert measured["provenance"]["weights"]["format"] == "realnvp.from_pretrained"
    own = _result(results, "trained", "realnvp-synthetic-s0")["measurements"]["nll"]["bpd"]
    assert measured["measurements"]["nll"]["bpd"] == own
    # A hook that returns a model unlike the configured one is refused, naming the key.
    monkeypatch.setattr(RealNVP, "from_pretrained", classmethod(
        lambda cls, path, shape, config: cls(type(config)(**{**vars(config), "hidden": 2 * config.hidden}), shape)))
    suite = _suite(tmp_path, "unlike", {"name": "realnvp", "preset": "tiny", "weights": "their_format"})
    assert "does not fit realnvp as configured" in _error(capsys, ["run", str(suite), "--results", str(results)])


def test_export_refuses_what_is_not_a_finished_run(tmp_path, capsys):
    assert "holds no finished run" in _error(capsys, ["export", str(tmp_path), "-o", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    assert main(["export", "--help"]) == 0 and "model card" in capsys.readouterr().out
