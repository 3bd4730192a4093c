"""``trilemma report``: the comparison table and figures of one suite, beside the literature.

``build_report(suite, results_root, out_root)`` reads ``results/<suite>/*/result.json`` and writes
``reports/<suite>/``:

    table.md, table.tex, table.csv   the table (markdown; LaTeX for one column of a paper; raw numbers)
    table_beyond.tex                 the families the review has no row for (when there are some)
    table_protocol.tex               the main table's protocol and notes (a small table of their own)
    table_literature.tex             the review's rows this report did not measure (an appendix table)
                                     (table.md also holds, for Stacked MNIST runs, their modes beside the
                                     mode-collapse literature's: :mod:`trilemma.report.stacked`)
    *.png, *.pdf                     the figures of :mod:`trilemma.report.figures`
    samples/<run>.png                each run's sample grid, copied
    index.md                         the table, the figures and the provenance on one page

The table has one row per model of the review's table (``trilemma/contract/seed_table.csv``, Bond-
Taylor et al. 2021): rows that trilemma implements (a model whose ``literature`` names the row) show our
measurements beside the literature's figures; rows it does not implement show the literature's figures
only, marked "lit. only"; our models without a row in the review get rows of their own. Several seeds
of a model are one row (mean ± standard deviation). Only results whose status is "done" or
"incomplete" give numbers; a measurement that failed shows "failed" and its error's type in its cell,
with the first line of the error in a note; a model whose runs all failed keeps its row, with dashes
and a note. With ``evaluations="latest"``, each run's FID and NLL are those of its latest
``trilemma eval`` re-measurement (:func:`trilemma.results.schema.apply_evaluations`), and a note
says so. The stars and marks are those of
:mod:`trilemma.report.marks`.

Stars and plots compare runs, so one report holds runs of one protocol only
(:mod:`trilemma.results.protocol`: budget, data, FID protocol, extractor, precision, device class,
package versions). Over results of several protocols, ``protocols="refuse"`` (the default) stops
with a one-line error naming the fields that differ; ``protocols="split"`` writes one report per
protocol, ``reports/<suite>/protocol-<id>/``, and an index naming each one's fingerprint.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from trilemma.report import figures as plots
from trilemma.report.caption import describe
from trilemma.report.load import load_seed_table, load_suite_results, suite_name
from trilemma.report.render import (render_index, render_latex, render_latex_appendix, render_latex_beyond,
                                    render_latex_protocol, render_markdown, render_markdown_beyond)
from trilemma.report.stacked import stacked_section
from trilemma.report.table import (aggregate, beyond_rows, csv_frame, real_data_row, record, several_datasets,
                                   table_rows)
from trilemma.contract.errors import TrilemmaError
from trilemma.results.io import read_json
from trilemma.results.protocol import (REPORT_FIELDS, describe_difference, fingerprint_id, group_by_protocol,
                                      group_fingerprint)
from trilemma.results.schema import MEASURED, SAMPLES_FILE, SUITE_FILE, apply_evaluations


PROTOCOL_MODES = ("refuse", "split")


def build_report(suite: str | Path, results_root: Path, out_root: Path, protocols: str = "refuse",
                 evaluations: str = "own") -> Path:
    """Write ``<out_root>/<suite name>/`` from ``<results_root>/<suite name>/``; returns that folder."""
    if protocols not in PROTOCOL_MODES:
        raise TrilemmaError(f"protocols must be one of {', '.join(PROTOCOL_MODES)}, got {protocols!r}")
    name = suite_name(suite)
    suite_dir = Path(results_root) / name
    results = [apply_evaluations(r, evaluations) for r in load_suite_results(suite_dir, name)]
    suite_cfg = read_json(suite_dir / SUITE_FILE) if (suite_dir / SUITE_FILE).is_file() else {}
    out = Path(out_root) / name
    groups = group_by_protocol(results)
    if len(groups) == 1:
        return write_report(name, groups[0], suite_cfg, suite_dir, out)
    fps = [{k: v for k, v in group_fingerprint(g).items() if k in REPORT_FIELDS} for g in groups]
    if protocols == "refuse":
        raise TrilemmaError(f"suite {name!r} holds runs of {len(groups)} protocols, which differ in "
                            f"{describe_difference(fps, REPORT_FIELDS)}; give --protocols split for one "
                            f"report each")
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# trilemma report: {name}", "", f"The runs of this suite were measured under {len(groups)} "
             f"protocols, which differ in {describe_difference(fps, REPORT_FIELDS)}. Stars and figures "
             f"compare runs of one protocol only, so each has its own report.", ""]
    for group, fp in zip(groups, fps):
        folder = f"protocol-{fingerprint_id(fp)}"
        write_report(name, group, suite_cfg, suite_dir, out / folder)
        lines += [f"## [{folder}]({folder}/index.md): {len(group)} runs", "",
                  *[f"- {k}: {v}" for k, v in fp.items() if v is not None], ""]
    (out / "index.md").write_text("\n".join(lines), encoding="utf-8")
    return out


def write_report(name: str, results: list[dict], suite_cfg: dict, suite_dir: Path, out: Path) -> Path:
    """The report of results of one protocol, written to ``out``."""
    out.mkdir(parents=True, exist_ok=True)

    # The table: measured records -> one row per model -> rows beside the literature.
    records = pd.DataFrame([record(r) for r in results])
    models = aggregate(records)
    real = real_data_row(results)
    seed = load_seed_table()
    rows = ([real] if real else []) + table_rows(models, seed)
    beyond = beyond_rows(models, seed)  # families the review has no row for: a table of their own
    caption, notes = describe(name, results, models)
    text = render_markdown(rows, caption, notes, several_datasets(models))
    extra = render_markdown_beyond(beyond, several_datasets(models))
    text += ("\n" + extra) if extra else ""
    stacked = stacked_section(results)  # Stacked MNIST's modes beside the mode-collapse literature
    text += ("\n" + stacked) if stacked else ""
    (out / "table.md").write_text(text, encoding="utf-8")
    (out / "table.tex").write_text(render_latex(rows, name), encoding="utf-8")
    beyond_tex, beyond_latex = out / "table_beyond.tex", render_latex_beyond(beyond, name)
    if beyond_latex:
        beyond_tex.write_text(beyond_latex, encoding="utf-8")
    else:
        beyond_tex.unlink(missing_ok=True)
    (out / "table_protocol.tex").write_text(render_latex_protocol(name, caption, notes), encoding="utf-8")
    (out / "table_literature.tex").write_text(render_latex_appendix(rows, name), encoding="utf-8")
    csv_frame(rows + beyond).to_csv(out / "table.csv", index=False, float_format="%.6g", lineterminator="\n")

    # Figures and sample grids, then the page that shows them all.
    done = [r for r in results if r.get("status") in MEASURED]
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


