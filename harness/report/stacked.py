"""Stacked MNIST beside the mode-collapse literature: a section of a report whose runs scored modes.

The literature (``trilemma/contract/stacked_mnist_literature.csv``) reports modes covered of 1,000 and
KL(mode histogram || uniform) at 25,600 or 26,000 samples; a run of the CPU suite scores the FID's 500.
Modes covered depend on the sample count even for a perfect sampler (about ``1000 (1 - e^(-n/1000))``),
so each of our rows states its n and that expectation, and a row of a ``trilemma eval
--coverage-samples`` re-measurement at the literature's n is listed beside the run's own.
"""
from __future__ import annotations

import math
from typing import Any

from trilemma.contract.literature import stacked_mnist_rows
from trilemma.measure.coverage import STACKED_MODES, uniform_modes
from trilemma.results.formats import format_fraction, format_pm
from trilemma.results.schema import MEASURED, Summary, apply_evaluations, summarize


def _ours(results: list[dict[str, Any]]) -> list[tuple[str, Summary]]:
    """(label, summary) of each measured run with modes, and of its latest re-measurement at another n."""
    rows = []
    for r in results:
        own = summarize(r)
        if own.status not in MEASURED or own.modes is None:
            continue
        label = f"{own.title or own.model} (`{own.run}`)"
        rows.append((label, own))
        latest = summarize(apply_evaluations(r, "latest"))
        if latest.modes is not None and latest.coverage_samples != own.coverage_samples:
            rows.append((f"{label}, `trilemma eval`", latest))
    return rows


def stacked_section(results: list[dict[str, Any]]) -> str:
    """The Markdown section (empty when no run scored Stacked MNIST modes)."""
    ours = _ours(results)
    if not ours:
        return ""
    accuracy = sorted({s.classifier_accuracy for _, s in ours if s.classifier_accuracy is not None})
    lines = ["## Stacked MNIST beside the mode-collapse literature", "",
             "Modes covered of 1,000 and KL (nats) of the mode histogram from uniform, each channel's digit "
             "read by the harness's reference MNIST classifier"
             + (f" (test accuracy {', '.join(f'{a:.2%}' for a in accuracy)})" if accuracy else "")
             + "; ± half-widths of 95 % bootstrap intervals over the samples. The count of modes grows "
             "with the samples even for a perfect sampler: the last column is what one drawing the 1,000 "
             "modes uniformly covers at the row's n.", "",
             "| ours | n | modes | KL | three digits confident | uniform sampler's modes |",
             "| :--- | ---: | ---: | ---: | ---: | ---: |"]
    for label, s in ours:
        n = s.coverage_samples
        lines.append(f"| {label} | {n:,} | {format_pm(s.modes, s.modes_pm, 0)} | "
                     f"{format_pm(s.modes_kl, s.modes_kl_pm, 2)} | "
                     f"{format_fraction(s.modes_confident)} | {uniform_modes(n):,.0f} |" if n else f"| {label} | — | — | — | — | — |")
    lines += ["", "The literature, on the same protocol (its own classifier; n samples of one trained model; "
              f"log 1000 = {math.log(STACKED_MODES):.2f} is one mode):", "",
              "| model | n | modes | KL | setting | source |", "| :--- | ---: | ---: | ---: | :--- | :--- |"]
    for row in stacked_mnist_rows():
        lines.append(f"| {row['model']} | {row['samples']:,} | {row['modes']:g} | {row['kl']:.2f} | "
                     f"{row['architecture']} | {row['source']} |")
    return "\n".join(lines) + "\n"
