"""examples/diffusers_ddpm end to end: a DDPM trained by a plain loop and saved by diffusers'
`save_pretrained` is measured by `trilemma run` through `weights:`, in processes of their own (the
example's family registers there only). Skipped, saying why, where diffusers is not installed."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

pytest.importorskip("diffusers", reason="diffusers is not installed: pip install -e .[examples]")

EXAMPLE = REPO / "examples" / "diffusers_ddpm"


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (str(EXAMPLE), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _folder_sha256(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def test_a_diffusers_ddpm_saved_by_save_pretrained_is_measured_through_weights(tmp_path):
    trained = _run([str(EXAMPLE / "train_tiny.py"), "--out", "tiny-ddpm", "--steps", "20"], tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert (tmp_path / "tiny-ddpm" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    (tmp_path / "suite.yaml").write_text((EXAMPLE / "suite.yaml").read_text())
    # FID through weights: is tests/test_pretrained.py's; here the family's own format is read and measured.
    measured = _run(["-m", "trilemma", "run", "suite.yaml", "--name", "ddpm", "eval.fid=false",
                     "eval.sample_batch=4", "eval.grid_images=4"], tmp_path)
    assert measured.returncode == 0, measured.stderr
    result = json.loads((tmp_path / "results/ddpm/diffusers_ddpm-synthetic-s0/result.json").read_text())
    weights = result["provenance"]["weights"]
    assert weights["format"] == "diffusers_ddpm.from_pretrained"
    assert weights["sha256"] == _folder_sha256(tmp_path / "tiny-ddpm")
    m = result["measurements"]
    assert "train" not in m and m["params"]["total"] > 0  # nothing trained here
    assert m["sample"]["samplers"]["ancestral"]["nfe_per_sample"] == 20  # the tiny preset's steps
    assert (tmp_path / "results/ddpm/diffusers_ddpm-synthetic-s0/samples.png").is_file()
    # The family's own check: a config that builds another UNet is one line naming the setting.
    suite = (EXAMPLE / "suite.yaml").read_text()
    (tmp_path / "other.yaml").write_text(suite.replace("preset: tiny", "preset: mnist"))
    refused = _run(["-m", "trilemma", "run", "other.yaml", "eval.fid=false"], tmp_path)
    last = refused.stderr.strip().splitlines()[-1]  # (a library's warnings may come before it)
    assert refused.returncode == 2 and last.startswith("trilemma: error:") and "block_out_channels" in last
