"""Rendering the table as Markdown and LaTeX, and the index page that shows everything."""
from __future__ import annotations

import unicodedata
from pathlib import Path

from trilemma.report import figures as plots
from trilemma.report import marks as stars
from trilemma.report.table import cells

# Table columns: key, header, LaTeX alignment. "dataset" is shown only when a suite has several.
COLUMNS = [("family", "Family", "l"), ("model", "Model", "l"), ("ours", "Ours", "l"),
           ("dataset", "Data", "l"), ("train", "Train speed", "c"), ("sample", "Sample speed", "c"),
           ("params", "Param. efficiency", "c"), ("scaling", "Res. scaling", "c"),
           ("jacobian", "Free-form Jacobian", "c"), ("density", "Exact density", "c"),
           ("fid", "FID", "r"), ("kid", "KID×10³", "r"), ("precision", "Precision", "r"),
           ("recall", "Recall", "r"), ("nll", "NLL (bits/dim)", "r"),
           ("lit_fid", "FID (lit.)", "r"), ("lit_nll", "NLL (lit.)", "r")]


def _visible(several: bool) -> list[tuple[str, str, str]]:
    return [c for c in COLUMNS if several or c[0] != "dataset"]


def render_markdown(rows: list[dict], caption: str, notes: list[str], several: bool) -> str:
    columns = _visible(several)
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = [f"**Table.** {caption}", "",
             "| " + " | ".join(header for _, header, _ in columns) + " |",
             "|" + "|".join({"l": " :--- ", "c": " :---: ", "r": " ---: "}[align] for *_, align in columns) + "|"]
    for row in rows:
        c = cells(row)
        lines.append("| " + " | ".join(esc(c[key]) for key, *_ in columns) + " |")
    lines += ["", stars.rule_sentence()]
    if notes:
        lines += ["", "Notes:", *[f"- {note}" for note in notes]]
    return "\n".join(lines) + "\n"


# Unicode of the cells -> LaTeX (booktabs and pifont); special characters escaped in the same pass.
LATEX = {"★": r"\ding{72}", "☆": r"\ding{73}", "✓": r"\ding{51}", "✗": r"\ding{55}", "±": r"$\pm$",
         "≤": r"$\leq$", "³": r"$^3$", "≈": r"$\approx$", "×": r"$\times$", "—": "---", "–": "--", "…": r"\ldots{}",
         "ä": r"\"a", "“": "``", "”": "''", "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$",
         "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex(text: str) -> str:
    """Escape text for LaTeX; `code` spans become \\texttt."""
    parts = text.split("`")
    out = ["".join(LATEX.get(ch) or _ascii(ch) for ch in part) for part in parts]
    return "".join(p if i % 2 == 0 else rf"\texttt{{{p}}}" for i, p in enumerate(out))


def _ascii(ch: str) -> str:
    """Other non-ASCII characters (in an error message, say): their ASCII base letter, else "?",
    so that pdflatex never stops at a character it has no glyph for."""
    if ch.isascii():
        return ch
    return unicodedata.normalize("NFKD", ch).encode("ascii", "ignore").decode() or "?"


def render_latex(rows: list[dict], name: str, caption: str, notes: list[str], several: bool) -> str:
    columns = _visible(several)
    lines = [f"% trilemma report of suite {name}, written by `trilemma report`.",
             r"% Needs \usepackage{booktabs}, \usepackage{graphicx} and \usepackage{pifont} (stars and marks).",
             r"\begin{table*}[t]", r"\centering", rf"\caption{{{latex(caption)}}}",
             rf"\label{{tab:trilemma-{name}}}", r"\scriptsize", r"\setlength{\tabcolsep}{3pt}",
             r"\resizebox{\textwidth}{!}{%",  # a wide table: scaled to the page width
             r"\begin{tabular}{" + "".join(align for *_, align in columns) + "}", r"\toprule",
             " & ".join(latex(header) for _, header, _ in columns) + r" \\", r"\midrule"]
    previous = None
    for row in rows:
        if previous is not None and row["family"] != previous:
            lines.append(r"\midrule")  # families in blocks, as the review prints them
        previous = row["family"]
        c = cells(row)
        lines.append(" & ".join(latex(c[key]) for key, *_ in columns) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}}", "", r"\smallskip", r"\parbox{\textwidth}{\footnotesize "
              + latex(" ".join([stars.rule_sentence(), *notes])) + "}", r"\end{table*}"]
    return "\n".join(lines) + "\n"


def render_index(name: str, suite_cfg: dict, table_md: str, figures: list[plots.Figure],
                 grids: dict[str, Path], results: list[dict]) -> str:
    lines = [f"# trilemma report: {name}", ""]
    if suite_cfg.get("description"):
        lines += [suite_cfg["description"], ""]
    lines += [table_md, "Also as [LaTeX](table.tex) and [CSV](table.csv) (the numbers behind the stars).", ""]
    for fig in figures:
        lines += [f"## {fig.title}", ""]
        if fig.written:
            lines += [f"![{fig.title}]({fig.stem}.png)", "", f"{fig.caption} ([PDF]({fig.stem}.pdf))", ""]
        else:
            lines += [f"*Not drawn: {fig.note}*", ""]
    lines += ["## Sample grids", ""]
    lines += [f"### {run}\n\n![samples of {run}](samples/{path.name})\n" for run, path in grids.items()] \
        or ["*No run saved a sample grid.*", ""]
    lines += ["## Provenance", "", "| run | status | device | git commit | torch | finished |",
              "| :--- | :--- | :--- | :--- | :--- | :--- |"]
    for r in results:
        p = r.get("provenance") or {}
        commit = (p.get("git_commit") or "?")[:12] + (" (dirty)" if p.get("git_dirty") else "")
        lines.append(f"| `{r.get('run')}` | {r.get('status')} | {p.get('device_name', '?')} | {commit} | "
                     f"{(p.get('versions') or {}).get('torch', '?')} | {p.get('finished') or '—'} |")
    return "\n".join(lines) + "\n"
