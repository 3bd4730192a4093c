"""``trilemma report``: the comparison table and figures of one suite, beside the literature.

``build_report(suite, results_root, out_root)`` reads ``results/<suite>/*/result.json`` and writes
``reports/<suite>/``:

    table.md, table.tex, table.csv   the table (markdown; LaTeX with booktabs; raw numbers)
    *.png, *.pdf                     the figures of :mod:`harness.plots`
    samples/<run>.png                each run's sample grid, copied
    index.md                         the table, the figures and the provenance on one page

The table has one row per model of the review's table (``harness/reference/seed_table.csv``, Bond-
Taylor et al. 2021): rows that trilemma implements (a model whose ``literature`` names the row) show our
measurements beside the literature's figures; rows it does not implement show the literature's figures
only, marked "lit. only"; our models without a row in the review get rows of their own. Several seeds
of a model are one row (mean ± standard deviation). Only results whose status is "done" give numbers;
a model whose runs all failed keeps its row, with dashes and a note. The stars and marks are those of
:mod:`harness.stars`.
"""
from __future__ import annotations

import json
import math
import shutil
import unicodedata
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from harness import plots, stars
from harness.errors import TrilemmaError
from harness.results import RESULT_FILE, SAMPLES_FILE, SCHEMA, STATUS_DONE, SUITE_FILE

SEED_TABLE = Path(__file__).resolve().parent / "reference" / "seed_table.csv"
LITERATURE = "Bond-Taylor et al. 2021, TPAMI"
LIT_ONLY = "lit. only"
NUMERIC = ("train_images_per_second", "train_seconds", "wall_seconds", "images_seen", "train_peak_bytes", "sample_images_per_second",
           "sample_nfe", "params", "params_sampling", "scaling_train", "scaling_sample",
           "scaling_memory", "fid", "fid_n", "kid", "precision", "recall", "nll")
INTEGER = ("seeds", "stars_train", "stars_sample", "stars_params", "stars_scaling", "sample_nfe", "params",
           "params_sampling", "fid_n", "images_seen", "train_peak_bytes")
SPREAD = ("fid", "nll", "precision", "recall")  # shown as mean ± std over seeds
# Table columns: key, header, LaTeX alignment. "dataset" is shown only when a suite has several.
COLUMNS = [("family", "Family", "l"), ("model", "Model", "l"), ("ours", "Ours", "l"),
           ("dataset", "Data", "l"), ("train", "Train speed", "c"), ("sample", "Sample speed", "c"),
           ("params", "Param. efficiency", "c"), ("scaling", "Res. scaling", "c"),
           ("jacobian", "Free-form Jacobian", "c"), ("density", "Exact density", "c"),
           ("fid", "FID", "r"), ("recall", "Recall", "r"), ("nll", "NLL (bits/dim)", "r"),
           ("lit_fid", "FID (lit.)", "r"), ("lit_nll", "NLL (lit.)", "r")]


def build_report(suite: str | Path, results_root: Path, out_root: Path) -> Path:
    """Write ``<out_root>/<suite name>/`` from ``<results_root>/<suite name>/``; returns that folder."""
    name = suite_name(suite)
    suite_dir = Path(results_root) / name
    results = load_suite_results(suite_dir, name)
    suite_cfg = _read_json(suite_dir / SUITE_FILE) if (suite_dir / SUITE_FILE).is_file() else {}
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


# --- loading ----------------------------------------------------------------------------------

def suite_name(suite: str | Path) -> str:
    """A suite's name: the argument itself, or the ``name`` of a suite YAML file."""
    path = Path(suite)
    if path.suffix not in (".yaml", ".yml"):
        return str(suite)
    if not path.is_file():
        raise TrilemmaError(f"suite file {path} not found")
    from omegaconf import OmegaConf

    try:
        name = OmegaConf.load(path).get("name")
    except Exception as e:  # noqa: BLE001 (any parse error is the user's file)
        raise TrilemmaError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not name:
        raise TrilemmaError(f"{path}: the suite has no 'name'")
    return str(name)


def load_suite_results(suite_dir: Path, name: str) -> list[dict[str, Any]]:
    """Every run's result under ``suite_dir``, sorted by run name; an error when there are none."""
    if not suite_dir.is_dir():
        raise TrilemmaError(f"no results for suite {name!r}: {suite_dir} does not exist")
    results = [_read_result(d / RESULT_FILE) for d in sorted(suite_dir.iterdir())
               if (d / RESULT_FILE).is_file()]
    if not results:
        raise TrilemmaError(f"no results for suite {name!r} under {suite_dir}")
    return results


def _read_result(path: Path) -> dict[str, Any]:
    result = _read_json(path)
    if result.get("schema") != SCHEMA:
        raise TrilemmaError(f"{path}: schema {result.get('schema')!r}, expected {SCHEMA!r}")
    return result


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TrilemmaError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def load_seed_table(path: Path = SEED_TABLE) -> pd.DataFrame:
    """The review's table, every cell a string (empty where the review has no figure)."""
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def dataset_of(config: dict[str, Any]) -> str:
    """A run's dataset label (as :func:`harness.data.dataset_label`, from the stored config)."""
    data = config.get("data") or {}
    if data.get("label"):
        return data["label"]
    if data.get("name") == "npz" and data.get("path"):
        return Path(data["path"]).name
    return data.get("name") or "?"


# --- one record per run, one row per model ----------------------------------------------------

def record(result: dict[str, Any]) -> dict[str, Any]:
    """The numbers of one result that the report reads, flat; None where not measured."""
    m, model, config = result.get("measurements") or {}, result.get("model") or {}, result.get("config") or {}
    caps = model.get("capabilities") or {}
    train, params = m.get("train") or {}, m.get("params") or {}
    sample = m.get("sample") or {}
    default = (sample.get("samplers") or {}).get(sample.get("default")) or {}
    fid, nll = m.get("fid") or {}, m.get("nll") or {}
    memory = (m.get("memory") or {}).get("train") or {}
    slopes = (m.get("scaling") or {}).get("slopes") or {}
    return {
        "run": result.get("run"), "status": result.get("status"),
        "model": model.get("name") or config.get("model"), "family": model.get("family") or "",
        "literature": model.get("literature"), "density": caps.get("density"),
        "free_form_jacobian": caps.get("free_form_jacobian"), "dataset": dataset_of(config),
        "seed": config.get("seed"),
        "train_images_per_second": train.get("images_per_second"), "train_seconds": train.get("train_seconds"),
        "images_seen": train.get("images_seen"), "wall_seconds": train.get("wall_seconds"),
        "train_peak_bytes": memory.get("peak_bytes"), "memory_kind": memory.get("kind"),
        "sample_images_per_second": default.get("images_per_second"), "sample_nfe": default.get("nfe_per_sample"),
        "params": params.get("total"), "params_sampling": params.get("sampling"),
        "scaling_train": slopes.get("train"), "scaling_sample": slopes.get("sample"),
        "scaling_memory": slopes.get("memory"),
        "fid": fid.get("fid"), "fid_n": fid.get("n_gen"), "kid": fid.get("kid_mean"),
        "precision": fid.get("precision"), "recall": fid.get("recall"),
        "nll": nll.get("bpd"), "nll_bound": nll.get("bound"),
    }


def aggregate(records: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, dataset): means of the done runs, standard deviations, seeds, stars."""
    records = records.copy()
    for col in NUMERIC:
        records[col] = pd.to_numeric(records[col], errors="coerce")  # None -> NaN
    done = records[records["status"] == STATUS_DONE]
    keys = ["model", "dataset"]
    # What a model declares is the same in all its runs: take it from the first.
    models = records.groupby(keys, sort=True).agg(
        family=("family", "first"), literature=("literature", "first"), density=("density", "first"),
        free_form_jacobian=("free_form_jacobian", "first"), memory_kind=("memory_kind", "first"),
        runs=("run", "count"),
        status=("status", _group_status))
    means = done.groupby(keys)[list(NUMERIC)].mean()
    spread = done.groupby(keys)[list(SPREAD)].std(ddof=1).add_suffix("_std")  # NaN for one seed
    models = models.join(means).join(spread)
    models["seeds"] = done.groupby(keys)["run"].count()
    models["seeds"] = models["seeds"].fillna(0).astype(int)
    models["nll_bound"] = done.groupby(keys)["nll_bound"].agg(lambda s: bool(s.fillna(False).any()))
    # The steeper of the train-step and sampling slopes is the model's resolution scaling.
    models["scaling"] = models[["scaling_train", "scaling_sample"]].max(axis=1, skipna=True)
    models = models.reset_index()
    return add_stars(models)


def _group_status(statuses: pd.Series) -> str:
    return STATUS_DONE if (statuses == STATUS_DONE).any() else sorted(set(statuses))[0]


def add_stars(models: pd.DataFrame) -> pd.DataFrame:
    """Stars of each measure, relative to the models of the same dataset."""
    sources = {"train": "train_images_per_second", "sample": "sample_images_per_second",
               "params": "params", "scaling": "scaling"}
    models = models.copy()
    for key, column in sources.items():
        models[f"stars_{key}"] = None
        for _, index in models.groupby("dataset").groups.items():
            values = [_number(v) for v in models.loc[index, column]]
            models.loc[index, f"stars_{key}"] = pd.Series(stars.stars(values, stars.STAR_RULES[key]),
                                                           index=index, dtype=object)
    return models


def several_datasets(models: pd.DataFrame) -> bool:
    return models["dataset"].nunique() > 1


# --- rows beside the literature -----------------------------------------------------------------

def table_rows(models: pd.DataFrame, seed: pd.DataFrame) -> list[dict[str, Any]]:
    """The review's rows in its order, ours placed at their literature row or after their family."""
    rows: list[dict[str, Any]] = []
    ours = models.to_dict("records")
    known = set(seed["model"])
    placed: set[int] = set()
    for family, lit_rows in seed.groupby("family", sort=False):
        for lit in lit_rows.to_dict("records"):
            matches = [i for i, m in enumerate(ours) if _text(m["literature"]) == lit["model"]]
            rows += [our_row(ours[i], lit) for i in matches] or [literature_row(lit)]
            placed.update(matches)
        # Our models of this family that the review has no row for.
        own = [i for i, m in enumerate(ours) if i not in placed and _text(m["family"]) == family
               and _text(m["literature"]) not in known]
        rows += [our_row(ours[i], None) for i in own]
        placed.update(own)
    rest = sorted((i for i in range(len(ours)) if i not in placed),
                  key=lambda i: (_text(ours[i]["family"]) or "~", ours[i]["model"], ours[i]["dataset"]))
    return rows + [our_row(ours[i], None) for i in rest]


def our_row(m: dict[str, Any], lit: Optional[dict[str, str]]) -> dict[str, Any]:
    """One of our models (all its seeds), with its literature row's figures when it has one."""
    lit = lit or {}
    return {**m, "family": _text(m["family"]) or lit.get("family") or "other",
            "model_label": lit.get("model") or m["model"], "implemented": True,
            "lit_ref": lit.get("ref", ""), "lit_fid": lit.get("fid_cifar10", ""),
            "lit_nll": lit.get("nll_bpd_cifar10", ""), "lit_nll_is_bound": lit.get("nll_is_bound", "")}


def literature_row(lit: dict[str, str]) -> dict[str, Any]:
    """A row of the review that trilemma does not implement: its marks and figures only."""
    return {"family": lit["family"], "model_label": lit["model"], "model": None, "implemented": False,
            "dataset": None, "status": None, "seeds": 0,
            "density": stars.SEED_DENSITY.get(lit["exact_density"]),
            "free_form_jacobian": stars.SEED_JACOBIAN.get(lit["free_form_jacobian"]),
            "lit_ref": lit["ref"], "lit_fid": lit["fid_cifar10"], "lit_nll": lit["nll_bpd_cifar10"],
            "lit_nll_is_bound": lit["nll_is_bound"]}


def cells(row: dict[str, Any]) -> dict[str, str]:
    """A row's table cells as text (markdown and LaTeX differ only in escaping, done later)."""
    g = lambda key: _number(row.get(key))  # noqa: E731
    ours = LIT_ONLY
    if row["implemented"]:  # `name` is code: monospace in markdown, \texttt in LaTeX
        ours = f"`{row['model']}`" + ("" if row["status"] == STATUS_DONE else f" ({row['status']})")
        ours += f" ×{row['seeds']}" if row["seeds"] > 1 else ""
    return {
        "family": row["family"], "model": row["model_label"], "ours": ours,
        "dataset": row.get("dataset") or stars.DASH,
        **{key: stars.render_stars(row.get(f"stars_{key}")) for key in stars.STAR_RULES},
        "jacobian": stars.jacobian_mark(row.get("free_form_jacobian")),
        "density": stars.density_mark(row.get("density")),
        "fid": stars.format_fid(g("fid"), g("fid_std"), g("fid_n")),
        "recall": stars.format_fraction(g("recall"), g("recall_std")),
        "nll": stars.format_nll(g("nll"), g("nll_std"), row.get("nll_bound")),
        "lit_fid": row["lit_fid"] or stars.DASH,
        "lit_nll": stars.format_literature_nll(row["lit_nll"], row["lit_nll_is_bound"]),
    }


def csv_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The table with raw numbers (NaN where not measured), one line per table row."""
    columns = ["family", "model_label", "model", "dataset", "implemented", "status", "seeds",
               "stars_train", "stars_sample", "stars_params", "stars_scaling",
               "train_images_per_second", "sample_images_per_second", "sample_nfe", "params",
               "params_sampling", "scaling", "scaling_train", "scaling_sample", "scaling_memory",
               "free_form_jacobian", "density", "fid", "fid_std", "fid_n", "kid", "precision",
               "precision_std", "recall", "recall_std", "nll", "nll_std", "nll_bound", "train_seconds",
               "wall_seconds", "images_seen", "train_peak_bytes", "memory_kind", "lit_ref", "lit_fid", "lit_nll", "lit_nll_is_bound"]
    frame = pd.DataFrame([{c: row.get(c) for c in columns} for row in rows], columns=columns)
    for col in INTEGER:  # counts print as integers, blank where missing
        frame[col] = pd.to_numeric(frame[col], errors="coerce").round().astype("Int64")
    return frame.rename(columns={"model_label": "literature_model", "model": "trilemma_model",
                                 "fid": "fid_mean", "nll": "nll_bpd", "lit_fid": "lit_fid_cifar10",
                                 "lit_nll": "lit_nll_bpd_cifar10"})


def _text(value) -> Optional[str]:
    """A non-empty string, or None (pandas stores a missing string as NaN)."""
    return value if isinstance(value, str) and value else None


def _number(value) -> Optional[float]:
    """A float, or None for a missing value (None, NaN, pandas' NA)."""
    if value is None or isinstance(value, str):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


# --- caption and notes ----------------------------------------------------------------------------

def describe(name: str, results: list[dict], models: pd.DataFrame) -> tuple[str, list[str]]:
    """The caption (budget, device, FID protocol, literature) and the notes under the table."""
    done = [r for r in results if r.get("status") == STATUS_DONE]
    datasets = ", ".join(sorted(models["dataset"].unique()))
    caption = (f"Suite `{name}` on {datasets}: {len(done)} finished runs of {models['model'].nunique()} "
               f"models. {_budget(done)} {_devices(done)} {_fid_protocol(done)} NLL in bits/dim on the test "
               f"split; ≤ marks an upper bound. Columns marked (lit.) are the figures on CIFAR-10 reported "
               f"in the review ({LITERATURE}); they are comparable to ours only where the dataset and "
               f"protocol match. “{LIT_ONLY}”: a model of the review that trilemma does not implement; "
               f"{stars.DASH}: not measured or not applicable; ×n: mean ± standard deviation over n seeds.")
    return caption, _notes(results, models)


def _budget(done: list[dict]) -> str:
    if not done:
        return "No run finished."
    limits = sorted({(_cfg(r, "train", "max_seconds"), _cfg(r, "train", "max_images"),
                      _cfg(r, "train", "batch_size")) for r in done}, key=str)
    budget = "; ".join(_one_budget(*limit) for limit in limits)
    seen = [r["measurements"].get("train", {}) for r in done]
    images = [t["images_seen"] for t in seen if t.get("images_seen") is not None]
    seconds = [t["train_seconds"] for t in seen if t.get("train_seconds") is not None]
    measured = ""
    if images and seconds:
        measured = (f" (runs saw {_span(images, '{:,.0f}')} images in {_span(seconds, '{:.0f}')} s of "
                    f"training)")
    return f"Training budget: {budget}{measured}."


def _one_budget(max_seconds, max_images, batch) -> str:
    parts = ([f"{max_seconds:g} s"] if max_seconds else []) + ([f"{max_images:,} images"] if max_images else [])
    limit = " or ".join(parts) + (", whichever first" if len(parts) == 2 else "") if parts else "unlimited"
    return f"{limit}, batch {batch}"


def _span(values: list[float], fmt: str) -> str:
    lo, hi = fmt.format(min(values)), fmt.format(max(values))
    return lo if lo == hi else f"{lo}–{hi}"


def _devices(done: list[dict]) -> str:
    names = sorted({f"{(r.get('provenance') or {}).get('device_name', '?')} "
                    f"({r['measurements'].get('train', {}).get('device', '?')}, "
                    f"{r['measurements'].get('train', {}).get('precision', '?')})" for r in done})
    return f"Device: {'; '.join(names)}." if names else ""


def _fid_protocol(done: list[dict]) -> str:
    protocols = sorted({(f["n_gen"], f["n_ref"], f.get("split", "train"), f.get("reference", "?"),
                         f.get("extractor", "?"), f.get("weights", "?"))
                        for r in done if (f := r["measurements"].get("fid"))}, key=str)
    if not protocols:
        return "FID not measured."
    text = "; ".join(f"FID@{stars.format_count(n_gen)} ({n_gen:,} samples) against {n_ref:,} images of the "
                     f"{split} split (reference `{ref}`), {extractor} pool3 features (weights {weights})"
                     for n_gen, n_ref, split, ref, extractor, weights in protocols)
    return f"{text}; recall as Kynkäänniemi et al. (2019) on the same features."


def _cfg(result: dict, section: str, key: str):
    return ((result.get("config") or {}).get(section) or {}).get(key)


def _notes(results: list[dict], models: pd.DataFrame) -> list[str]:
    notes = []
    for r in results:
        if r.get("status") == STATUS_DONE:
            continue
        error = r.get("error") or {}
        why = f" ({error.get('type')}: {_first_line(error.get('message'))})" if error else ""
        state = "failed" if r.get("status") == "failed" else f"is {r.get('status')}"
        notes.append(f"Run `{r.get('run')}` {state}{why}: it gives no numbers.")
    known = set(load_seed_table()["model"])
    for m in models.to_dict("records"):
        if _text(m["literature"]) and m["literature"] not in known:
            notes.append(f"`{m['model']}` names the literature row \"{m['literature']}\", which the "
                         f"review's table does not have; it is listed on its own.")
    if models["scaling"].isna().all():
        notes.append("Resolution scaling was not measured in this suite: the scaling column is empty.")
    return notes


def _first_line(text: Optional[str], limit: int = 160) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line if len(line) <= limit else line[:limit - 1] + "…"


# --- rendering ------------------------------------------------------------------------------------

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
         "≤": r"$\leq$", "≈": r"$\approx$", "×": r"$\times$", "—": "---", "–": "--", "…": r"\ldots{}",
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


# --- sample grids and the index page ----------------------------------------------------------

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
