"""Each run in a fresh worker process: its timings do not depend on the runs before it.

The runner stays the parent: it claims, schedules and collects. A run's training and measurements
execute in a child forked from a server process that has imported torch and run nothing
(``multiprocessing``'s ``forkserver``; ``spawn`` where there is none), so every run starts with the
allocator, thread pool and caches of a new process, and its peak memory is its own. The child gets
the parent's environment, working directory, import path, thread count and plugins; it reports its
status, or the exception that stops the suite, through a pipe, and what it prints goes through it to
the parent's streams (where a test or a log captures them). A child that dies without reporting
(killed, out of memory, a crash in native code) is a failed run whose error says how it died.

Pre-emption signals that reach the parent are passed on to the child, which checkpoints and stops
as a run does in-process; Ctrl-C reaches both (one process group) and the parent waits for the child
to write its checkpoint.
"""
from __future__ import annotations

import dataclasses
import io
import multiprocessing
import os
import pickle
import signal
import sys
import threading
from pathlib import Path
from typing import Optional

import torch

from trilemma.contract.errors import TrilemmaError
from trilemma.contract.registry import load_plugins, loaded_plugins
from trilemma.results.io import atomic_write_json, read_result
from trilemma.results.schema import RESULT_FILE, STATUS_FAILED
from trilemma.run import preemption
from trilemma.run.execution import fix_allocator, mark_worker
from trilemma.run.preemption import Preempted
from trilemma.run.settings import Run

POLL_SECONDS = 0.2
_SENDING = threading.Lock()  # one message at a time on a worker's pipe


@dataclasses.dataclass
class Job:
    """What a worker needs to do a run as the parent would."""

    run: Run
    results_root: Path
    device: str
    retry_failed: bool
    task: str
    environ: dict[str, str]
    cwd: str
    path: list[str]
    threads: int
    plugins: list[str]
    ttys: tuple[bool, bool]  # whether the parent's stdout and stderr are terminals


class WorkerDied(RuntimeError):
    """A worker process ended without reporting (a signal, an exit from native code)."""


def run_in_worker(run: Run, results_root: Path, device: torch.device, retry_failed: bool,
                  task: str = "run") -> str:
    """Do one claimed run (``task`` "run"), or add what a finished one lacks ("add_missing"), in a
    fresh worker process; returns its status, or raises what stopped it (pre-emption, Ctrl-C, a full
    disk, a harness error) as it would in-process."""
    job = Job(run, Path(results_root), str(device), retry_failed, task, dict(os.environ), os.getcwd(),
              list(sys.path), torch.get_num_threads(), loaded_plugins(), (_isatty(sys.stdout), _isatty(sys.stderr)))
    context = _context()
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_work, args=(send, job), name=f"trilemma {run.name}")
    process.start()
    send.close()
    message, forwarded = None, None
    try:
        with preemption.catching():
            while message is None:
                if receive.poll(POLL_SECONDS):
                    item = _receive(receive)
                    if item is None:  # the worker's end closed: it ended without a word
                        break
                    if item[0] == "stream":  # what it printed, printed here (where it is captured)
                        _print(*item[1:])
                    else:
                        message = item
                elif not process.is_alive():
                    break
                if forwarded is None and (forwarded := preemption.requested()):
                    os.kill(process.pid, forwarded)  # the worker checkpoints and reports
            process.join()
    except KeyboardInterrupt:  # the worker had it too (one process group): it writes its checkpoint
        try:
            process.join()
        except KeyboardInterrupt:
            process.kill()
        raise
    finally:
        receive.close()
    if message is None:
        return _died(run, results_root, process.exitcode)
    kind, *rest = message
    if kind == "preempted":
        raise Preempted(rest[0], rest[1])
    if kind == "interrupted":
        raise KeyboardInterrupt
    if kind == "raised":
        raise rest[0]
    if forwarded:  # the signal came as the run ended: the next run is not started
        raise Preempted(f"{run.name} {rest[0]}; pre-empted ({preemption.name(forwarded)}) before the next run; "
                        f"run again to go on", forwarded)
    return rest[0]


def _print(stream: str, text: str) -> None:
    out = sys.stdout if stream == "stdout" else sys.stderr
    out.write(text)
    out.flush()


class _Forward(io.TextIOBase):
    """A worker's ``sys.stdout`` or ``sys.stderr``: text sent to the parent, which prints it."""

    def __init__(self, send, name: str, tty: bool):
        self.send, self.name, self.tty = send, name, tty

    def write(self, text: str) -> int:
        if text:
            with _SENDING:  # progress bars may write from their monitor thread
                self.send.send(("stream", self.name, text))
        return len(text)

    def isatty(self) -> bool:  # progress bars draw as they would in the parent
        return self.tty

    @property
    def encoding(self) -> str:
        return "utf-8"


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _receive(connection) -> Optional[tuple]:
    try:
        return connection.recv()
    except EOFError:
        return None


def _context():
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" not in methods:
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    # Imported once in the server, nothing run: each worker starts without the seconds of imports.
    context.set_forkserver_preload([__name__, "trilemma.run.runner", "torchvision", "torch_fidelity"])
    return context


def _work(send, job: Job) -> None:
    """The worker: the parent's settings, then the run; one message back."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.stdout = _Forward(send, "stdout", job.ttys[0])
    sys.stderr = _Forward(send, "stderr", job.ttys[1])
    os.environ.clear()
    os.environ.update(job.environ)
    os.chdir(job.cwd)
    sys.path[:] = job.path
    torch.set_num_threads(job.threads)
    fix_allocator()
    mark_worker()
    from trilemma.run import runner  # the runner imports this module: imported here, not above

    try:
        load_plugins(job.plugins, "worker plugins")
        context = runner.Context(torch.device(job.device))
        if job.task == runner.ADD_MISSING:
            status = runner.add_missing(job.run, runner.run_dir_for(job.results_root, job.run), context)
        else:
            status = runner.claimed_run(job.run, job.results_root, context, job.retry_failed)
        message: tuple = ("status", status)
    except Preempted as e:
        message = ("preempted", str(e), e.signum)
    except KeyboardInterrupt:
        message = ("interrupted",)
    except BaseException as e:  # noqa: BLE001 (sent to the parent, which raises it)
        message = ("raised", _picklable(e))
    sys.stdout.flush()
    sys.stderr.flush()
    with _SENDING:
        send.send(message)
    send.close()


def _picklable(e: BaseException) -> BaseException:
    """``e`` itself where it survives pickling (its class and message), else its text as an error."""
    try:
        copy = pickle.loads(pickle.dumps(e))
        if type(copy) is type(e) and str(copy) == str(e):
            return e
    except Exception:  # noqa: BLE001
        pass
    return TrilemmaError(f"{type(e).__name__}: {e}")


def _died(run: Run, results_root: Path, exitcode: Optional[int]) -> str:
    """A worker that ended without a word: its run is failed, the error saying how it ended."""
    if exitcode is not None and exitcode < 0:
        how = f"was killed by {preemption.name(-exitcode)}"
        if -exitcode == signal.SIGKILL:
            how += " (as the kernel's out-of-memory killer does)"
    else:
        how = f"exited with status {exitcode}"
    message = f"the worker process of {run.name} {how} before it reported"
    print(f"  {run.name} failed: {message}", file=sys.stderr)
    from trilemma.run.runner import run_dir_for

    run_dir = run_dir_for(results_root, run)
    try:
        result = read_result(run_dir)
    except (TrilemmaError, OSError):
        result = None
    if result is None:
        return STATUS_FAILED  # nothing was written: the next invocation starts it afresh
    result["status"] = STATUS_FAILED
    result["error"] = {"type": WorkerDied.__name__, "message": message, "traceback": ""}
    atomic_write_json(run_dir / RESULT_FILE, result)
    return STATUS_FAILED

