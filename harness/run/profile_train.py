"""``trilemma profile --model NAME``: one family's training throughput under several execution settings,
side by side in one process, as a fraction of the device's peak (MFU).

Each setting (fp32 eager, bf16 eager, bf16 compiled by default) trains a fresh model from the same
seed on the same random uint8 batch, timed by the one protocol (:mod:`trilemma.measure.timing`:
synchronized, untimed warm-up steps, the median of the timed ones). FLOPs per image are counted once,
on an fp32 eager step (:mod:`trilemma.measure.flops`): autocast and compilation change how the
arithmetic runs, not how much of it there is. MFU is the achieved FLOP/s over the dense peak of the
device at that precision where the device is known (H100, H200, A100); on other devices (a CPU) the
rate is given as a fraction of the measured convolution throughput instead, and said so.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from trilemma.contract.registry import build_model
from trilemma.measure.flops import device_peak, train_step_flops
from trilemma.measure.profile_eval import conv_throughput
from trilemma.measure.timing import load_average, time_calls
from trilemma.contract.update import Update
from trilemma.run.execution import (autocast, compile_networks, execution_record, grad_scaler,
                                    precision_label, set_tf32)

SETTINGS = (("fp32", None), ("bf16", None), ("bf16", "default"))  # (precision, compile mode or eager)


def _step(name: str, preset: Optional[str], shape: tuple[int, int, int], batch: int, device: torch.device,
          precision: str, compile_mode: Optional[str]):
    """A fresh model and a function running one of its training steps on a fixed batch."""
    torch.manual_seed(0)
    model = build_model(name, shape, preset, {}).to(device)
    x = torch.randint(0, 256, (batch, *shape), dtype=torch.uint8, device=device)
    kwargs = {}
    if model.capabilities.conditional:
        kwargs["labels"] = torch.zeros(batch, dtype=torch.int64, device=device)
    update = Update(model, model.configure_optimizers(), grad_scaler(device, precision))
    if compile_mode:
        compile_networks(model, compile_mode)
    model.train()

    def step():
        with autocast(device, precision):
            return model.train_step(x, update, **kwargs)
    return model, step


def profile_train(name: str, preset: Optional[str], shape: tuple[int, int, int], batch: int, steps: int,
                  warmup: int, device: torch.device, tf32: bool = True,
                  settings=SETTINGS) -> dict[str, Any]:
    """Images/s, FLOP/s and MFU of ``name`` at each (precision, compile mode) of ``settings``."""
    if device.type == "cuda":
        set_tf32(tf32)
    counted, _ = _step(name, preset, shape, min(batch, 8), device, "fp32", None)
    flops = train_step_flops(counted, min(batch, 8))  # per image
    del counted
    ceiling = None if device.type == "cuda" else conv_throughput(device, torch.get_num_threads()) * 1e9
    rows = []
    for precision, mode in settings:
        model, step = _step(name, preset, shape, batch, device, precision, mode)
        timing = time_calls(step, device, steps, warmup=warmup)
        rate = batch / timing["median"]
        label = precision_label(device, precision, tf32)
        peak = device_peak(execution_record(device, precision, tf32, mode, batch)["device_name"], label)
        rows.append({**execution_record(device, precision, tf32, mode, batch), "images_per_second": rate,
                     "seconds_per_step": timing["median"], "iqr_seconds": timing["iqr"],
                     "repeats": timing["repeats"], "warmup_seconds": timing["warmup_seconds"],
                     "flop_per_second": rate * flops, "peak_flop_per_second": peak,
                     "mfu": rate * flops / peak if peak else None,
                     "fraction_of_conv_ceiling": rate * flops / ceiling if ceiling else None})
        del model, step
    return {"model": name, "preset": preset, "image_shape": list(shape), "batch_size": batch,
            "flop_per_image": flops, "conv_flop_per_second": ceiling, "settings": rows,
            "load_average": load_average()}


def render(record: dict[str, Any]) -> str:
    rows = record["settings"]
    lines = [f"training {record['model']} (preset {record['preset']}) on {rows[0]['device_name']}, "
             f"batch {record['batch_size']}, {'x'.join(map(str, record['image_shape']))}; "
             f"{record['flop_per_image'] / 1e9:.3f} GFLOP per image (counted, one training step); "
             f"torch {rows[0]['torch']}, CUDA {rows[0]['cuda']}"]
    for r in rows:
        share = (f"MFU {r['mfu']:.1%} of {r['peak_flop_per_second'] / 1e12:.0f} TFLOP/s"
                 if r["mfu"] is not None
                 else f"{r['fraction_of_conv_ceiling']:.0%} of this machine's measured convolution rate"
                 if r["fraction_of_conv_ceiling"] is not None else "no known peak for this device")
        lines.append(f"  {r['precision']:>5} {r['compile']:<8} {r['images_per_second']:10.1f} images/s  "
                     f"{r['flop_per_second'] / 1e9:10.1f} GFLOP/s  {share}")
    return "\n".join(lines)
