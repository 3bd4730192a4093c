"""``trilemma show``: a readable summary of one run's result or of a whole suite's results."""
from __future__ import annotations

import json
from pathlib import Path

from harness.errors import TrilemmaError
from harness.results import RESULT_FILE, load_results, read_result


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


def summary_row(result: dict) -> dict[str, str]:
    """The headline numbers of one result, formatted."""
    m = result["measurements"]
    train, sample = m.get("train", {}), m.get("sample", {})
    default = sample.get("samplers", {}).get(sample.get("default"), {})
    fid, nll = m.get("fid"), m.get("nll")
    return {
        "run": result["run"],
        "status": result["status"],
        "train img/s": _fmt(train.get("images_per_second")),
        "sample img/s": _fmt(default.get("images_per_second")),
        "NFE": _fmt(default.get("nfe_per_sample")),
        "params": _fmt(m.get("params", {}).get("total")),
        "FID": f"{fid['fid']:.2f}@{fid['n_gen']}" if fid else "-",
        "recall": _fmt(fid.get("recall")) if fid else "-",
        "bits/dim": (("<=" if nll["bound"] else "") + f"{nll['bpd']:.3f}") if nll else "-",
    }


def table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "(no results)"
    cols = list(rows[0])
    width = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(width[c]) for c in cols)]
    lines += ["  ".join(r[c].ljust(width[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def show(path: Path) -> str:
    path = Path(path)
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        raise TrilemmaError(f"{path} is not a results folder")
    if (path / RESULT_FILE).exists():
        result = read_result(path)
        head = table([summary_row(result)])
        body = json.dumps({"measurements": result["measurements"], "curve": result["curve"],
                           "provenance": result["provenance"], "error": result["error"]}, indent=2)
        return head + "\n\n" + body
    results = load_results(path)
    if not results:
        raise TrilemmaError(f"no results under {path}")
    return table([summary_row(r) for r in results])
