"""How a run executes, as recorded settings: precision (autocast, loss scaling), TF32, torch.compile.

None of this changes what a family computes, only how: the family's ``train_step`` and ``generate``
run unchanged inside the contexts made here.

* ``precision`` ``bf16`` / ``fp16`` runs the train step (or sampling) under ``torch.autocast``;
  likelihoods (the NLL measurement) are never autocast.
* fp16 training needs loss scaling. The contract lets a family own its backward passes and optimizer
  steps (a GAN's two), so the scaling is applied around them (:class:`StepHooks`): a scalar loss's
  ``backward()`` is scaled, and each optimizer the step is given unscales its gradients before
  clipping or stepping (``torch.amp.GradScaler``; the scale is updated after each optimizer step).
* Under data parallelism (:mod:`trilemma.run.distributed`) the same hooks average the gradients over
  the ranks before clipping or stepping, which is what DistributedDataParallel does, for any number of
  optimizers and any control flow in the step.
* ``compile`` compiles each network of the family in place (``nn.Module.compile``: state-dict keys
  stay as they are, so checkpoints and weights files do not change); a family opts out with the
  class attribute ``compilable = False``.
* TF32 is a setting; a fp32 figure on a GPU with TF32 on is recorded as ``tf32``, never ``fp32``.
"""
from __future__ import annotations

import contextlib
import functools
import platform
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from trilemma.contract.errors import TrilemmaError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """``torch.autocast`` for ``bf16`` / ``fp16``; nothing for ``fp32``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=DTYPES[precision])


def set_tf32(enabled: bool) -> None:
    """TF32 for CUDA matmuls and cuDNN convolutions, both set (cuDNN's default is on)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def precision_label(device: torch.device, precision: str, tf32: bool) -> str:
    """What the arithmetic was: ``tf32`` for fp32 on a CUDA device with TF32 on."""
    return "tf32" if precision == "fp32" and tf32 and torch.device(device).type == "cuda" else precision


def execution_record(device: torch.device, precision: str, tf32: bool, compile_mode: Optional[str],
                     batch_size: int, **extra: Any) -> dict[str, Any]:
    """The settings every speed figure carries: precision, compile mode, batch, device, versions."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    return {"precision": precision_label(device, precision, tf32), "compile": compile_mode or "eager",
            "batch_size": batch_size, "device": str(device), "device_name": name,
            "torch": torch.__version__, "cuda": torch.version.cuda, **extra}


def compile_networks(model: nn.Module, mode: str) -> list[str]:
    """Compile the family's networks (its direct sub-modules with parameters) in place; their names.

    ``[]`` when the family sets ``compilable = False`` (its networks re-trace too often, or use what
    the compiler does not support).
    """
    if not model.compilable:
        return []
    names = []
    for name, child in model.named_children():
        if any(True for _ in child.parameters()):
            child.compile(mode=None if mode == "default" else mode)
            names.append(name)
    return names


@contextlib.contextmanager
def sampling_precision(model: nn.Module, precision: str) -> Iterator[None]:
    """Within the block, the model's ``generate``/``generate_at`` run under autocast and return fp32."""
    if precision == "fp32":
        yield
        return

    def wrap(method: Callable) -> Callable:
        @functools.wraps(method)
        def autocast_call(*args, **kwargs):
            with autocast(model.device, precision):
                out = method(*args, **kwargs)
            return out.float()
        return autocast_call

    # Instance attributes shadow the class's methods for this block; GenerativeModel.sample calls
    # self.generate, so every sampling path (FID, grid, speed) goes through the wrapper.
    model.generate = wrap(model.generate)
    model.generate_at = wrap(model.generate_at)
    try:
        yield
    finally:
        del model.generate, model.generate_at


class StepHooks:
    """Loss scaling (fp16) and gradient averaging (data parallel) around a family's own train step.

    ``optimizers(opts)`` gives the proxies to pass to ``train_step``; run the step inside ``step()``.
    Without fp16 or data parallelism nothing is wrapped (``active`` is False).
    """

    def __init__(self, device: torch.device, precision: str, average_gradients: Optional[Callable] = None):
        self.scaler = torch.amp.GradScaler(torch.device(device).type) if precision == "fp16" else None
        self.average = average_gradients  # grads -> None, in place, averaged over the ranks
        self.active = self.scaler is not None or self.average is not None
        self._proxies: list[_HookedOptimizer] = []

    def optimizers(self, optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, Any]:
        if not self.active:
            return optimizers
        proxies = {k: _HookedOptimizer(o, self) for k, o in optimizers.items()}
        self._proxies = list(proxies.values())
        return proxies

    def prepare(self, opt: torch.optim.Optimizer) -> None:
        """Averaged over the ranks, then unscaled: once per optimizer step."""
        if self.average is not None:
            self.average([p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None])
        if self.scaler is not None:
            self.scaler.unscale_(opt)

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        if not self.active:
            yield
            return
        original_backward, original_clip = torch.Tensor.backward, nn.utils.clip_grad_norm_
        scaler, proxies = self.scaler, self._proxies

        def backward(tensor, gradient=None, *args, **kwargs):
            if scaler is not None and gradient is None and tensor.numel() == 1:
                tensor = scaler.scale(tensor)
            return original_backward(tensor, gradient, *args, **kwargs)

        def clip_grad_norm_(parameters, *args, **kwargs):
            parameters = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
            ids = {id(p) for p in parameters}
            for proxy in proxies:  # every optimizer that owns one of these parameters gets ready first
                if not proxy.prepared and any(id(p) in ids for g in proxy.param_groups for p in g["params"]):
                    proxy.get_ready()
            return original_clip(parameters, *args, **kwargs)

        torch.Tensor.backward, nn.utils.clip_grad_norm_ = backward, clip_grad_norm_
        try:
            yield
        finally:
            torch.Tensor.backward, nn.utils.clip_grad_norm_ = original_backward, original_clip

    def state_dict(self) -> Optional[dict[str, Any]]:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: Optional[dict[str, Any]]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


class _HookedOptimizer:
    """An optimizer as the family sees it: ``step()`` averages/unscales first; the rest passes through."""

    def __init__(self, optimizer: torch.optim.Optimizer, hooks: StepHooks):
        self._optimizer, self._hooks = optimizer, hooks
        self.prepared = False

    def get_ready(self) -> None:
        self._hooks.prepare(self._optimizer)
        self.prepared = True

    def step(self, closure=None):
        if closure is not None:
            raise TrilemmaError("optimizer steps with a closure are not supported under fp16 or data "
                                "parallelism")
        if not self.prepared:
            self.get_ready()
        scaler = self._hooks.scaler
        if scaler is not None:
            scaler.step(self._optimizer)
            scaler.update()  # per step: a GAN's second loss is scaled with the updated scale
        else:
            self._optimizer.step()
        self.prepared = False

    def __getattr__(self, name: str):
        return getattr(self._optimizer, name)
