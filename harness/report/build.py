"""``trilemma report``: the comparison table and figures of one suite, beside the literature.

``build_report(suite, results_root, out_root)`` reads ``results/<suite>/*/result.json`` and writes
``reports/<suite>/``:

    table.md, table.tex, table.csv   the table (markdown; LaTeX with booktabs; raw numbers)
    *.png, *.pdf                     the figures of :mod:`trilemma.report.figures`
    samples/<run>.png                each run's sample grid, copied
    index.md                         the table, the figures and the provenance on one page

The table has one row per model of the review's table (``trilemma/contract/seed_table.csv``, Bond-
Taylor et al. 2021): rows that trilemma implements (a model whose ``literature`` names the row) show our
measurements beside the literature's figures; rows it does not implement show the literature's figures
only, marked "lit. only"; our models without a row in the review get rows of their own. Several seeds
of a model are one row (mean ± standard deviation). Only results whose status is "done" give numbers;
a model whose runs all failed keeps its row, with dashes and a note. The stars and marks are those of
:mod:`trilemma.report.marks`.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from trilemma.report import figures as plots
from trilemma.report.caption import describe
from trilemma.report.load import load_seed_table, load_suite_results, suite_name
from trilemma.report.render import render_index, render_latex, render_markdown
from trilemma.report.table import aggregate, csv_frame, record, several_datasets, table_rows
from trilemma.results.io import read_json
from trilemma.results.schema import SAMPLES_FILE, STATUS_DONE, SUITE_FILE


def build_report(suite: str | Path, results_root: Path, out_root: Path) -> Path:
    """Write ``<out_root>/<suite name>/`` from ``<results_root>/<suite name>/``; returns that folder."""
    name = suite_name(suite)
    suite_dir = Path(results_root) / name
    results = load_suite_results(suite_dir, name)
    suite_cfg = read_json(suite_dir / SUITE_FILE) if (suite_dir / SUITE_FILE).is_file() else {}
    out = Path(out_root) / name
    out.mkdir(parents=True, exist_ok=True)

    # The table: measured records -> one row per model -> rows beside the literature.
    records = pd.DataFrame([record(r) for r in results])
    models = aggregate(records)
    rows = table_rows(models, load_seed_table())
    caption, notes = describe(name, results, models)
    text = render_markdown(rows, caption, notes, several_datasets(models))
    (out / "table.md").write_text(text, encoding="utf-8")
    latex_table = render_latex(rows, name, caption, notes, several_datasets(models))
    (out / "table.tex").write_text(latex_table, encoding="utf-8")
    csv_frame(rows).to_csv(out / "table.csv", index=False, float_format="%.6g", lineterminator="\n")

    # Figures and sample grids, then the page that shows them all.
    done = [r for r in results if r.get("status") == STATUS_DONE]
    grids = copy_sample_grids(done, suite_dir, out / "samples")
    figures = plots.make_figures(models, done, grids, out)
    index = render_index(name, suite_cfg, text, figures, grids, results)
    (out / "index.md").write_text(index, encoding="utf-8")
    return out


def copy_sample_grids(done: list[dict], suite_dir: Path, out: Path) -> dict[str, Path]:
    """Copy each finished run's samples.png to ``out/<run>.png``; run -> copied path."""
    shutil.rmtree(out, ignore_errors=True)  # no grid of an earlier report left behind
    grids = {}
    for r in done:
        source = suite_dir / r["run"] / SAMPLES_FILE
        if source.is_file():
            out.mkdir(parents=True, exist_ok=True)
            grids[r["run"]] = Path(shutil.copyfile(source, out / f"{r['run']}.png"))
    return grids


