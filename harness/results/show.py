"""``trilemma show``: a readable summary of one run's result or of a whole suite's results.

Numbers are written as the report writes them (:mod:`trilemma.results.formats`); a legend under the
table says what each column and mark means, and a run that did not finish cleanly gets a line saying
why (its error's first line, or which measurement failed). Each model gets a line naming the variant its
runs measured and the literature FID they are compared with (:mod:`trilemma.contract.literature`).
"""
from __future__ import annotations

import json
from pathlib import Path

from trilemma.contract.errors import TrilemmaError
from trilemma.contract.literature import (Comparison, literature_comparison, mark_legend, measured_variant,
                                          run_conditioning)
from trilemma.results.formats import (format_fid, format_fraction, format_integer, format_kid, format_nll,
                                      format_rate)
from trilemma.results.io import load_results, read_result
from trilemma.results.schema import RESULT_FILE, STATUS_DONE, apply_evaluations, summarize
from trilemma.results.timings import timings_table


def summary_row(result: dict) -> dict[str, str]:
    """The headline numbers of one result, formatted."""
    s, c = summarize(result), compared(result)
    return {
        "run": (s.run or "?") + (" (pretrained)" if s.pretrained else ""),
        "status": s.status or "?",
        "train img/s": format_rate(s.train_images_per_second) + ("*" if s.train_contended else ""),
        "sample img/s": format_rate(s.sample_images_per_second) + ("*" if s.sample_contended else ""),
        "NFE": format_integer(s.sample_nfe),
        "params": format_integer(s.params),
        "FID": format_fid(s.fid, s.fid_pm, s.fid_samples),
        "FID∞": format_fid(s.fid_inf, s.fid_inf_pm, None),
        "KID×10³": format_kid(s.kid, s.kid_pm),
        "recall": format_fraction(s.recall, s.recall_pm),
        "bits/dim": format_nll(s.nll, s.nll_pm, s.nll_bound, s.nll_kind),
        "lit. FID": c.fid + c.mark if c.fid else "—",
    }


def conditioning(result: dict) -> bool | None:
    """Whether a run was class-conditional, from its config or the capabilities its result records."""
    model, config = (result.get(k) if isinstance(result.get(k), dict) else {} for k in ("model", "config"))
    return run_conditioning(config.get("model_config"), model.get("capabilities"))


def compared(result: dict) -> Comparison:
    """The literature FID a run is compared with: its review row's, else its paper's, or the paper's
    figure for the variant it ran."""
    s = summarize(result)
    fid, source = s.reported_fid, s.reported_source
    if s.literature is None and "reported" not in (result.get("model") or {}) and s.model:
        fid, source = _registered_reported(s.model)  # a result written before the runner recorded it
    return literature_comparison(s.model, s.literature, fid, source, conditioning(result))


def _registered_reported(name: str) -> tuple[float | None, str | None]:
    """The registered family's own reported FID and its source; None, None where it is not registered."""
    from trilemma.contract.registry import get_model_class  # imports torch: only for such old results

    try:
        reported = get_model_class(name).reported or {}
    except TrilemmaError:
        return None, None
    return reported.get("fid"), reported.get("source")


def variant_lines(results: list[dict]) -> list[str]:
    """One line per model: the variant its runs measured and the literature figure they are compared with."""
    lines: dict[str, tuple[str, Comparison]] = {}
    for r in results:
        s, c = summarize(r), compared(r)
        if s.model and c.text() and (s.model not in lines or not lines[s.model][1].fid):  # one with a figure
            ours = measured_variant(conditioning(r), s.sampler, s.sample_nfe)
            lines[s.model] = (f"{s.model}" + (f" ({ours})" if ours else "") + f": {c.text()}", c)
    if not lines:
        return []
    legend = mark_legend(c.mark for _, c in lines.values())
    return ["variants (ours; the literature FID compared with):", *(line for line, _ in lines.values()),
            *([legend] if legend else [])]


def table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "(no results)"
    cols = list(rows[0])
    width = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(width[c]) for c in cols)]
    lines += ["  ".join(r[c].ljust(width[c]) for c in cols) for r in rows]
    return "\n".join(lines)


LEGEND = """\
run        (pretrained): measured from weights trained elsewhere, not trained here
status     done; incomplete: trained, but a measurement failed (see below); failed: no numbers;
           running: not finished (the same command resumes it)
img/s      images per second, training and the default sampler's sampling; * timed while other
           processes held CPUs it wanted (contended: the speed is understated; no stars, not compared)
NFE        network evaluations per sample of the default sampler; params: parameters
FID        FID@n of n samples (1k: 1000), ± the half-width of a 95 % bootstrap interval; FID∞: FID
           extrapolated to infinitely many samples (Chong & Forsyth 2020)
KID×10³    kernel inception distance, times 1000; recall: Kynkäänniemi et al. (2019), k = 3
bits/dim   NLL on the test split: ≤ an upper bound, ≈ a Monte-Carlo estimate, plain: exact
lit. FID   the CIFAR-10 FID of the review's row (else the paper's), or the paper's for the variant the run
           measured (‡); § of another variant; the lines above name both variants
—          not measured, or not applicable to the model"""


def problems(results: list[dict]) -> list[str]:
    """One line per run that did not finish cleanly: its status and why (the error's first line)."""
    lines = []
    for r in results:
        s = summarize(r)
        if s.status == STATUS_DONE:
            continue
        if s.errors:
            why = "; ".join(f"{key} failed: {text}" for key, text in s.errors.items())
        else:
            error = r.get("error") if isinstance(r.get("error"), dict) else {}
            text = str(error.get("message") or "").strip()
            why = f"{error.get('type')}: {text.splitlines()[0] if text else ''}" if error else ""
        lines.append(f"{s.run or '?'}: {s.status}" + (f" ({why})" if why else ""))
    return lines


def show(path: Path, timings: bool = False, evaluations: str = "own") -> str:
    """The headline table of a suite's results (or one run's, with its measurements), a legend and a
    line per run that did not finish cleanly; with ``timings``, each phase's seconds instead. With
    ``evaluations="latest"`` the FID and NLL are those of each run's latest ``trilemma eval``."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        raise TrilemmaError(f"{path} is not a results folder")
    if timings:
        results = [read_result(path)] if (path / RESULT_FILE).exists() else load_results(path)
        if not results:
            raise TrilemmaError(f"no results under {path}")
        return timings_table(results)
    if (path / RESULT_FILE).exists():
        result = apply_evaluations(read_result(path), evaluations)
        head = table([summary_row(result)])
        keys = ("measurements", "measured_by", "evaluations", "errors", "curve", "provenance", "error")
        body = json.dumps({k: result.get(k) for k in keys if k in result}, indent=2)
        return "\n\n".join([head, *filter(None, ["\n".join(problems([result])), "\n".join(variant_lines([result]))]),
                            LEGEND, body])
    results = [apply_evaluations(r, evaluations) for r in load_results(path)]
    if not results:
        raise TrilemmaError(f"no results under {path}")
    remeasured = [r["run"] for r in results if r.get("measured_by")]
    note = (f"FID and NLL of {len(remeasured)} of {len(results)} runs from their latest `trilemma eval`"
            if evaluations == "latest" else "")
    return "\n\n".join(filter(None, [table([summary_row(r) for r in results]), "\n".join(problems(results)),
                                      "\n".join(variant_lines(results)), note, LEGEND]))
