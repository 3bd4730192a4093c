"""NLL in bits/dim on the test split, marked with what it is: exact, a bound, or an estimate.

The conversion to bits/dim and the meaning of each kind live in :mod:`trilemma.contract.likelihood`;
here the model's per-image ``nll`` (nats) is averaged over the split, with its standard error, and
:func:`figure_kind` says what the average is.
"""
from __future__ import annotations

import math
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from trilemma.contract.family import GenerativeModel
from trilemma.contract.likelihood import bits_per_dim, importance_weighted_nll


FIRST_CHUNK = 8  # a capped pass times this many images first, then sizes its chunks to the time left
SOLVER_CHECK_IMAGES = 4  # images re-scored by a tight reference solve to measure an ODE solver's error
WEIGHTED = "weighted_"  # nll_protocol() keys with this prefix describe the importance-weighted figure


@torch.no_grad()
def nll(model: GenerativeModel, images: torch.Tensor, batch: int,
        seconds_cap: float = float("inf"), draws: int = 1) -> dict[str, Any]:
    """Mean NLL in bits/dim over ``images`` (uint8, test split), marked as what it is.

    With ``draws`` > 1, a family that offers :meth:`~GenerativeModel.dequantized_log_prob` is scored by
    the importance-weighted estimate over that many dequantization draws per image (an estimate of
    the discrete NLL, where one draw gives a bound); other families ignore it, and the record says
    which was done.

    With a finite ``seconds_cap`` (a slow ODE likelihood) the first chunk is small and each later one
    holds at most the images the time left allows at the rate measured so far, so the pass ends near
    the cap rather than a whole batch after it; the record says how many images it covers, and the
    standard error of the mean over them.

    A family whose NLL solves an ODE also re-scores the first ``SOLVER_CHECK_IMAGES`` images with a
    tight reference solve (:meth:`~GenerativeModel.solver_error`), after the capped pass, and the record
    carries that solver error (``solver_error_bpd``, in bits/dim, beside ``bpd_sem``).
    """
    model.eval()
    weighted = draws > 1 and model.importance_weighted()
    if weighted:
        score = lambda x: importance_weighted_nll(model.dequantized_log_prob, x, draws)  # noqa: E731
    else:
        score = model.nll
    values, start = [], time.perf_counter()
    device = model.device
    bar = tqdm(total=len(images), desc=f"NLL {model.name}", unit="img", leave=False, mininterval=1.0,
               dynamic_ncols=True)
    done, capped = 0, math.isfinite(seconds_cap)
    while done < len(images):
        size = min(batch, len(images) - done)
        if capped:
            elapsed = time.perf_counter() - start
            if done == 0:
                size = min(size, FIRST_CHUNK)
            else:
                affordable = int((seconds_cap - elapsed) / (elapsed / done))
                if affordable < 1:
                    break
                size = min(size, affordable)
        chunk = images[done:done + size]
        nats = score(chunk.to(device))  # (B,) nats per image
        if not torch.isfinite(nats).all():
            raise FloatingPointError(f"{model.name}: non-finite NLL on the test split")
        values.append(nats.double().cpu())
        done += len(chunk)
        bar.update(len(chunk))
    bar.close()
    per_image = torch.cat(values)
    count = len(per_image)
    mean = float(per_image.mean())
    sem = float(per_image.std() / math.sqrt(count)) if count > 1 else float("nan")
    kind, protocol = figure_kind(model, draws if weighted else 1)
    record = {"bpd": float(bits_per_dim(mean, model.num_dims)), "bpd_sem": float(bits_per_dim(sem, model.num_dims)),
              "nats_per_image": mean, "bound": kind == "bound", "kind": kind, "split": "test",
              "n_images": count, "capped": count < len(images), "seconds": time.perf_counter() - start,
              "protocol": protocol}
    return record | (model.solver_error(images[:SOLVER_CHECK_IMAGES].to(device)) or {})


def figure_kind(model: GenerativeModel, draws: int = 1) -> tuple[str, dict[str, Any]]:
    """The kind and the recorded protocol of the figure :func:`nll` computes with ``draws``.

    ``draws`` > 1 is the importance-weighted figure of :meth:`~GenerativeModel.dequantized_log_prob`:
    the ``nll_protocol()`` entries prefixed ``weighted_`` (what that log density computes differently
    from ``nll()``: an exact trace where ``nll()`` estimates it) replace their namesakes, a None value
    dropping one. For one draw they are dropped.
    """
    own, weighted = {}, {}
    for key, value in model.nll_protocol().items():
        if key.startswith(WEIGHTED):
            weighted[key[len(WEIGHTED):]] = value
        else:
            own[key] = value
    if draws > 1:
        own = {k: v for k, v in (own | weighted).items() if v is not None}
        own |= {"dequantization_draws": draws, "importance_weighted": True}
    return what_it_is(model.capabilities.density, own)


def what_it_is(density: str, protocol: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The kind of the averaged figure, and the protocol with the reason when it differs from the
    family's density: a density of *dequantized* data ("exact", or "bound" where log p(y) is itself
    estimated without bias), one draw u per image, gives E_u[-log p(x + u)] >= -log P(x) (Theis et al.
    2016): a Monte-Carlo estimate of an upper bound on the discrete NLL, not the NLL itself.
    Importance-weighted over K draws it is an estimate of the discrete NLL (its bias, still upward,
    vanishes as K grows). A family that declares "estimate" keeps it: the contract test
    (tests/test_nll_kinds.py) catches one whose dequantized figure is a bound."""
    if density in ("exact", "bound") and protocol.get("dequantization"):
        draws = protocol.get("dequantization_draws", 1)
        if protocol.get("importance_weighted"):
            return "estimate", protocol | {"kind_reason": f"{protocol['dequantization']} dequantization, "
                                                          f"importance-weighted over {draws} draws per image: "
                                                          f"an estimate of -log P(x)"}
        return "bound", protocol | {"kind_reason": f"{protocol['dequantization']} dequantization, {draws} "
                                                   f"draw(s) per image: an upper bound on -log P(x)"}
    return density, protocol
