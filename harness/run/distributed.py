"""Data-parallel training of one run over several processes, launched by torchrun.

``torchrun --nproc-per-node N -m trilemma run SUITE`` (or ``trilemma run SUITE --nproc N``, which
starts torchrun) runs the same command in N processes. Every rank walks the same runs; rank 0 alone
claims runs, writes results, checkpoints and logs, and measures. In the training loop each rank
draws the global batch's indices from the one seeded stream and keeps its own slice of them, so
the ranks together see exactly the batches of a single-process run of the same global batch; the
gradients are averaged over the ranks before every clip and optimizer step
(:class:`trilemma.contract.update.Update`), buffers (batch-norm statistics) follow rank 0 after each
step, and the step time is the slowest rank's.

The process group is NCCL on CUDA devices, gloo on the CPU (the CI test: two processes on one CPU).

Started with ``--nproc``, this process is the launcher: a pre-emption signal it receives (SIGTERM,
SIGUSR1, SIGUSR2) or Ctrl-C is passed on to torchrun, which sends it to every rank and waits for them;
the ranks stop at the same step, rank 0 writes the checkpoint, and the launcher exits with their
status (143 for SIGTERM), as a single process does (:mod:`trilemma.run.preemption`).
"""
from __future__ import annotations

import datetime
import os
import signal
import sys
import threading
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import nn

from trilemma.contract.errors import TrilemmaError


def launched() -> bool:
    """Whether this process is one of several started by torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init(device: torch.device) -> torch.device:
    """Join torchrun's process group; returns this rank's device (``cuda:LOCAL_RANK`` on GPUs)."""
    if not launched() or active():
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    # Rank 0 measures between training steps (FID curve points) while the others wait in a collective.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=2))
    return device


def shard(batch: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a global batch (the batch size divides by the world size)."""
    n = len(batch) // world_size()
    return batch[rank() * n:(rank() + 1) * n]


def per_rank_batch(batch_size: int) -> int:
    if batch_size % world_size():
        raise TrilemmaError(f"train.batch_size {batch_size} does not divide over {world_size()} processes")
    return batch_size // world_size()


def average_gradients(grads: list[torch.Tensor]) -> None:
    """Average gradients over the ranks in place (one flat all-reduce)."""
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_state(module: nn.Module, buffers_only: bool = False) -> None:
    """Rank 0's parameters (unless ``buffers_only``) and buffers on every rank."""
    tensors = ([] if buffers_only else list(module.parameters())) + list(module.buffers())
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, 0)


def slowest(seconds: list[float], device: torch.device) -> list[float]:
    """Element by element, the largest of the ranks' values (a step lasts as long as its slowest rank)."""
    t = torch.tensor(seconds, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    if not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, (t / world_size()).tolist()))


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    box = [value]
    dist.broadcast_object_list(box, 0)
    return box[0]


def barrier() -> None:
    if active():
        dist.barrier()


def leave(code: int) -> NoReturn:
    """End this rank's process: the process group destroyed, the streams flushed, then ``os._exit``.

    The interpreter's shutdown is skipped on purpose. After the last collective a gloo worker thread
    may still be releasing that work's tensors, and the group outlives ``destroy_process_group`` (its
    threads were still running after it and a ``gc.collect()`` in the CI test). If the interpreter is
    finalizing when the thread takes the GIL to free a tensor, the thread is unwound and the process
    aborts: ``terminate called without an active exception``, seen in ``~AsyncWork`` in a core dump
    from about 1 in 12 runs of the 2-process test on a loaded 2-core machine. Every file of a run is
    closed by then (results, checkpoints, logs and TensorBoard events)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# Signals the launcher passes on to the ranks: pre-emption (trilemma.run.preemption), and Ctrl-C.
FORWARDED = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")
                  if hasattr(signal, n))
# How long torchrun waits for signalled ranks before it kills them (recent torch; earlier ones, 30 s):
# they stop at the next logging tick, then rank 0 writes a checkpoint (a killed rank leaves the last one).
STOP_SECONDS = 120


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run ``trilemma <argv>`` under ``torchrun --nproc-per-node nproc``; the ranks' exit status.

    torchrun starts in a process group of its own, so that a signal sent to this process's group
    (Ctrl-C at a terminal) reaches it once, through :data:`FORWARDED`: torchrun stops waiting for its
    ranks if a second signal comes while it waits."""
    import subprocess

    command = [sys.executable, "-m", "trilemma.run.distributed", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "trilemma", *argv]
    env = {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(STOP_SECONDS), **os.environ}
    torchrun = subprocess.Popen(command, env=env, start_new_session=True)

    def forward(signum: int, frame) -> None:
        torchrun.send_signal(signum)

    main_thread = threading.current_thread() is threading.main_thread()  # where handlers can be set
    previous = {s: signal.signal(s, forward) for s in FORWARDED} if main_thread else {}
    try:
        code = torchrun.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 128 - code if code < 0 else code  # torchrun itself killed by a signal (before its handlers)


def _torchrun(argv: list[str]) -> int:
    """torchrun (started through this Python, it needs no script on the PATH), its exit status that
    of its ranks: the signal passed on to them (128 + its number), or the first failed rank's. The
    ranks print their own one-line errors; torchrun's traceback of its report would bury them."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main

    def stop(signum: int, frame) -> None:
        # What torchrun's own handler of SIGTERM and SIGINT does (recent versions handle SIGUSR1 and
        # SIGUSR2 too, when asked with --signals-to-handle): torchrun then sends the signal to each rank.
        raise SignalException(f"got {signal.Signals(signum).name}", sigval=signal.Signals(signum))

    for signum in FORWARDED:
        signal.signal(signum, stop)
    try:
        main(argv)
    except SignalException as e:  # passed on to every rank, which have stopped (or were killed)
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        rank_, failure = e.get_first_failure()
        if failure.exitcode < 0:  # killed, so it could not say why itself
            print(f"trilemma: rank {rank_} was killed by {signal.Signals(-failure.exitcode).name}",
                  file=sys.stderr)
            return 128 - failure.exitcode
        return failure.exitcode
    return 0


if __name__ == "__main__":
    sys.exit(_torchrun(sys.argv[1:]))
