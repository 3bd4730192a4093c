"""FLOPs counted by ``torch.utils.flop_counter`` (matmuls and convolutions, forward and backward) on
real calls, and device peaks, so a measured rate reads as a fraction of the peak (MFU) and a suite's
GPU-hours can be estimated (:mod:`trilemma.run.estimate`).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from trilemma.contract.update import plain_update

# Dense peak FLOP/s of an H100 SXM by precision (NVIDIA's datasheet; no sparsity).
H100_PEAK = {"fp32": 67e12, "tf32": 495e12, "bf16": 989e12, "fp16": 989e12}
ASSUMED_MFU = 0.10  # small models at batch 128 are launch-bound: a tenth of the peak is generous

# Peak dense FLOP/s of devices by name fragment, for MFU (bf16/fp16 tensor cores; fp32 non-tensor).
DEVICE_PEAKS = {"H100": H100_PEAK, "H200": H100_PEAK,
                "A100": {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12, "fp16": 312e12}}


class _FlopCount(TorchDispatchMode):
    """Sums ``torch.utils.flop_counter``'s per-operator FLOP formulas over every dispatched operator.

    FlopCounterMode itself tracks modules with hooks that ``torch.autograd.grad`` inside a step
    (Langevin sampling, GON's inner gradient, a Jacobian trace) does not support; this does not."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


@contextlib.contextmanager
def counting_flops() -> Iterator[_FlopCount]:
    """Counts the FLOPs of what runs inside the block (``.flops``), compiled networks run eagerly
    for it (a compiled graph's kernels bypass the dispatcher, so they would count as nothing)."""
    stance = getattr(torch.compiler, "set_stance", None)
    with (stance("force_eager") if stance is not None else contextlib.nullcontext()), _FlopCount() as counter:
        yield counter


def count_flops(fn) -> int:
    """FLOPs of one call of ``fn`` (matmuls and convolutions, forward and backward)."""
    with counting_flops() as counter:
        fn()
    return int(counter.flops)


def train_step_flops(model, batch: int = 2) -> float:
    """FLOPs per image of one training step of ``model`` on random uint8 images (on its device)."""
    x = torch.randint(0, 256, (batch, *model.data_shape), dtype=torch.uint8, device=model.device)
    update = plain_update(model)
    model.train()
    kwargs = {}
    if model.capabilities.conditional:
        kwargs["labels"] = torch.zeros(batch, dtype=torch.int64, device=model.device)
    return count_flops(lambda: model.train_step(x, update, **kwargs)) / batch


def device_peak(device_name: str, precision: str) -> Optional[float]:
    """The dense peak FLOP/s of a known device at ``precision``, else None."""
    for fragment, peaks in DEVICE_PEAKS.items():
        if fragment in device_name:
            return peaks.get(precision)
    return None
