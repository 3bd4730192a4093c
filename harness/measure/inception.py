"""The FID Inception network, run at the machine's limit with its features unchanged.

torch-fidelity's ``inception-v3-compat`` (the TF-FID network of 2015-12-05) is the reference: same
weights, same TF1 bilinear resize to 299x299, same normalisation. What changes is how it runs:

    * the resize happens once per image, on its own channels: a one-channel MNIST image is resized
      once where the reference resizes three identical copies (resizing is per channel, so this is
      exact), and it never becomes three channels: the first convolution takes it with its weights
      summed over the three input channels (exact up to the rounding of that sum);
    * every convolution's batch normalisation (inference mode: a per-channel affine map) is folded into
      the convolution's weights and bias, so each layer makes one pass over memory instead of three;
    * channels-last memory layout (oneDNN's fast path on a CPU, tensor cores' on a GPU);
    * the thread count and batch size are chosen by timing a few batches on this machine the first
      time features are computed (:func:`calibrate`), cached per machine (:func:`cached_calibration`:
      host, device, cores, threads and torch version name the entry), and recorded with every FID;
    * optionally bfloat16 autocast, for the training-curve points only (it moves features by about 2 %,
      so final FIDs are always fp32; the curve records which).

Features agree with torch-fidelity's own network to about 1e-6 relative (``tests/test_fid.py``).
"""
from __future__ import annotations

import copy
import json
import os
import platform
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from trilemma.measure.timing import contended, load_average
from trilemma.results.io import atomic_write_json

INPUT_SIZE = 299
TRUNK = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
         "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
         "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool")


class FoldedConv(nn.Module):
    """A BasicConv2d (conv, batch norm, ReLU) with the batch norm folded into the convolution."""

    def __init__(self, basic: nn.Module):
        super().__init__()
        from torch.nn.utils.fusion import fuse_conv_bn_eval

        # Folded in float64, then rounded once to float32, so the folded weights are as exact as can be.
        conv, bn = copy.deepcopy(basic.conv).double().eval(), copy.deepcopy(basic.bn).double().eval()
        self.conv = fuse_conv_bn_eval(conv, bn).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(x), inplace=True)


def _is_basic_conv(module: nn.Module) -> bool:
    return hasattr(module, "conv") and isinstance(getattr(module, "bn", None), nn.BatchNorm2d)


def fold_batch_norms(module: nn.Module) -> nn.Module:
    """``module`` with every BasicConv2d in it, or ``module`` itself if it is one, folded into a
    :class:`FoldedConv` (children are replaced in place)."""
    if _is_basic_conv(module):
        return FoldedConv(module)
    for name, child in list(module.named_children()):
        setattr(module, name, fold_batch_norms(child))
    return module


class FastInception(nn.Module):
    """uint8 images ``(B, C, H, W)``, C in (1, 3), to the 2048-d pool3 features, float32 ``(B, 2048)``."""

    def __init__(self, reference: nn.Module):
        super().__init__()
        reference = copy.deepcopy(reference).float().eval()
        self.trunk = nn.Sequential(*[fold_batch_norms(getattr(reference, name)) for name in TRUNK])
        # A grey image's three channels are equal, so the first convolution of its three copies is the
        # convolution of the one channel with the weights summed over the input channels.
        first = self.trunk[0].conv
        self.grey_stem = nn.Conv2d(1, first.out_channels, first.kernel_size, first.stride, bias=True)
        self.grey_stem.weight.data = first.weight.double().sum(1, keepdim=True).float()
        self.grey_stem.bias.data = first.bias.clone()
        self.requires_grad_(False)
        self.bf16 = False  # autocast to bfloat16 (training-curve points only)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

        x = interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(INPUT_SIZE, INPUT_SIZE),
                                                      align_corners=False)  # (B, C, 299, 299), once per channel
        x = (x - 128) / 128  # exactly the reference's normalisation
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            if x.shape[1] == 1:
                # A one-channel tensor is NCHW and channels-last at once, and the convolution answers
                # NCHW: the layout is set again for the rest of the network (measured faster than
                # writing the ReLU's output channels-last).
                x = self.grey_stem(x).contiguous(memory_format=torch.channels_last)
                features = self.trunk[1:](F.relu(x, inplace=True))  # (B, 2048, 1, 1)
            else:
                features = self.trunk(x)
        return torch.flatten(features, 1).float()


def calibrate(net: FastInception, device: torch.device, sizes=(8, 16, 32), seconds: float = 12.0) -> dict:
    """Choose the batch size (and, on a CPU, the thread count) that extracts the most images per second
    here and now, by timing a batch of each; returns the choice and what was measured.

    On a CPU the candidates are one thread and all the cores torch may use: on a busy 2-core machine one
    thread was measured faster than two, on a quiet one two threads are faster. The thread counts are
    compared first, each at the middle batch size, so that every count is tried whatever the time cap;
    then the other batch sizes at the winning count, while the calibration stays within ``seconds``.
    Each trial is one untimed warm-up batch and one timed batch.
    """
    device = torch.device(device)
    threads = [torch.get_num_threads()]
    if device.type == "cpu" and (os.cpu_count() or 1) > 1:
        threads = sorted({1, min(torch.get_num_threads(), os.cpu_count() or 1)})
    before = torch.get_num_threads()
    middle = sorted(sizes)[len(sizes) // 2]
    x = torch.randint(0, 256, (max(sizes), 3, 32, 32), dtype=torch.uint8, device=device)
    trials = []

    def trial(n: int, size: int) -> None:
        torch.set_num_threads(n)
        net(x[:size])  # warm-up: kernels, allocations
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        net(x[:size])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        trials.append({"threads": n, "batch": size, "images_per_second": size / (time.perf_counter() - t0)})

    start = time.perf_counter()
    with torch.inference_mode():
        for n in threads:
            trial(n, middle)
        best_threads = max(trials, key=lambda t: t["images_per_second"])["threads"]
        for size in sizes:
            if size != middle and time.perf_counter() - start < seconds:
                trial(best_threads, size)
    torch.set_num_threads(before)
    best = max(trials, key=lambda t: t["images_per_second"])
    return {"threads": best["threads"], "batch": best["batch"], "trials": trials}


CALIBRATION_FILE = Path("~/.cache/trilemma/inception-calibration.json").expanduser()


def machine_key(device: torch.device) -> str:
    """What a calibration depends on: the host, the device, the cores and threads, torch's version."""
    device = torch.device(device)
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine())
    return (f"{platform.node()} | {device.type} {name} | {os.cpu_count()} cores | {torch.get_num_threads()} "
            f"threads | torch {torch.__version__}")


def cached_calibration(net: FastInception, device: torch.device, path: Optional[Path] = None) -> dict:
    """:func:`calibrate`'s choice for this machine, read from ``path`` (default ``CALIBRATION_FILE``)
    when an earlier process made it, else made now and stored there; ``cached`` says which. A CPU
    calibration timed while the machine's load exceeded its cores is used by this process only (its
    choice is the neighbours', not the machine's), and a stored one without the load it was made
    under is made again when the machine is quiet (while it is busy, the stored one is kept, so that
    a run and its re-measurement extract the same features)."""
    path = Path(path or CALIBRATION_FILE)
    key = machine_key(device)
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
        table = table if isinstance(table, dict) else {}
    except (OSError, ValueError):  # none yet, or unreadable: calibrate afresh
        table = {}
    entry = table.get(key)
    usable = isinstance(entry, dict) and all(isinstance(entry.get(k), int) and entry[k] > 0
                                             for k in ("batch", "threads"))
    if usable and "load" in entry:
        return entry | {"cached": True, "machine": key}
    before = load_average()
    fresh = calibrate(net, device) | {"load": [before, load_average()]}
    if device.type == "cpu" and contended(*fresh["load"]):
        if usable:  # the stored choice still: the machine's processes extract features alike
            return entry | {"cached": True, "machine": key}
        return fresh | {"cached": False, "contended": True, "machine": key}
    entry = fresh
    try:
        atomic_write_json(path, {**table, key: entry})
    except OSError:  # a read-only home: calibrate again next time
        pass
    return entry | {"cached": False, "machine": key}


def set_threads(n: Optional[int]) -> int:
    """Set torch's intra-op threads (when ``n`` is given); returns the previous count."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    return before
