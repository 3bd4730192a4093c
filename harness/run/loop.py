"""The training loop: one function, read top to bottom, resumable from any checkpoint.

Progress is counted in images. The budget is ``max_images``, ``max_flops`` (counted training FLOPs:
the equal-compute budget, the same on any machine) and/or ``max_seconds`` of training time, whichever
ends first. The FLOPs of every ``flops_every_steps``-th step are counted as it runs (matmuls and
convolutions, forward and backward: :mod:`trilemma.measure.flops`); the steps between count as the
last counted one, so a staged schedule's cost is followed, and counted steps stay out of the
steady-state throughput. Training time is the sum of the timed train steps only (on a CPU the device
synchronized around each; on a GPU CUDA events around each, read at logging ticks and where the budget
or an evaluation point may have been reached: :class:`~trilemma.measure.timing.StepTimer`), so
evaluation, logging and checkpointing never count against it, and a resumed run continues the same
clock. The first ``warmup_steps`` steps are left out of the steady-state
throughput. Checkpoints hold the model, its EMA, the optimizers, the loop state (including the
evaluation curve so far) and every RNG state; the batch order is a function of (seed, images seen),
so a run killed at any point resumes exactly where its last checkpoint stood. A pre-emption signal
(SIGTERM, submitit's SIGUSR1/SIGUSR2: :mod:`trilemma.run.preemption`) is acted on after the step it
arrives in: a checkpoint of that step is written and :class:`~trilemma.run.preemption.Preempted` raised.

Losses come back from ``train_step`` as device tensors and are summed there; the host reads them
only at logging ticks, so the loop never makes the device wait for a number it does not print.

The step runs at ``precision`` (autocast, loss scaling for fp16), with the networks compiled when
asked (:mod:`trilemma.run.execution`), and data-parallel when launched by torchrun
(:mod:`trilemma.run.distributed`): every rank trains on its slice of the global batch; rank 0 alone
evaluates, logs and checkpoints.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from trilemma.contract.errors import TrilemmaError
from trilemma.contract.family import GenerativeModel
from trilemma.contract.update import Update
from trilemma.measure.flops import counting_flops
from trilemma.measure.timing import StepTimer
from trilemma.results.io import now
from trilemma.results.schema import CHECKPOINT_FILE, LOG_FILE
from trilemma.run import distributed, preemption
from trilemma.run.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from trilemma.run.data import BatchStream
from trilemma.run.execution import autocast, compile_networks, grad_scaler, set_tf32
from trilemma.run.settings import TrainConfig


@dataclass
class TrainState:
    images: int = 0  # training images seen
    steps: int = 0
    train_seconds: float = 0.0  # timed train steps only
    wall_seconds: float = 0.0  # everything in the loop, evaluation and checkpoints included
    timed_images: int = 0  # images after the warm-up steps, of steps whose FLOPs were not counted...
    timed_seconds: float = 0.0  # ...and the time they took
    flops: float = 0.0  # counted training FLOPs (matmuls and convolutions, forward and backward)
    step_flops: float = 0.0  # the last counted step's FLOPs (every rank's together)
    evals_done: int = 0
    curve: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False


def checkpoint_blob(model, ema, update: Update, state: TrainState) -> dict[str, Any]:
    return {"model": model.state_dict(), "ema": ema.state_dict() if ema is not None else None,
            "optimizers": {k: o.state_dict() for k, o in update.optimizers.items()},
            "state": asdict(state), "rng": rng_state(), "grad_scaler": update.state_dict()}


def restore(blob: dict[str, Any], model, ema, update: Update) -> TrainState:
    model.load_state_dict(blob["model"])
    if ema is not None and blob["ema"] is not None:
        ema.load_state_dict(blob["ema"])
    for name, opt in update.optimizers.items():
        opt.load_state_dict(blob["optimizers"][name])
    set_rng_state(blob["rng"])
    update.load_state_dict(blob.get("grad_scaler"))
    return TrainState(**blob["state"])


@torch.no_grad()
def update_ema(ema: GenerativeModel, model: GenerativeModel, images: int, batch: int, cfg: TrainConfig):
    """EMA of the weights with a half-life in images (Karras et al. 2022), ramped up early on.

    Buffers (batch-norm statistics, replay buffers, counters) are copied, not averaged. Floating-point
    tensors are updated by the multi-tensor ``torch._foreach_lerp_`` / ``_foreach_copy_`` (one kernel
    launch per group on a GPU, where one per tensor would make the harness's bookkeeping cost as much
    as a small model's step); the values are those of ``lerp_`` tensor by tensor.
    """
    halflife = min(cfg.ema_halflife_images, images * cfg.ema_rampup) if cfg.ema_rampup else cfg.ema_halflife_images
    beta = 0.5 ** (batch / max(halflife, 1e-8))
    averaged, trained = [], []
    for a, b in zip(ema.parameters(), model.parameters()):
        if a.is_floating_point():
            averaged.append(a)
            trained.append(b.detach())
        else:
            a.copy_(b)
    if averaged:
        torch._foreach_lerp_(averaged, trained, 1 - beta)
    buffers = list(zip(ema.buffers(), model.buffers()))
    if buffers:
        torch._foreach_copy_([a for a, _ in buffers], [b for _, b in buffers])


class JsonLog:
    """Appends one JSON object a line; flushed at once so a crash loses nothing written.

    Only rank 0 of a data-parallel run writes; on the other ranks it is a no-op. The numbers of each
    "train" and "eval" line also go to TensorBoard (``torch.utils.tensorboard``, event files in the run
    folder's ``tensorboard/``, x axis: images seen): losses, images/s, the FID during training. Without
    the tensorboard package only the JSON lines are written."""

    def __init__(self, path: Path):
        main = distributed.is_main()
        self.file = open(path, "a") if main else None
        self.board = tensorboard_writer(path.parent / TENSORBOARD_DIR) if main else None

    def __call__(self, kind: str, **fields):
        if self.file is None:
            return
        self.file.write(json.dumps({"kind": kind, "time": now(), **fields}, default=float) + "\n")
        self.file.flush()
        if self.board is not None and kind in ("train", "eval") and "images" in fields:
            for key, value in fields.items():
                if key != "images" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.board.add_scalar(f"{kind}/{key}", value, global_step=int(fields["images"]))
            self.board.flush()

    def close(self):
        if self.file is not None:
            self.file.close()
        if self.board is not None:
            self.board.close()


TENSORBOARD_DIR = "tensorboard"


def tensorboard_writer(folder: Path):
    """A ``SummaryWriter`` into ``folder``, or None when the tensorboard package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(folder))


def train(model: GenerativeModel, images: torch.Tensor, cfg: TrainConfig, run_dir: Path, seed: int,
          evaluate: Callable[..., dict[str, Any]],
          stop_after_steps: Optional[int] = None,
          labels: Optional[torch.Tensor] = None) -> tuple[GenerativeModel, TrainState]:
    """Train ``model`` on uint8 ``images`` (already on the model's device) within the budget.

    ``labels`` (on the same device) are the class labels, passed to a conditional family's steps.

    ``evaluate(eval_model, final=...)`` is called at each evaluation point and returns metrics for the
    curve (``final`` at the end of training, whose point the caller may fill from its final measurement).
    Returns the model to evaluate (the EMA when enabled) and the final state.
    ``stop_after_steps`` (a test hook) returns after that many steps of this call, the state unfinished.
    """
    if cfg.max_images is None and cfg.max_seconds is None and cfg.max_flops is None:
        raise TrilemmaError("train needs a budget: set train.max_images, train.max_flops or train.max_seconds")
    device = model.device
    parallel, main = distributed.active(), distributed.is_main()
    run_dir.mkdir(parents=True, exist_ok=True)
    distributed.barrier()  # rank 0 has set the run folder up (an old checkpoint moved aside, ...)
    log = JsonLog(run_dir / LOG_FILE)
    if device.type == "cuda":
        set_tf32(cfg.tf32)

    # Build the EMA and the optimizers; resume from the last checkpoint if there is one.
    if parallel:
        distributed.broadcast_state(model)  # one initialisation on every rank
    ema = copy.deepcopy(model).eval().requires_grad_(False) if cfg.ema_halflife_images > 0 else None
    # The one optimizer step of every family: loss scaling (fp16), gradients averaged over ranks.
    update = Update(model, model.configure_optimizers(), grad_scaler(device, cfg.precision),
                    distributed.average_gradients if parallel else None)
    checkpoint = run_dir / CHECKPOINT_FILE
    if checkpoint.exists():
        state = restore(load_checkpoint(checkpoint, device), model, ema, update)
        log("resume", images=state.images, steps=state.steps, train_seconds=state.train_seconds)
    else:
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        state = TrainState()
        log("start", batch_size=cfg.batch_size, max_images=cfg.max_images, max_seconds=cfg.max_seconds)
    eval_model = ema if ema is not None else model
    conditional = model.capabilities.conditional
    if conditional and labels is None:
        raise TrilemmaError(f"{model.name} is class-conditional, but the data set has no labels")
    # Every rank draws the global batch's indices from one stream and keeps its slice of them.
    distributed.per_rank_batch(cfg.batch_size)
    stream = BatchStream(images, cfg.batch_size, seed, position=state.images, labels=labels)
    if cfg.compile:  # after the EMA's copy: the EMA is evaluated, never stepped
        compile_networks(model, cfg.compile_mode)

    def budget_fraction(unsettled_seconds: float = 0.0) -> float:
        parts = []
        if cfg.max_images is not None:
            parts.append(state.images / cfg.max_images)
        if cfg.max_flops is not None:
            parts.append(state.flops / cfg.max_flops)
        if cfg.max_seconds is not None:
            parts.append((state.train_seconds + unsettled_seconds) / cfg.max_seconds)
        return max(parts)

    # Steps are timed by a StepTimer: at once on a CPU, by CUDA events read only when needed on a GPU.
    # The step and image counts are always current; the seconds are brought up to date by settle().
    timer = StepTimer(device)
    last_step_seconds = float("nan")

    def counted(step: int) -> bool:
        """Whether step number ``step`` (from 1) has its FLOPs counted (and so is not timed)."""
        return (step - 1) % cfg.flops_every_steps == 0

    def settle() -> None:
        nonlocal last_step_seconds
        seconds = timer.collect()
        if not seconds:
            return
        if parallel:  # a step lasts as long as its slowest rank
            seconds = distributed.slowest(seconds, device)
        for step, dt in enumerate(seconds, state.steps - len(seconds) + 1):
            state.train_seconds += dt
            if step > cfg.warmup_steps and not counted(step):
                state.timed_images += cfg.batch_size
                state.timed_seconds += dt
        last_step_seconds = seconds[-1]

    def must_settle(tick: bool) -> bool:
        """Whether the seconds are needed now: at a logging tick, or where the steps not yet read
        (guessed at 1.5 times the mean step so far) may have reached an evaluation point or the end."""
        if not timer.deferred or tick:
            return True
        settled = state.steps - timer.pending
        guess = 1.5 * timer.pending * state.train_seconds / settled if settled else math.inf
        projected = budget_fraction(guess if cfg.max_seconds is not None else 0.0)
        return projected >= 1.0 or (cfg.eval_points and int(projected * cfg.eval_points + 1e-9) > state.evals_done)

    bar = tqdm(total=1000, initial=min(int(budget_fraction() * 1000), 1000), mininterval=1.0,
               bar_format="{desc} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]",
               desc=f"train {model.name}", leave=False, dynamic_ncols=True, disable=not main)
    last_checkpoint = time.perf_counter()
    loss_sums: dict[str, Any] = {}  # running sums, device tensors (or floats) until a logging tick
    loss_count, steps_this_call = 0, 0
    wall_start, wall_base = time.perf_counter(), state.wall_seconds
    try:
        while not state.finished:
            # One training step, timed by the StepTimer.
            model.train()
            model.progress = budget_fraction()
            update.step = state.steps
            counting = counted(state.steps + 1)
            timer.start()
            with autocast(device, cfg.precision), \
                    (counting_flops() if counting else contextlib.nullcontext()) as counter:
                if conditional:
                    x, y = stream.next_labeled()
                    losses = model.train_step(distributed.shard(x), update, labels=distributed.shard(y))
                else:
                    losses = model.train_step(distributed.shard(stream.next()), update)
            if parallel:  # buffers (batch-norm statistics, counters) follow rank 0, as under DDP; after
                # the first step the parameters too, as data-dependent initialisations (actnorm, a
                # codebook from the first batch) saw only each rank's own slice
                distributed.broadcast_state(model, buffers_only=state.steps > 0)
            timer.stop()
            if counting:  # every rank counts its own slice of the batch
                state.step_flops = counter.flops * distributed.world_size()
            state.flops += state.step_flops
            state.images += cfg.batch_size
            state.steps += 1
            for k, v in losses.items():
                v = v.float() if torch.is_tensor(v) else v  # a bf16 loss under autocast: summed in fp32
                loss_sums[k] = loss_sums[k] + v if k in loss_sums else v
            loss_count += 1

            # Update the EMA (outside the timed step: it is bookkeeping of the harness, not the model).
            if ema is not None:
                update_ema(ema, model, state.images, cfg.batch_size, cfg)
            state.wall_seconds = wall_base + time.perf_counter() - wall_start
            tick = state.steps % cfg.log_every_steps == 0
            if must_settle(tick):
                settle()
            fraction = budget_fraction()
            state.finished = fraction >= 1.0
            bar.update(min(int(fraction * 1000), 1000) - bar.n)

            # Log the running mean of the losses.
            if tick or state.finished:
                means = {k: float(v) / loss_count for k, v in loss_sums.items()}
                if parallel:
                    means = distributed.mean_over_ranks(means, device)
                bad = [k for k, v in means.items() if not math.isfinite(v)]
                if bad:  # a diverged model is a failed run, not a number
                    raise FloatingPointError(
                        f"non-finite training loss {bad[0]} = {means[bad[0]]} in steps "
                        f"{state.steps - loss_count + 1}-{state.steps} (images up to {state.images})")
                log("train", images=state.images, steps=state.steps, train_seconds=state.train_seconds,
                    images_per_second=cfg.batch_size / last_step_seconds, **means)
                bar.set_postfix({k: f"{v:.3g}" for k, v in list(means.items())[:2]}, refresh=False)
                loss_sums, loss_count = {}, 0

            # Evaluate at the planned points of the budget; the last one is the end of training.
            due = min(int(fraction * cfg.eval_points + 1e-9), cfg.eval_points) if cfg.eval_points else 0
            if due > state.evals_done or (state.finished and cfg.eval_points):
                eval_model.eval()
                with torch.no_grad():  # measured once, by rank 0; the others wait at the next step
                    metrics = evaluate(eval_model, final=state.finished) if main else {}
                point = {"images": state.images, "train_seconds": state.train_seconds, "flops": state.flops,
                         "wall_seconds": wall_base + time.perf_counter() - wall_start, **metrics}
                state.curve.append(point)
                state.evals_done = max(due, state.evals_done + 1)
                log("eval", **point)

            # Checkpoint after every evaluation, at the end, and every checkpoint_seconds.
            # (Under deferred timing only at a logging tick, where the seconds have just been settled:
            # an evaluation point and the end are settled by must_settle.)
            checkpoint_due = (time.perf_counter() - last_checkpoint >= cfg.checkpoint_seconds
                              and (tick or not timer.deferred))
            if main and (state.finished or checkpoint_due
                         or len(state.curve) and state.curve[-1]["images"] == state.images):
                state.wall_seconds = wall_base + time.perf_counter() - wall_start
                save_checkpoint(checkpoint, checkpoint_blob(model, ema, update, state))
                last_checkpoint = time.perf_counter()
            steps_this_call += 1

            # A pre-emption signal (noted by trilemma.run.preemption): checkpoint this step and stop.
            # Data parallel, the ranks agree at logging ticks, so that all stop at the same step.
            signum = preemption.requested()
            if parallel:
                signum = (signum or preemption.SIGNALS[0]) if tick and distributed.mean_over_ranks(
                    {"stop": float(signum is not None)}, device)["stop"] > 0 else None
            if signum is not None and not state.finished:
                settle()
                if main:
                    state.wall_seconds = wall_base + time.perf_counter() - wall_start
                    save_checkpoint(checkpoint, checkpoint_blob(model, ema, update, state))
                log("preempted", images=state.images, steps=state.steps, signal=preemption.name(signum))
                raise preemption.Preempted(f"pre-empted ({preemption.name(signum)}) at step {state.steps}: "
                                           f"checkpoint written; run again to resume", signum)
            if stop_after_steps is not None and steps_this_call >= stop_after_steps and not state.finished:
                log("stopped", images=state.images, steps=state.steps)  # the test hook: returns unfinished
                break
    finally:
        bar.close()
        log.close()
    if not all(bool(torch.isfinite(p).all()) for p in eval_model.parameters()):
        raise FloatingPointError(f"{model.name}: non-finite weights at the end of training "
                                 f"(step {state.steps})")
    return eval_model, state


def throughput(state: TrainState) -> float:
    """Steady-state training images per second (after the warm-up steps)."""
    if state.timed_seconds > 0:
        return state.timed_images / state.timed_seconds
    return state.images / state.train_seconds if state.train_seconds > 0 else float("nan")
