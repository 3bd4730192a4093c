"""Rendering the table as Markdown and LaTeX, and the index page that shows everything."""
from __future__ import annotations

import re
import unicodedata
from pathlib import Path

from trilemma.contract.literature import mark_legend
from trilemma.report import figures as plots
from trilemma.report import marks as stars
from trilemma.report.table import _number, cells, variant_notes
from trilemma.results.formats import format_count, format_nll

# Table columns: key, header, LaTeX alignment. "dataset" is shown only when a suite has several.
COLUMNS = [("family", "Family", "l"), ("model", "Model", "l"), ("ours", "Ours", "l"),
           ("dataset", "Data", "l"), ("train", "Train speed", "c"), ("sample", "Sample speed", "c"),
           ("params", "Param. efficiency", "c"), ("scaling", "Res. scaling", "c"),
           ("jacobian", "Free-form Jacobian", "c"), ("density", "Exact density", "c"),
           ("fid", "FID", "r"), ("kid", "KID×10³", "r"), ("precision", "Precision", "r"),
           ("recall", "Recall", "r"), ("coverage", "Coverage", "r"), ("nll", "NLL (bits/dim)", "r"),
           ("lit_fid", "FID (lit.)", "r"), ("lit_nll", "NLL (lit.)", "r")]


def _visible(several: bool, columns: list[tuple[str, str, str]] = COLUMNS) -> list[tuple[str, str, str]]:
    return [c for c in columns if several or c[0] != "dataset"]


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> list[str]:
    """The lines of a markdown table of ``rows``' :func:`cells` in ``columns`` (key, header, alignment)."""
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    return ["| " + " | ".join(header for _, header, _ in columns) + " |",
            "|" + "|".join({"l": " :--- ", "c": " :---: ", "r": " ---: "}[align] for *_, align in columns) + "|",
            *["| " + " | ".join(esc(c[key]) for key, *_ in columns) + " |" for c in map(cells, rows)]]


VARIANTS_HEADING = "Variants (what each row of ours measured, and the literature figure beside it):"


def render_markdown(rows: list[dict], caption: str, notes: list[str], several: bool) -> str:
    lines = [f"**Table.** {caption}", "", *markdown_table(rows, _visible(several)), "", stars.rule_sentence()]
    if notes:
        lines += ["", "Notes:", *[f"- {note}" for note in notes]]
    variants = variant_notes(rows)
    if variants:
        lines += ["", VARIANTS_HEADING, *[f"- {note}" for note in variants]]
    return "\n".join(lines) + "\n"


BEYOND_COLUMNS = [("family", "Family", "l"), ("model", "Model", "l"), ("ours", "Ours", "l"),
                  ("dataset", "Data", "l"), ("nfe", "NFE", "r"), ("train", "Train speed", "c"),
                  ("sample", "Sample speed", "c"), ("params", "Param. efficiency", "c"),
                  ("scaling", "Res. scaling", "c"), ("fid", "FID", "r"), ("recall", "Recall", "r"),
                  ("coverage", "Coverage", "r"), ("nll", "NLL (bits/dim)", "r"), ("rep_fid", "FID (paper)", "r"),
                  ("rep_nfe", "NFE (paper)", "r"), ("rep_nll", "NLL (paper)", "r")]


def render_markdown_beyond(rows: list[dict], several: bool) -> str:
    """The models the review's table has no row for, with their sampler's network evaluations (NFE) and
    their own papers' figures (CIFAR-10 unless the source says otherwise); "" when there are none."""
    if not rows:
        return ""
    lines = ["### Beyond the review's table", "",
             "Families the review (2021) has no row for, measured under the same protocol (stars rank them "
             "with every model above); NFE: network evaluations per sample of the default sampler. The "
             "papers' figures are their own (not comparable to ours), sources below.", "",
             *markdown_table(rows, _visible(several, BEYOND_COLUMNS))]
    variants = variant_notes(rows)  # each paper's figure with its source, or the one for our variant
    if variants:
        lines += ["", "Papers' figures:", *[f"- {note}" for note in variants]]
    return "\n".join(lines) + "\n"


# Unicode of the cells -> LaTeX (booktabs and pifont); special characters escaped in the same pass.
LATEX = {"★": r"\ding{72}", "☆": r"\ding{73}", "✓": r"\ding{51}", "✗": r"\ding{55}", "±": r"$\pm$",
         "≤": r"$\leq$", "†": r"\textdagger{}", "‡": r"$^{\ddagger}$", "§": r"$^{\S}$",
         "³": r"$^3$", "≈": r"$\approx$", "×": r"$\times$", "—": "---", "–": "--", "…": r"\ldots{}", "∞": r"$\infty$",
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


# The paper table: one column of a two-column paper. Stars as their count, marks as LaTeX symbols.
PAPER_COLUMNS = [("train", "T", "c"), ("sample", "S", "c"), ("params", "P", "c"),
                 ("scaling", "R", "c"), ("jacobian", "J", "c"), ("density", "D", "c"),
                 ("fid", "FID", "r"), ("nll", "NLL", "r")]
LITERATURE_COLUMNS = [("lit_fid", "FID", "r"), ("lit_nll", "NLL", "r")]
PAPER_MARKS = {"✓": r"$\checkmark$", "✗": r"$\times$", "bound": r"$\leq$", "—": "--"}
COLUMN_WIDTH_PT = 229.5  # \columnwidth of article's twocolumn, the narrowest of the usual (ICML, IEEE: 241-252 pt)
CHAR_PT = 4.5  # a character at \scriptsize, headers and symbols included: on reports/mnist within 1 % of pdflatex
TABCOLSEP_PT = 2.0
TIGHTEST_TABCOLSEP_PT = 1.0  # a wide table (star ranges, long NLL cells) closes its columns up to this
ESTIMATE_ERROR_PT = 15  # estimated_width_pt against pdflatex on the reports/mnist tables: -15 to +12 pt
NAME_WIDTH_CM = 1.6  # the model column wraps long names ("Sparse Transformer + DistAug") to this width
GAP_PT = 4  # between our columns and the literature's


def _paper_cell(key: str, row: dict, c: dict[str, str], fid_at: str) -> str:
    """A cell of the paper table, as LaTeX."""
    if key in stars.STAR_RULES:
        n = row.get(f"stars_{key}")
        marked = key == "params" and stars.paper_size_mark(row.get("model"), _number(row.get("params")))
        if n is None or n != n:
            return "--"
        count = latex(stars.star_count(n, row.get(f"stars_{key}_span")))
        return (rf"{{\tiny {count}}}" if "--" in count else count) + (r"$^\dagger$" if marked else "")  # 3--4 small
    text = c[key]
    if key == "fid" and fid_at and text.endswith(f"@{fid_at}"):
        text = text[: -len(fid_at) - 1]  # the header names the n
    if key == "nll":  # two decimals at most: the column's width is a paper column's
        text = format_nll(*(_number(row.get(k)) for k in ("nll", "nll_pm")), row.get("nll_bound") is True,
                          row.get("nll_kind"), most=2) if _number(row.get("nll")) is not None else text
    if " ± " in text:  # the interval as a subscript, as papers print it: 104$_{\pm 3}$, 1.57$_{\pm .03}$
        value, pm = text.split(" ± ", 1)
        return latex(value) + rf"$_{{\pm {pm.removeprefix('0')}}}$"
    return PAPER_MARKS.get(text) or latex(text)


def _paper_name(row: dict, common_seeds: int) -> str:
    """The display name; ``$^{\times n}$`` marks a model whose seed count differs from the table's."""
    title = row.get("title")
    name = title if isinstance(title, str) and title else row["model_label"]
    seeds = row.get("seeds") or 0
    return latex(name) + (rf"$^{{\times{seeds}}}$" if seeds != common_seeds and seeds > 1 else "")


def render_latex(rows: list[dict], name: str) -> str:
    """The main table: the review's families measured in this report as row blocks (the literature-only
    rows go to :func:`render_latex_appendix`, the families beyond the review to
    :func:`render_latex_beyond`), the literature's CIFAR-10 figures set apart on the right, a short
    caption, and the protocol in :func:`render_latex_protocol`."""
    intro = ("Generative-model families measured by trilemma on {ours}, beside the CIFAR-10 figures of the "
             "review (right, not comparable to ours).")
    return _paper_table(rows, name, "", intro, LITERATURE_COLUMNS, r"\shortstack{CIFAR-10\\(lit.)}")


# The families beyond the review: our NFE beside the stars, their own papers' CIFAR-10 figures on the right.
BEYOND_PAPER_COLUMNS = [c for c in PAPER_COLUMNS if c[0] != "jacobian"]
BEYOND_PAPER_COLUMNS.insert(len(BEYOND_PAPER_COLUMNS) - 2, ("nfe", "NFE", "r"))
REPORTED_COLUMNS = [("rep_fid", "FID", "r"), ("rep_nfe", "NFE", "r")]


def render_latex_beyond(rows: list[dict], name: str) -> str:
    """Families the review has no row for (``table_beyond.tex``): measured as in the main table, with
    their sampler's network evaluations and their own papers' figures; "" when there are none."""
    if not any(r["implemented"] and r.get("seeds") for r in rows):
        return ""
    intro = ("Families beyond the review measured by trilemma on {ours} (stars rank them with those of "
             "Table~\\ref{{tab:trilemma-" + name + "}}), beside their own papers' CIFAR-10 figures (right).")
    return _paper_table(rows, name, "-beyond", intro, REPORTED_COLUMNS, r"\shortstack{Paper\\CIFAR-10}",
                        BEYOND_PAPER_COLUMNS)


def _paper_table(rows: list[dict], name: str, suffix: str, intro: str, right: list[tuple[str, str, str]],
                 right_header: str, ours_columns: list[tuple[str, str, str]] = PAPER_COLUMNS) -> str:
    """One column of a two-column paper: our measured rows in family blocks, ``right`` set apart."""
    measured = [r for r in rows if r.get("real") or (r["implemented"] and r.get("seeds"))]
    counts = {format_count(r.get("fid_samples")) for r in measured if r.get("fid_samples") == r.get("fid_samples")
              and r.get("fid_samples") is not None}
    fid_at = next(iter(counts)) if len(counts) == 1 else ""
    datasets = sorted({r["dataset"] for r in measured if isinstance(r.get("dataset"), str)})
    ours = ", ".join(datasets) or "ours"
    n_cols = 1 + len(ours_columns) + len(right)
    align = (rf"@{{}}p{{{NAME_WIDTH_CM}cm}}" + "".join(a for *_, a in ours_columns) + rf"@{{\hspace{{{GAP_PT}pt}}}}"
             + "".join(a for *_, a in right) + "@{}")
    counts = [int(r["seeds"]) for r in measured if not r.get("real") and r.get("seeds")]
    common = max(set(counts), key=counts.count) if counts else 0
    each = f"the mean of {common} seeds, " if common > 1 else ""
    short = (intro.format(ours=latex(ours)) + " Stars (1--5) rank the models measured; "
             f"each figure is {each}$\pm$ a 95\,\% interval; NLL in bits/dim, $\leq$ an upper bound.")
    header_fid = f"FID$_{{{fid_at}}}$" if fid_at else "FID"
    label = f"tab:trilemma-{name}{suffix}"
    lines = [f"% trilemma report of suite {name}, written by `trilemma report`.",
             r"% Needs \usepackage{booktabs} and \usepackage{amssymb} (\checkmark).",
             r"\begin{table}[t]", r"\centering", rf"\caption{{{short}}}", rf"\label{{{label}}}",
             r"\scriptsize", rf"\setlength{{\tabcolsep}}{{{TABCOLSEP_PT}pt}}",
             r"\begin{tabular}{" + align + "}", r"\toprule",
             rf" & \multicolumn{{{len(ours_columns)}}}{{c}}{{Ours ({latex(ours)})}} & "
             rf"\multicolumn{{{len(right)}}}{{c}}{{{right_header}}} \\",
             rf"\cmidrule(lr){{2-{1 + len(ours_columns)}}}\cmidrule(l){{{2 + len(ours_columns)}-{n_cols}}}",
             " & ".join(["Model"] + [header_fid if k == "fid" else h for k, h, _ in ours_columns]
                        + [h for _, h, _ in right]) + r" \\", r"\midrule"]
    previous = None
    for row in measured:
        if row["family"] != previous:  # each family a block under its name, not repeated per row
            lines.append(rf"\multicolumn{{{n_cols}}}{{l}}{{\textit{{{latex(row['family'])}}}}} \\")
            previous = row["family"]
        c = cells(row)
        name_cell = latex(row["model_label"]) if row.get("real") else _paper_name(row, common)
        lines.append(" & ".join([r"\raggedright\hangindent=0.6em\hspace{0pt}" + name_cell]  # hyphenable
                                + [_paper_cell(k, row, c, fid_at) for k, *_ in ours_columns]
                                + [_paper_cell(k, row, c, fid_at) for k, *_ in right]) + r" \\")
    keys = {k for k, *_ in ours_columns}
    rule = ("T, S, P, R: stars for train speed, sample speed, parameter efficiency and resolution scaling; "
            + ("J: free-form Jacobian; " if "jacobian" in keys else "") + "D: exact density"
            + ("; NFE: network evaluations a sample" if "nfe" in keys else "")
            + (f"; FID: FID@{fid_at}." if fid_at else ".")
            + (f" {legend}." if (legend := mark_legend(r.get("lit_mark") for r in measured)) else ""))
    lines += [r"\bottomrule", r"\end{tabular}", r"\par\smallskip", r"\parbox{\columnwidth}{\tiny "
              + latex(rule) + rf" Protocol: Table~\ref{{tab:trilemma-{name}-protocol}}.}}", r"\end{table}"]
    return fit_column("\n".join(lines) + "\n")


def fit_column(table_tex: str) -> str:
    """``table_tex`` with the widest column separation, from :data:`TABCOLSEP_PT` down to
    :data:`TIGHTEST_TABCOLSEP_PT` by quarter points, at which its estimated width fits one column (the
    tightest where none does), allowing for the estimate's error: the type stays at its size, unlike a
    resized box."""
    sep = TABCOLSEP_PT
    while sep > TIGHTEST_TABCOLSEP_PT and estimated_width_pt(table_tex, sep) > COLUMN_WIDTH_PT - ESTIMATE_ERROR_PT:
        sep -= 0.25
    return table_tex.replace(rf"\setlength{{\tabcolsep}}{{{TABCOLSEP_PT}pt}}", rf"\setlength{{\tabcolsep}}{{{sep}pt}}", 1)


def render_latex_protocol(name: str, caption: str, notes: list[str]) -> str:
    """The main table's protocol and notes as a small table of their own (``table_protocol.tex``), so
    that the main table stays within one column's height."""
    text = latex(" ".join([caption, stars.rule_sentence(), *notes]).replace("★", "stars"))
    text = re.sub(r"(?<!-)-(?!-)", r"-\\allowbreak{}", text)  # long cache keys may break after a hyphen
    return "\n".join([f"% trilemma report of suite {name}: the protocol of table.tex.", r"\begin{table}[t]",
                      r"\centering", rf"\caption{{Protocol of Table~\ref{{tab:trilemma-{name}}}.}}",
                      rf"\label{{tab:trilemma-{name}-protocol}}", r"\parbox{\columnwidth}{\scriptsize " + text + "}",
                      r"\end{table}"]) + "\n"


def render_latex_appendix(rows: list[dict], name: str) -> str:
    """The review's rows that this report did not measure: their marks and CIFAR-10 figures."""
    rest = [r for r in rows if not r.get("real") and not (r["implemented"] and r.get("seeds"))]
    lines = [f"% trilemma report of suite {name}: the review's rows not measured here.",
             r"\begin{table}[t]", r"\centering",
             r"\caption{Families of the review not measured in this report: their CIFAR-10 figures as "
             r"reported (Bond-Taylor et al., 2021).}", rf"\label{{tab:trilemma-{name}-literature}}",
             r"\scriptsize", rf"\setlength{{\tabcolsep}}{{{TABCOLSEP_PT}pt}}",
             rf"\begin{{tabular}}{{@{{}}lp{{{NAME_WIDTH_CM + 0.6}cm}}cccc@{{}}}}", r"\toprule",
             r"Family & Model & J & D & FID & NLL \\", r"\midrule"]
    previous = None
    for row in rest:
        c = cells(row)
        family = latex(row["family"]) if row["family"] != previous else ""
        previous = row["family"]
        lines.append(" & ".join([family, r"\raggedright\hangindent=0.6em " + latex(row["model_label"])]
                                + [PAPER_MARKS.get(c[k]) or latex(c[k]) for k in ("jacobian", "density",
                                                                                   "lit_fid", "lit_nll")])
                     + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def estimated_width_pt(table_tex: str, tabcolsep_pt: float = TABCOLSEP_PT) -> float:
    """A pdflatex-free estimate of a tabular's width: the model column's fixed width, and per other
    column its widest cell's characters (LaTeX commands stripped, a symbol one character, sub- and
    superscripts and \\tiny text at 0.7) at :data:`CHAR_PT`, plus the column separation (none at the
    outer edges)."""
    body = table_tex.split(r"\midrule", 1)[1].split(r"\bottomrule", 1)[0]
    widths: dict[int, float] = {0: NAME_WIDTH_CM * 72.27 / 2.54}
    for line in body.splitlines():
        if "&" not in line:
            continue
        for i, cell in enumerate(line.rstrip("\\ ").split(" & ")[1:], start=1):
            widths[i] = max(widths.get(i, 0.0), _cell_chars(cell) * CHAR_PT)
    return sum(widths.values()) + 2 * tabcolsep_pt * (len(widths) - 1) + GAP_PT


SMALL = r"\$?[_^]\{(.*?)\}\$?|\$?\^(\\[a-zA-Z]+)\$?|\{\\tiny (.*?)\}"  # 2$_{\pm 1}$, 3$^\dagger$, {\tiny 3--4}


def _cell_chars(cell: str) -> float:
    """A cell's width in characters: its text at 1, its small parts (:data:`SMALL`) at 0.7."""
    def count(text: str) -> int:  # a command one character, an en dash (--) one
        return len(re.sub(r"[{}$ ]", "", re.sub(r"\\[a-zA-Z]+(\{\})?", "#", text)).replace("--", "-"))
    small = sum(count("".join(m)) for m in re.findall(SMALL, cell))
    return count(re.sub(SMALL, "", cell)) + 0.7 * small


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
