"""`make gpu-check` on the CPU: every asked-for family in the report, built, trained and sampled, and
what needs CUDA marked skipped with its reason."""
import json
import time
from pathlib import Path

import pytest

from trilemma.cli import main as cli_main

from trilemma.run import gpu_check


def _run(tmp_path, *extra):
    code = cli_main(["gpu-check", "--device", "cpu", "--models", "dcgan,vae", "--no-compile", "--steps", "1",
                           "--batch", "4", "--sample-batch", "4", "-o", str(tmp_path), *extra])
    assert code == 0
    return json.loads((tmp_path / "report.json").read_text()), (tmp_path / "report.md").read_text()


def test_cpu_report_has_every_family_ok(tmp_path):
    record, markdown = _run(tmp_path)
    assert [r["name"] for r in record["families"]] == ["dcgan", "vae"]
    assert record["device"] == "cpu" and record["torch"]
    assert record["preset"] == "tiny" and "not 'cifar10_gpu'" in record["preset_note"]
    for row in record["families"]:
        assert row["status"] == "ok", row
        assert row["params"] > 0 and row["sampling_params"] > 0
        assert row["precision"] == "bf16" and row["compile"] == "eager" and not row["fallbacks"]
        assert row["step_seconds"] > 0 and row["samples_per_second"] > 0 and row["nfe_per_sample"] == 1
        if Path("/proc/self/clear_refs").exists():  # Linux: the CPU's resident peak of the phase
            assert row["peak_memory_bytes"] > 0 and row["peak_memory"] == "cpu_peak_rss"
        else:
            assert row["peak_memory_bytes"] is None and row["peak_memory"] == "skipped: needs CUDA"
        assert f"| {row['name']} | ok |" in markdown
    fid = record["fid"]
    assert fid["status"] == "skipped" and "needs CUDA" in fid["error"] and fid["label"] == "FID-50k"
    assert not record["budget_exceeded"] and record["not_started"] == [] and record["complete"]
    assert "Incomplete" not in markdown


def test_errors_are_caught_per_family(tmp_path, monkeypatch):
    def broken(name, *args):
        raise RuntimeError(f"cannot build {name}\nsecond line")

    monkeypatch.setattr(gpu_check, "_step", broken)
    record, markdown = _run(tmp_path)
    for row in record["families"]:
        assert row["status"] == "error" and row["error"] == f"training: RuntimeError: cannot build {row['name']}"
    assert "second line" not in markdown and "| vae | error |" in markdown


def test_compile_failure_falls_back_and_says_so(tmp_path, monkeypatch):
    real = gpu_check._step

    def no_compile(name, preset, shape, batch, device, precision, mode):
        if mode:
            raise RuntimeError("the compiler is broken here")
        return real(name, preset, shape, batch, device, precision, mode)

    monkeypatch.setattr(gpu_check, "_step", no_compile)
    code = cli_main(["gpu-check", "--device", "cpu", "--models", "dcgan", "--steps", "1", "--batch", "4",
                           "--sample-batch", "4", "-o", str(tmp_path)])
    row = json.loads((tmp_path / "report.json").read_text())["families"][0]
    assert code == 0 and row["status"] == "fallback" and row["compile"] == "eager" and row["precision"] == "bf16"
    assert row["fallbacks"] == ["bf16 default: RuntimeError: the compiler is broken here"]


def test_budget_stops_new_families(tmp_path):
    record, markdown = _run(tmp_path, "--budget", "1e-9")
    assert record["not_started"] == ["dcgan", "vae"] and record["budget_exceeded"]
    assert all(r["status"] == "skipped" and "budget" in r["error"] for r in record["families"])
    assert "not started: dcgan, vae" in markdown


def test_unknown_family_is_an_error(tmp_path, capsys):
    assert cli_main(["gpu-check", "--device", "cpu", "--models", "nosuch", "-o", str(tmp_path)]) == 2
    assert "unknown model(s) nosuch" in capsys.readouterr().err


def test_a_stuck_family_is_cut(tmp_path, monkeypatch):
    def stuck(*args):
        time.sleep(30)

    monkeypatch.setattr(gpu_check, "_step", stuck)
    t0 = time.perf_counter()
    record, _ = _run(tmp_path, "--family-seconds", "0.5")
    assert time.perf_counter() - t0 < 10
    for row in record["families"]:
        assert row["status"] == "error" and row["error"].startswith("training: TimeoutError: over the 0.5 s limit")


@pytest.mark.parametrize("bad", [["--steps", "0"], ["--budget", "0"]])
def test_bad_options(tmp_path, bad, capsys):
    assert cli_main(["gpu-check", "--device", "cpu", "-o", str(tmp_path), *bad]) == 2


@pytest.mark.slow
def test_cpu_fid_is_labelled_and_timed(tmp_path):
    import os

    weights = os.environ.get("TRILEMMA_FID_WEIGHTS")
    subset = os.path.join(os.environ.get("TRILEMMA_DATA", ""), "cifar10-subset")
    if not (weights and os.path.isfile(weights) and os.path.isfile(os.path.join(subset, "train.npz"))):
        pytest.skip("needs TRILEMMA_FID_WEIGHTS and the CIFAR-10 subset under TRILEMMA_DATA")
    record, markdown = _run(tmp_path, "--fid-samples", "16", "--fid-dataset", subset, "--budget", "1e-9")
    fid = record["fid"]
    assert fid["status"] == "ok", fid
    assert fid["label"] == "FID@16 (not FID-50k: CPU mode)" and fid["n"] == fid["n_ref"] == 16
    assert fid["fid"] > 0 and fid["end_to_end_seconds"] > fid["seconds"]["features"] > 0
    assert "## FID@16 (not FID-50k: CPU mode) end to end (dcgan, preset tiny)" in markdown
