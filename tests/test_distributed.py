"""Data-parallel training over 2 CPU processes (gloo): equal to one process at the same global batch,
resumable after an interruption, with rank 0 alone writing."""
import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from trilemma.run.runner import Context, execute, run_dir_for
from trilemma.run.settings import expand, load_suite

from conftest import REPO

SMOKE = REPO / "suites" / "smoke.yaml"
# PixelCNN's step draws no random numbers and clips its gradients: the average of the ranks' gradients
# must be taken before the clip, as a single process computes it.
OVERRIDES = ["train.max_images=64", "train.checkpoint_seconds=0", "eval.nll=false", "eval.grid_images=0"]


def _run():
    return expand(load_suite(SMOKE, OVERRIDES), ["pixelcnn"])[0]


def _weights(root):
    return load_file(run_dir_for(root, _run()) / "model.safetensors")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank, world, port, root, stop_after_steps):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from trilemma.run import distributed
    from trilemma.run.launch import run_suite_parallel

    run = _run()
    device = distributed.init(torch.device("cpu"))
    suite = load_suite(SMOKE, OVERRIDES)
    run_suite_parallel(suite, [run], root, device, stop_after_steps)  # the hook stops every rank at one step
    distributed.leave(0)  # as the command's ranks end (an interpreter shutdown can abort under gloo)


def _parallel(root, stop_after_steps=None):
    mp.start_processes(_rank, args=(2, _free_port(), root, stop_after_steps), nprocs=2, start_method="spawn")


def test_two_processes_equal_one_at_the_same_global_batch_and_resume(tmp_path):
    run = _run()
    assert execute(run, run_dir_for(tmp_path / "one", run), Context(torch.device("cpu"))) == "done"
    _parallel(tmp_path / "two")
    # Interrupted after 2 of 4 steps on both ranks, then resumed from rank 0's checkpoint.
    _parallel(tmp_path / "resumed", stop_after_steps=2)
    assert (run_dir_for(tmp_path / "resumed", run) / "checkpoint.pt").exists()
    _parallel(tmp_path / "resumed")
    one = _weights(tmp_path / "one")
    for name in ("two", "resumed"):
        other = _weights(tmp_path / name)
        assert max(float((one[k] - other[k]).abs().max()) for k in one) < 1e-5, name
    result = json.loads((run_dir_for(tmp_path / "resumed", run) / "result.json").read_text())
    train = result["measurements"]["train"]
    assert result["status"] == "done" and train["processes"] == 2
    assert train["batch_size"] == 16 and train["per_device_batch"] == 8 and train["images_seen"] == 64
    kinds = [json.loads(line)["kind"] for line in
             (run_dir_for(tmp_path / "resumed", run) / "log.jsonl").read_text().splitlines()]
    assert kinds.count("start") == 1 and kinds.count("resume") == 1  # one writer: rank 0


def test_trilemma_run_nproc_launches_torchrun(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "trilemma", "run", str(SMOKE), "--models", "pixelcnn",
                          *OVERRIDES, "--name", "s", "--results", str(tmp_path), "--nproc", "2"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((tmp_path / "s" / "pixelcnn-synthetic-s0" / "result.json").read_text())
    assert result["measurements"]["train"]["processes"] == 2


def test_a_rank_leaves_with_its_status_and_its_output_flushed():
    # leave() skips the interpreter's shutdown (os._exit), so it must flush what was printed itself.
    code = "from trilemma.run import distributed; print('last line', end=''); distributed.leave(3)"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # a pipe: block-buffered
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 3 and out.stdout == "last line"


def test_submitit_local_executor_runs_the_smoke_suite_as_parallel_jobs(tmp_path):
    pytest.importorskip("submitit")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "trilemma", "run", str(SMOKE), "--models", "dcgan,vae,ot_decoder",
               "--results", str(tmp_path), "--launcher", "submitit", "--executor", "local", "--jobs", "2"]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    for model in ("dcgan", "vae", "ot_decoder"):
        result = json.loads((tmp_path / "smoke" / f"{model}-synthetic-s0" / "result.json").read_text())
        assert result["status"] == "done"
    assert out.stderr.count("submitted ") == 3 and out.stderr.count("): done") == 3  # one job per model
    job_ids = re.findall(r"\(local job (\d+)\)", out.stderr)  # each job's logs in a folder of its id
    assert sorted(p.name for p in (tmp_path / "submitit").iterdir()) == sorted(job_ids)  # none named %j
    for job_id in job_ids:
        log = tmp_path / "submitit" / job_id / f"{job_id}_0_log.out"
        assert "Job completed successfully" in log.read_text()
    status = subprocess.run([sys.executable, "-m", "trilemma", "status", str(SMOKE), "--results",
                             str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert status.returncode == 0 and "3 done" in status.stdout


def test_status_and_launcher_settings_are_checked(tmp_path, capsys):
    from trilemma.cli import main

    assert main(["status", str(SMOKE), "--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert ["dcgan-synthetic-s0", "new"] in [line.split() for line in out.splitlines()]
    assert out.splitlines()[-1].endswith(" new")
    command = ["run", str(SMOKE), "launcher.jobs=0", "--results", str(tmp_path), "--launcher", "submitit"]
    assert main(command) == 2
    assert "launcher.jobs" in capsys.readouterr().err
    assert main(["run", str(SMOKE), "--results", str(tmp_path), "--nproc", "0"]) == 2
    assert "--nproc" in capsys.readouterr().err
    assert main(["run", str(SMOKE), "train.batch_size=15", "--results", str(tmp_path), "--nproc", "2"]) == 2
    assert "train.batch_size 15 does not divide over --nproc 2" in capsys.readouterr().err
    assert not (tmp_path / "smoke").exists()  # nothing ran
