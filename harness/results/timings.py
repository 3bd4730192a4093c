"""Where a suite's time went: each phase's seconds (a result's ``timings`` block), per run and summed.

``trilemma show results/<suite> --timings`` prints it; the README's budget of ``make bench`` is this
table for the default suite. Phases are the runner's (``train``, ``curve_fid``, ``fid_generate``,
``fid_features``, ``fid_metrics``, ``nll``, ``sample_speed``, ``scaling``, ...); a run resumed after a
kill adds up the seconds of all its attempts.
"""
from __future__ import annotations

from collections import defaultdict

from trilemma.results.schema import summarize


def phase_seconds(results: list[dict]) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """``({run: {phase: s}}, {phase: s summed over runs})``, phases in order of total time."""
    per_run: dict[str, dict[str, float]] = {}
    total: dict[str, float] = defaultdict(float)
    for result in results:
        timings = {k: float(v) for k, v in (result.get("timings") or {}).items() if isinstance(v, (int, float))}
        per_run[summarize(result).run or "?"] = timings
        for phase, seconds in timings.items():
            total[phase] += seconds
    order = sorted(total, key=total.get, reverse=True)
    return per_run, {phase: total[phase] for phase in order}


def _clock(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes}:{s:02d}"  # minutes:seconds


def timings_table(results: list[dict]) -> str:
    """Phases as columns (by total time), one row per run, the suite's total and share last."""
    per_run, total = phase_seconds(results)
    if not total:
        return "(no timings recorded)"
    phases = list(total)
    grand = sum(total.values())
    head = ["run", *phases, "all"]
    rows = [[run, *(_clock(t.get(p, 0.0)) for p in phases), _clock(sum(t.values()))] for run, t in per_run.items()]
    rows.append(["total", *(_clock(total[p]) for p in phases), _clock(grand)])
    rows.append(["share", *(f"{100 * total[p] / grand:.0f}%" for p in phases), "100%"])
    width = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, width)))

    return "\n".join(line(row) for row in [head, *rows])
