"""The optimizer step, owned by the harness and written once.

A family says what to minimise; :class:`Update` does the rest for every family alike: the learning
rate of the step (the family's schedule), ``zero_grad``, ``backward`` (the loss scaled under fp16),
the gradients averaged over data-parallel ranks, unscaled, clipped or the step skipped by the family's
:class:`GradientRule`, and the optimizer's step. A family whose update is one loss per optimizer
implements ``loss(x)``; a family with its own control flow (a GAN's alternation) calls
``update(role, loss)`` from its own ``train_step``. No family calls ``zero_grad``, ``backward`` or
``step`` itself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from trilemma.contract.errors import TrilemmaError


@dataclass(frozen=True)
class GradientRule:
    """What happens to one optimizer's gradients between backward and step."""

    clip: Optional[float] = None  # rescale them to at most this global L2 norm
    skip_above: Optional[float] = None  # skip the step when their norm (before clipping) is at or
    #   above this, or not finite; the optimizer's moments stay as they were (VD-VAE's rule)

    def __post_init__(self):
        for name in ("clip", "skip_above"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"GradientRule.{name} must be > 0 or None, got {value!r}")

    @property
    def needs_norm(self) -> bool:
        return self.clip is not None or self.skip_above is not None


class Update:
    """``update(role, loss)``: one optimizer step on ``loss`` for the optimizer of ``role``.

    Returns what the step measured, as detached tensors for the log: ``grad_norm`` (before clipping)
    when the family's rule clips or skips, and ``skipped`` (1.0 or 0.0) when it may skip.

    ``scaler`` is a ``torch.amp.GradScaler`` for fp16 training; ``average`` averages a list of
    gradients over the data-parallel ranks in place. ``step`` is the number of training steps done,
    set by the loop before each; the family's :meth:`~GenerativeModel.lr_factor` reads it.
    """

    def __init__(self, model: torch.nn.Module, optimizers: dict[str, torch.optim.Optimizer],
                 scaler: Optional[torch.amp.GradScaler] = None,
                 average: Optional[Callable[[list[torch.Tensor]], None]] = None):
        self.model, self.optimizers = model, optimizers
        self.scaler, self.average = scaler, average
        self.step = 0
        self.enabled = True  # False: every part of the step but the optimizer's (tests of learning)

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(self.optimizers)

    def __call__(self, role: str, loss: torch.Tensor) -> dict[str, torch.Tensor]:
        optimizer = self.optimizers.get(role)
        if optimizer is None:
            raise TrilemmaError(f"{self.model.name}: no optimizer for role {role!r}; roles: "
                                f"{', '.join(self.optimizers)}")
        if loss.ndim != 0:
            raise TrilemmaError(f"{self.model.name}: the {role} loss must be a scalar, got shape "
                                f"{tuple(loss.shape)}")
        factor = self.model.lr_factor(role, self.step)
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
            group["lr"] = group["initial_lr"] * factor

        # Gradients: zeroed, filled (scaled under fp16), averaged over ranks, unscaled.
        optimizer.zero_grad(set_to_none=True)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if self.average is not None:
            self.average([p.grad for p in params])
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

        # The family's rule: clip, or skip a step whose gradients are too large.
        rule = self.model.gradient_rule(role)
        logs: dict[str, torch.Tensor] = {}
        skip = None
        if rule.needs_norm:
            norm = torch.nn.utils.clip_grad_norm_(params, rule.clip if rule.clip is not None else math.inf)
            logs["grad_norm"] = norm.detach()
            if rule.skip_above is not None:
                skip = (~(norm < rule.skip_above)).float()  # NaN fails every comparison: skipped
                logs["skipped"] = skip.detach()
        if not self.enabled:
            return logs

        # The optimizer's step.
        if skip is not None and self.scaler is None and optimizer.defaults.get("fused"):
            optimizer.found_inf = skip  # read by the fused step: a 1 leaves weights and moments as they are
            optimizer.step()
            del optimizer.found_inf
        elif skip is not None and bool(skip):  # any other optimizer: decided on the host
            pass
        elif self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()  # after each step: a GAN's second loss is scaled with the new scale
        else:
            optimizer.step()
        return logs

    def state_dict(self) -> Optional[dict]:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: Optional[dict]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def plain_update(model: torch.nn.Module) -> Update:
    """An fp32, single-process :class:`Update` over the model's own optimizers (tests, scripts)."""
    return Update(model, model.configure_optimizers())
