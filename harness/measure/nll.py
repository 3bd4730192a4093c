"""NLL in bits/dim on the test split, marked with what it is: exact, a bound, or an estimate.

The conversion to bits/dim and the meaning of each kind live in :mod:`trilemma.contract.likelihood`;
here the model's per-image ``nll`` (nats) is averaged over the split.
"""
from __future__ import annotations

from typing import Any

import torch

from trilemma.contract.family import GenerativeModel
from trilemma.contract.likelihood import bits_per_dim


@torch.no_grad()
def nll(model: GenerativeModel, images: torch.Tensor, batch: int) -> dict[str, Any]:
    """Mean NLL in bits/dim over ``images`` (uint8, test split), marked as a bound when it is one."""
    model.eval()
    total, count = 0.0, 0
    device = model.device
    for chunk in images.split(batch):
        values = model.nll(chunk.to(device))  # (B,) nats per image
        if not torch.isfinite(values).all():
            raise FloatingPointError(f"{model.name}: non-finite NLL on the test split")
        total += float(values.double().sum())
        count += len(chunk)
    density = model.capabilities.density
    return {"bpd": float(bits_per_dim(total / count, model.num_dims)),
            "nats_per_image": total / count, "bound": density == "bound", "kind": density,
            "split": "test", "n_images": count, "protocol": model.nll_protocol()}
