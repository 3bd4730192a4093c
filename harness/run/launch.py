"""Launchers: one run over several processes (torchrun), a suite's runs as parallel jobs (submitit).

* Data parallel (``trilemma run SUITE --nproc N``, or torchrun directly): every rank walks the same
  runs in the same order. Rank 0 claims each run (:class:`~trilemma.run.lock.RunLock`) and tells the
  others whether it is to be trained; then rank 0 runs it as a single process would (training,
  measuring, writing) while the other ranks only train (:func:`train_rank`).
* Job fan-out (``--launcher submitit``): each run of the suite is one job running this very command
  for that run alone (``--models``), submitted through submitit's ``AutoExecutor`` (SLURM where
  ``srun`` exists; local processes with ``--executor local``). The jobs share the results folder; the
  per-run lock keeps two jobs, or a job and another runner, from training one run at once. A
  pre-empted or timed-out SLURM job is requeued (submitit's ``checkpoint``, on its SIGUSR2 or
  ``SUBMITIT_PREEMPT_SIGNAL``): the run is sent SIGTERM, writes a checkpoint of its current step and
  exits (:mod:`trilemma.run.preemption`), and the requeued job resumes from it.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from trilemma.contract.errors import TrilemmaError
from trilemma.contract.registry import build_model
from trilemma.results.io import atomic_write_json
from trilemma.results.schema import STATUS_DONE, STATUS_FAILED, SUITE_FILE
from trilemma.run import distributed, preemption
from trilemma.run.lock import RunLock
from trilemma.run.loop import train
from trilemma.run.runner import Context, execute, needs_training, preflight, run_dir_for, status_of
from trilemma.run.settings import LauncherConfig, Run, SuiteConfig, suite_dict


# --- data parallel ----------------------------------------------------------------------------------

def run_suite_parallel(suite: SuiteConfig, runs: list[Run], results_root: Path, device: torch.device,
                       stop_after_steps: Optional[int] = None) -> dict[str, str]:
    """:func:`~trilemma.run.runner.run_suite` for the ranks of a torchrun launch (all call it).

    ``stop_after_steps`` (a test hook) stops training on every rank after that many steps, the run left
    resumable."""
    ctx, outcome, main = Context(device), {}, distributed.is_main()
    problem = None
    if main:
        try:
            preflight([r for r in runs if needs_training(results_root, r, status_of(results_root, r))], ctx,
                      results_root)
            atomic_write_json(Path(results_root) / suite.name / SUITE_FILE, suite_dict(suite))
        except TrilemmaError as e:
            problem = str(e)
    problem = distributed.broadcast_object(problem)  # every rank stops on rank 0's one-line error
    if problem:
        raise TrilemmaError(problem)
    for i, run in enumerate(runs):
        run_dir = run_dir_for(results_root, run)
        lock = RunLock(run_dir)
        todo = False
        if main:
            lock.wait()  # another runner may hold it: then it is done, or ours to finish
            todo = needs_training(results_root, run, status_of(results_root, run))
            print(f"[{i + 1}/{len(runs)}] {run.name} on {distributed.world_size()} processes"
                  + ("" if todo else ": done"), file=sys.stderr)
        todo = distributed.broadcast_object(todo)
        try:
            if todo and main:
                outcome[run.name] = execute(run, run_dir, ctx, stop_after_steps)
            elif todo:
                train_rank(run, run_dir, ctx, stop_after_steps)
            else:
                outcome[run.name] = STATUS_DONE
        finally:
            lock.release()
    return distributed.broadcast_object(outcome)


def train_rank(run: Run, run_dir: Path, ctx: Context, stop_after_steps: Optional[int] = None) -> None:
    """A rank other than 0: build the model as rank 0 does and take part in its training, nothing else."""
    cfg = run.config
    images, labels = ctx.labeled(cfg.data, "train")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, tuple(images.shape[1:]), None, cfg.model_config).to(ctx.device)
    labels = labels.to(ctx.device) if model.capabilities.conditional and labels is not None else None
    with preemption.catching():  # rank 0's loop and this one stop at the same step (see train)
        train(model, images.to(ctx.device), cfg.train, run_dir, cfg.seed, lambda m, final=False: {},
              stop_after_steps, labels)


# --- submitit ---------------------------------------------------------------------------------------

class RunJob:
    """One run as a submitit job: ``trilemma run SUITE --models MODEL ...`` in a fresh process."""

    def __init__(self, argv: list[str], device: Optional[int] = None):
        self.argv = argv
        self.device = device  # local jobs: the one GPU this job sees
        self.process = None  # the running `trilemma run`, while there is one
        self.waiter = None  # the thread that waits for it

    def __call__(self) -> int:
        import os
        import subprocess
        import threading

        env = dict(os.environ)
        if self.device is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(self.device)
        self.process = subprocess.Popen([sys.executable, "-m", "trilemma", *self.argv], env=env)
        # Waited for in a thread: submitit calls checkpoint() in a signal handler of this thread, which
        # could not wait for the run while this thread is inside Popen.wait (it holds Popen's lock).
        self.waiter = threading.Thread(target=self.process.wait, daemon=True)
        self.waiter.start()
        try:
            self.waiter.join()  # a signal's handler runs during the join
            return self.process.returncode
        finally:
            self.process = self.waiter = None

    def checkpoint(self, grace_seconds: float = 60.0):
        """Called by submitit on pre-emption or time-out (its signal, in this process): the run is sent
        SIGTERM and given ``grace_seconds`` to write its checkpoint and exit (143), then the same job
        is requeued, and resumes from that checkpoint."""
        import signal

        import submitit

        process, waiter = self.process, self.waiter
        if process is not None and waiter is not None and waiter.is_alive():
            process.send_signal(signal.SIGTERM)
            waiter.join(grace_seconds)
            if waiter.is_alive():  # killed, not left to train beside the requeued job
                process.kill()
                print(f"trilemma: the run did not stop within {grace_seconds:.0f} s of SIGTERM and was "
                      f"killed; it resumes from its last periodic checkpoint", file=sys.stderr)
        return submitit.helpers.DelayedSubmission(RunJob(self.argv, self.device))

    def __getstate__(self):  # pickled by submitit: the process stays behind
        return {"argv": self.argv, "device": self.device, "process": None, "waiter": None}


def submit_suite(runs: list[Run], argv_for, launcher: LauncherConfig, results_root: Path,
                 wait: bool = True) -> dict[str, str]:
    """Submit one job per model of ``runs``; wait and print progress unless ``wait`` is False.

    ``argv_for(model)`` is the ``trilemma`` command line that runs that model's runs alone.
    """
    try:
        import submitit
    except ImportError:
        raise TrilemmaError("--launcher submitit needs the submitit package: pip install submitit") from None
    folder = Path(results_root) / launcher.folder / "%j"
    cluster = None if launcher.executor == "auto" else launcher.executor
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    params: dict[str, Any] = {"timeout_min": launcher.time_minutes, "cpus_per_task": launcher.cpus_per_job}
    if executor.cluster == "slurm":
        params |= {"slurm_array_parallelism": launcher.jobs, "gpus_per_node": launcher.gpus_per_job,
                   "slurm_partition": launcher.partition, "slurm_account": launcher.account,
                   "slurm_qos": launcher.qos, "slurm_constraint": launcher.constraint,
                   "mem_gb": launcher.memory_gb}
        params |= {f"slurm_{k}" if not k.startswith("slurm_") else k: v for k, v in launcher.extra.items()}
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    models = list(dict.fromkeys(r.model for r in runs))
    if executor.cluster == "slurm" or not wait:  # SLURM throttles the array itself (slurm_array_parallelism)
        with executor.batch():
            jobs = [executor.submit(RunJob(argv_for(m))) for m in models]
        print(f"submitted {len(jobs)} jobs ({executor.cluster}): "
              + ", ".join(f"{m}={j.job_id}" for m, j in zip(models, jobs)), file=sys.stderr)
        return _wait(list(zip(models, jobs))) if wait else {m: "submitted" for m in models}
    # Local jobs are processes on this machine: at most `jobs` at once, the next started as one ends.
    outcome: dict[str, str] = {}
    queue, running, devices = list(models), {}, {}
    gpus = torch.cuda.device_count()
    while queue or running:
        while queue and len(running) < launcher.jobs:
            model = queue.pop(0)
            busy = set(devices.values())  # with several GPUs, each job gets a free one of its own
            devices[model] = next((d for d in range(gpus) if d not in busy), None) if gpus > 1 else None
            running[model] = executor.submit(RunJob(argv_for(model), devices[model]))
            print(f"submitted {model} ({executor.cluster} job {running[model].job_id})", file=sys.stderr)
        finished = _wait(list(running.items()), first=True)
        outcome |= finished
        for model in finished:
            del running[model], devices[model]
    _remove_unsubstituted(folder)
    return outcome


def _remove_unsubstituted(folder: Path) -> None:
    """Remove the empty folder named ``%j`` that submitit's local executor leaves: each job's controller
    makes the log folder's path as given, before the substitution, and writes in ``<job id>/`` only."""
    try:
        folder.rmdir()
    except OSError:  # not there, or not empty (then not submitit's to leave)
        pass


def _wait(jobs: list[tuple[str, Any]], first: bool = False) -> dict[str, str]:
    """Wait for the jobs (``first``: for at least one), printing each as it ends; model -> done/failed."""
    outcome, pending = {}, dict(jobs)
    while pending:
        for model, job in list(pending.items()):
            if job.done():
                try:
                    code = job.result()
                except Exception as e:  # the job itself failed (node lost, out of memory)
                    print(f"  job {job.job_id} ({model}) failed: {str(e).splitlines()[-1] if str(e) else e}",
                          file=sys.stderr)
                    code = 1
                outcome[model] = STATUS_DONE if code == 0 else STATUS_FAILED
                print(f"  job {job.job_id} ({model}): {outcome[model]}", file=sys.stderr)
                del pending[model]
        if pending and not (first and outcome):
            time.sleep(1.0)
        elif first:
            break
    return outcome
