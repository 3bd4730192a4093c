"""SIGTERM to the launcher of a `trilemma run --nproc 2` run (2 CPU processes, gloo) reaches its ranks:
rank 0 writes a checkpoint, the launcher exits 143 as the ranks do, and the same command resumes."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import torch

from trilemma.results.io import read_result
from trilemma.results.schema import CHECKPOINT_FILE

from conftest import REPO

SMOKE = REPO / "suites" / "smoke.yaml"
STEPS = 60  # of 16 images: long enough to be signalled mid-training, a few seconds on a loaded CPU
OVERRIDES = [f"train.max_images={16 * STEPS}", "train.log_every_steps=1", "train.eval_points=1",
             "eval.nll=false", "eval.grid_images=0"]


def _command(root):
    return [sys.executable, "-m", "trilemma", "run", str(SMOKE), "--models", "pixelcnn", *OVERRIDES,
            "--name", "s", "--results", str(root), "--nproc", "2"]


@pytest.mark.slow  # two gloo ranks under torchrun: 33 s on a quiet 2-core machine
def test_sigterm_to_the_nproc_launcher_checkpoints_every_rank_and_the_run_resumes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "s" / "pixelcnn-synthetic-s0"
    log = run_dir / "log.jsonl"
    launcher = subprocess.Popen(_command(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    deadline = time.monotonic() + 300
    while not (log.exists() and '"train"' in log.read_text()):  # rank 0 has logged a training step
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()
        time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)
    _, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 143, err[-3000:]
    assert "Traceback" not in err and "ChildFailedError" not in err, err[-3000:]
    # Rank 0's line (rank 1 says the same without the run's name, in either order).
    said = [line for line in err.splitlines() if line.startswith("trilemma: pixelcnn-synthetic-s0 ")]
    assert len(said) == 1, err[-3000:]
    assert said[0].startswith("trilemma: pixelcnn-synthetic-s0 pre-empted (SIGTERM) at step ")
    assert said[0].endswith("checkpoint written; run again to resume")
    assert err.strip().splitlines()[-1].startswith("trilemma: "), err[-3000:]
    steps = int(said[0].split(" at step ")[1].split(":")[0])
    assert 0 < steps < STEPS
    assert torch.load(run_dir / CHECKPOINT_FILE, weights_only=True)["state"]["steps"] == steps
    assert read_result(run_dir)["status"] == "running"

    # The same command resumes from that checkpoint and ends where an uninterrupted run ends.
    out = subprocess.run(_command(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = read_result(run_dir)
    train = result["measurements"]["train"]
    assert result["status"] == "done" and train["processes"] == 2
    assert train["images_seen"] == 16 * STEPS and train["steps"] == STEPS
    kinds = [json.loads(line)["kind"] for line in log.read_text().splitlines()]
    assert kinds.count("start") == 1 and kinds.count("preempted") == 1 and kinds.count("resume") == 1
    assert not (run_dir / CHECKPOINT_FILE).exists()
