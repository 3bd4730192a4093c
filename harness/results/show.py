"""``trilemma show``: a readable summary of one run's result or of a whole suite's results.

Numbers are written as the report writes them (:mod:`trilemma.results.formats`).
"""
from __future__ import annotations

import json
from pathlib import Path

from trilemma.contract.errors import TrilemmaError
from trilemma.results.formats import (format_fid, format_fraction, format_integer, format_kid, format_nll,
                                      format_rate)
from trilemma.results.io import load_results, read_result
from trilemma.results.schema import RESULT_FILE, summarize
from trilemma.results.timings import timings_table


def summary_row(result: dict) -> dict[str, str]:
    """The headline numbers of one result, formatted."""
    s = summarize(result)
    return {
        "run": s.run or "?",
        "status": s.status or "?",
        "train img/s": format_rate(s.train_images_per_second),
        "sample img/s": format_rate(s.sample_images_per_second) + ("*" if s.contended else ""),
        "NFE": format_integer(s.sample_nfe),
        "params": format_integer(s.params),
        "FID": format_fid(s.fid, s.fid_pm, s.fid_n),
        "FID∞": format_fid(s.fid_inf, s.fid_inf_pm, None),
        "KID×10³": format_kid(s.kid, s.kid_pm),
        "recall": format_fraction(s.recall, s.recall_pm),
        "bits/dim": format_nll(s.nll, s.nll_pm, s.nll_bound, s.nll_kind),
    }


def table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "(no results)"
    cols = list(rows[0])
    width = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(width[c]) for c in cols)]
    lines += ["  ".join(r[c].ljust(width[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def show(path: Path, timings: bool = False) -> str:
    """The headline table of a suite's results (or one run's, with its measurements); with ``timings``,
    each phase's seconds instead."""
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
        result = read_result(path)
        head = table([summary_row(result)])
        body = json.dumps({k: result.get(k) for k in ("measurements", "evaluations", "curve", "provenance",
                                                       "error") if k in result}, indent=2)
        return head + "\n\n" + body
    results = load_results(path)
    if not results:
        raise TrilemmaError(f"no results under {path}")
    return table([summary_row(r) for r in results])
