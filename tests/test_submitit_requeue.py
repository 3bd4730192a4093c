"""A submitit job signalled by its scheduler (what the local executor and SLURM send before the time
limit) checkpoints its run, is requeued and resumes it; its logs are in a folder named by its id."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trilemma.results.io import read_result
from trilemma.results.schema import CHECKPOINT_FILE

from conftest import REPO

SMOKE = REPO / "suites" / "smoke.yaml"
STEPS = 60  # of 16 images: long enough to be signalled mid-training
OVERRIDES = [f"train.max_images={16 * STEPS}", "train.log_every_steps=1", "train.eval_points=1",
             "eval.grid_images=0"]


def _children(pid: int) -> list[int]:
    return [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]


@pytest.mark.slow  # two job starts: a minute or more on a loaded CPU
@pytest.mark.parametrize("usr_signal", ["USR2", "USR1"])  # submitit's default; SUBMITIT_PREEMPT_SIGNAL=USR1
def test_a_signalled_submitit_job_checkpoints_requeues_and_resumes(tmp_path, usr_signal):
    pytest.importorskip("submitit")
    if not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists():
        pytest.skip("needs /proc/PID/task/TID/children (Linux) to find the job's task")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SUBMITIT_PREEMPT_SIGNAL": usr_signal}
    command = [sys.executable, "-m", "trilemma", "run", str(SMOKE), "--models", "dcgan", *OVERRIDES, "--name",
               "s", "--results", str(tmp_path), "--launcher", "submitit", "--executor", "local"]
    launcher = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    submitted = launcher.stderr.readline()
    job_id = re.fullmatch(r"submitted dcgan \(local job (\d+)\)\n", submitted).group(1)

    # The job's task (the controller's child) gets the signal once the run trains, as at a time limit.
    run_dir = tmp_path / "s" / "dcgan-synthetic-s0"
    deadline = time.monotonic() + 300
    while not ((run_dir / "log.jsonl").exists() and '"train"' in (run_dir / "log.jsonl").read_text()):
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()
        time.sleep(0.05)
    [task] = _children(int(job_id))
    os.kill(task, getattr(signal, "SIG" + usr_signal))
    out, err = launcher.communicate(timeout=600)
    assert launcher.returncode == 0, submitted + err

    # Requeued once (the same job id), resumed from the checkpoint, and done as an uninterrupted run.
    logs = tmp_path / "submitit"
    assert sorted(p.name for p in logs.iterdir() if p.is_dir()) == [job_id]  # no folder named %j
    submitit_log = (logs / job_id / f"{job_id}_0_log.out").read_text()
    assert submitit_log.count("Calling checkpoint method") == 1, submitit_log
    assert f"Requeued job {job_id}" in submitit_log and "Job completed successfully" in submitit_log
    job_log = (logs / job_id / f"{job_id}_0_log.err").read_text()  # the run's output
    assert "did not stop" not in job_log, job_log  # the run stopped on the SIGTERM it was sent
    stopped = re.search(r"dcgan-synthetic-s0 pre-empted \(SIGTERM\) at step (\d+): checkpoint", job_log)
    assert stopped and 0 < int(stopped.group(1)) < STEPS, job_log
    result = read_result(run_dir)
    assert result["status"] == "done"
    assert result["measurements"]["train"]["images_seen"] == 16 * STEPS
    assert result["measurements"]["train"]["steps"] == STEPS
    kinds = [json.loads(line)["kind"] for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert kinds.count("start") == 1 and kinds.count("preempted") == 1 and kinds.count("resume") == 1
    assert not (run_dir / CHECKPOINT_FILE).exists()
    assert "1 jobs done, 0 failed" in out


def test_the_callable_checkpoint_is_a_delayed_submission_of_the_same_command():
    submitit = pytest.importorskip("submitit")
    from trilemma.run.launch import RunJob

    job = RunJob(["run", "suite.yaml", "--models", "dcgan"], device=1)
    again = job.checkpoint()  # no run going on: nothing to stop
    assert isinstance(again, submitit.helpers.DelayedSubmission)
    assert isinstance(again.function, RunJob) and again.function is not job
    assert (again.function.argv, again.function.device) == (job.argv, job.device)
    assert again.args == () and again.kwargs == {}
