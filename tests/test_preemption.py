"""A pre-empted run (SIGTERM) checkpoints and resumes to the same result; a full disk stops the suite
with every file as it was."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from trilemma.cli import main
from trilemma.models.dcgan import DCGAN
from trilemma.results import io
from trilemma.results.io import read_result
from trilemma.results.schema import CHECKPOINT_FILE, RESULT_FILE
from trilemma.run import phases, preemption
from trilemma.run.preemption import Preempted
from trilemma.run.runner import Context, execute, run_dir_for
from trilemma.run.settings import expand, load_suite

from conftest import REPO

SMOKE = REPO / "suites" / "smoke.yaml"
OVERRIDES = ["train.max_images=96", "train.eval_points=3"]  # periodic checkpoints every 60 s: none here


def _dcgan_run():
    return expand(load_suite(SMOKE, OVERRIDES), ["dcgan"])[0]


def _signal_at_step(monkeypatch, step: int, signum=signal.SIGTERM):
    """The process sends itself ``signum`` during DCGAN's ``step``-th training step (of this process)."""
    calls, train_step = [0], DCGAN.train_step

    def sending(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == step:
            os.kill(os.getpid(), signum)
        return train_step(self, *args, **kwargs)

    monkeypatch.setattr(DCGAN, "train_step", sending)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_preempted_run_checkpoints_and_resumes_to_the_same_result(tmp_path, monkeypatch, signum):
    run, ctx = _dcgan_run(), Context(torch.device("cpu"))
    assert execute(run, run_dir_for(tmp_path / "a", run), ctx) == "done"
    reference = read_result(run_dir_for(tmp_path / "a", run))

    before = signal.getsignal(signum)
    run_dir = run_dir_for(tmp_path / "b", run)
    _signal_at_step(monkeypatch, 2, signum)
    with pytest.raises(Preempted) as stopped:
        execute(run, run_dir, ctx)
    monkeypatch.undo()
    assert str(stopped.value) == (f"{run.name} pre-empted ({signal.Signals(signum).name}) at step 2: "
                                  f"checkpoint written; run again to resume")
    assert stopped.value.exit_status == 128 + signum
    assert signal.getsignal(signum) is before  # the earlier handler is back
    partial = read_result(run_dir)
    assert partial["status"] == "running" and partial["error"] is None
    blob = torch.load(run_dir / CHECKPOINT_FILE, weights_only=True)
    assert blob["state"]["steps"] == 2 and blob["state"]["images"] == 32

    assert execute(run, run_dir, ctx) == "done"
    resumed = read_result(run_dir)
    for key in ("images_seen", "steps"):
        assert resumed["measurements"]["train"][key] == reference["measurements"]["train"][key]
    assert [p["images"] for p in resumed["curve"]] == [p["images"] for p in reference["curve"]]
    assert (run_dir / "samples.png").read_bytes() == (run_dir_for(tmp_path / "a", run) / "samples.png").read_bytes()
    kinds = [json.loads(line)["kind"] for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert kinds.count("preempted") == 1 and kinds.count("resume") == 1


def test_a_signal_while_measuring_stops_after_the_result_is_written(tmp_path, monkeypatch):
    run, ctx = _dcgan_run(), Context(torch.device("cpu"))
    run_dir = run_dir_for(tmp_path, run)
    save_weights = phases.save_weights

    def signalled(*args, **kwargs):  # the signal comes after training, as the weights are written
        os.kill(os.getpid(), signal.SIGTERM)
        return save_weights(*args, **kwargs)

    monkeypatch.setattr(phases, "save_weights", signalled)
    with pytest.raises(Preempted, match="while measuring"):
        execute(run, run_dir, ctx)
    monkeypatch.undo()
    partial = read_result(run_dir)
    assert partial["status"] == "running" and partial["measurements"]["train"]["images_seen"] == 96
    assert (run_dir / CHECKPOINT_FILE).exists()
    assert execute(run, run_dir, ctx) == "done"
    assert read_result(run_dir)["measurements"]["train"]["steps"] == 6  # not trained again


def test_sigterm_to_the_command_exits_143_with_one_line_and_a_checkpoint(tmp_path):
    # A real process, as a scheduler meets it: SIGTERM once training has logged a step.
    command = [sys.executable, "-m", "trilemma", "run", str(SMOKE), "--models", "dcgan", "--results",
               str(tmp_path), "train.max_images=1000000", "train.log_every_steps=1"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not ((logs := list(tmp_path.glob("*/dcgan-synthetic-s0/log.jsonl"))) and '"train"' in logs[0].read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("trilemma: dcgan-synthetic-s0 pre-empted (SIGTERM) at step ") and \
        last.endswith("checkpoint written; run again to resume")
    assert "Traceback" not in err
    log = logs[0]
    result = read_result(log.parent)
    assert result["status"] == "running"
    blob = torch.load(log.parent / CHECKPOINT_FILE, weights_only=True)
    assert blob["state"]["steps"] == int(last.split(" at step ")[1].split(":")[0])


def _disk_fills_on_result_writes(monkeypatch):
    """Writes of a result document fail half-way with ENOSPC, as on a full disk; others go through."""
    write, failed = io._write, []

    def full(fd, data):
        if data.startswith(b"{") and b'"schema"' in data and b'"measurements"' in data:
            with os.fdopen(fd, "wb") as f:
                f.write(data[:len(data) // 2])
            failed.append(len(data))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(fd, data)

    monkeypatch.setattr(io, "_write", full)
    return failed


def test_a_full_disk_keeps_the_previous_result_and_stops_the_suite(tmp_path, monkeypatch, capsys):
    run, ctx = _dcgan_run(), Context(torch.device("cpu"))
    run_dir = run_dir_for(tmp_path, run)
    assert execute(run, run_dir, ctx, stop_after_steps=2) == "running"  # an earlier attempt, resumable
    previous = (run_dir / RESULT_FILE).read_bytes()
    capsys.readouterr()

    failed = _disk_fills_on_result_writes(monkeypatch)
    # In-process: the patched writes are this process's (a worker would write through its own).
    code = main(["run", "--in-process", str(SMOKE), "--models", "dcgan,vae", "--results", str(tmp_path), *OVERRIDES])
    err = capsys.readouterr().err
    assert failed and code == 2
    assert (run_dir / RESULT_FILE).read_bytes() == previous  # byte for byte
    assert not list(run_dir.glob(".*.tmp"))  # the half-written temporary is gone
    assert err.strip().splitlines()[-1] == (f"trilemma: error: no space left on device writing "
                                            f"{run_dir / RESULT_FILE}: the previous file is intact; free "
                                            f"some space and run again to resume")
    assert "Traceback" not in err
    assert not (run_dir.parent / "vae-synthetic-s0").exists()  # the suite stopped: vae never started

    monkeypatch.undo()  # space freed: the same command resumes and finishes both
    assert main(["run", "--in-process", str(SMOKE), "--models", "dcgan,vae", "--results", str(tmp_path), *OVERRIDES]) == 0
    assert read_result(run_dir)["status"] == "done"


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    run, ctx = _dcgan_run(), Context(torch.device("cpu"))
    run_dir = run_dir_for(tmp_path, run)
    _signal_at_step(monkeypatch, 2)
    with pytest.raises(Preempted):
        execute(run, run_dir, ctx)
    monkeypatch.undo()
    previous = (run_dir / CHECKPOINT_FILE).read_bytes()

    def full(fd, data):
        os.close(fd)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(io, "_write", lambda fd, data, write=io._write: (  # checkpoints (zip files) fail
        full(fd, data) if data[:2] == b"PK" else write(fd, data)))
    with pytest.raises(io.DiskFull, match=r"writing .*checkpoint\.pt: the previous file is intact"):
        execute(run, run_dir, ctx)
    assert (run_dir / CHECKPOINT_FILE).read_bytes() == previous
    assert read_result(run_dir)["status"] == "running"
    assert not list(run_dir.glob(".*.tmp"))
    assert preemption.requested() is None
