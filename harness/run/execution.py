"""How a run executes, as recorded settings: precision (autocast, loss scaling), TF32, torch.compile.

None of this changes what a family computes, only how: the family's ``train_step`` and ``generate``
run unchanged inside the contexts made here.

* ``precision`` ``bf16`` / ``fp16`` runs the train step (or sampling) under ``torch.autocast``;
  likelihoods (the NLL measurement) are never autocast.
* fp16 training needs loss scaling (``torch.amp.GradScaler``), applied by the one optimizer step
  every family goes through (:class:`trilemma.contract.update.Update`), as is the gradients'
  averaging over data-parallel ranks.
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


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def grad_scaler(device: torch.device, precision: str) -> Optional[torch.amp.GradScaler]:
    """The loss scaler fp16 training needs (:class:`trilemma.contract.update.Update` applies it)."""
    return torch.amp.GradScaler(torch.device(device).type) if precision == "fp16" else None


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
            "threads": torch.get_num_threads(), "allocator": _allocator, "process": _process,
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


# --- the allocator: the same state for the first run of a process as for the later ones ----------
# glibc raises its mmap threshold as large blocks are freed (up to 32 MiB on 64-bit), so a process
# that has run a large network allocates faster than a fresh one: VAE trained at about 1,000 img/s
# in a fresh process and about 1,550 once the FID extractor's calibration had run, and about 1,530
# both ways with the threshold fixed. Fixing it (as glibc's MALLOC_MMAP_THRESHOLD_ would) at the
# ceiling the dynamic rule reaches, with the trim threshold it pairs with it, times every run of a
# suite, the first included, in the state the others see.
MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


_allocator: Optional[str] = None  # what fix_allocator set in this process (execution records carry it)
# Where a run executes: a fresh worker process of its own (trilemma.run.worker) or the suite's process,
# whose allocator and caches carry the runs before it.
_process = "suite process"


def mark_worker() -> None:
    """Execution records made in this process say it is a run's fresh worker."""
    global _process
    _process = "fresh worker"


def fix_allocator() -> Optional[str]:
    """Fix glibc's mmap and trim thresholds for this process; returns what was set, or None where the C
    library is not glibc (the thresholds stay the platform's)."""
    global _allocator
    import ctypes
    import ctypes.util

    if _allocator is not None or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return _allocator
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    except (OSError, AttributeError):
        return None
    if ok:
        _allocator = (f"glibc mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold "
                      f"{TRIM_THRESHOLD >> 20} MiB (fixed)")
    return _allocator
