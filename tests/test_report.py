"""The report on hand-made fixture results: a checked table, every output, graceful gaps, LaTeX.

The fixtures (tests/fixtures/results/fixture/) hold test-only numbers: two seeds of dcgan, a pixelcnn,
a gon (no literature row, no FID), and a failed ddpm. To accept an intended change of the table, run
``TRILEMMA_UPDATE_GOLDEN=1 pytest tests/test_report.py`` and review the diff of tests/fixtures/golden/.
"""
import json
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from trilemma.contract.errors import TrilemmaError
from trilemma.report.build import build_report
from trilemma.report.load import load_seed_table
from trilemma.report.render import latex

from conftest import REPO

FIXTURES = REPO / "tests" / "fixtures"
RESULTS = FIXTURES / "results"
GOLDEN = FIXTURES / "golden" / "fixture"
FIGURES = ("trilemma", "nfe", "profiles", "scaling", "fid_curve", "fid_compute", "samples")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return build_report("fixture", RESULTS, tmp_path_factory.mktemp("reports"))


@pytest.mark.parametrize("name", ["table.md", "table.csv"])
def test_table_matches_the_checked_one(report, name):
    produced = (report / name).read_text(encoding="utf-8")
    if os.environ.get("TRILEMMA_UPDATE_GOLDEN"):
        GOLDEN.mkdir(parents=True, exist_ok=True)
        (GOLDEN / name).write_text(produced, encoding="utf-8")
    assert produced == (GOLDEN / name).read_text(encoding="utf-8")


def test_every_output_is_written(report):
    for name in ("table.md", "table.tex", "table.csv", "index.md", "samples/dcgan-mnist-s0.png"):
        assert (report / name).is_file(), name
    index = (report / "index.md").read_text(encoding="utf-8")
    for stem in FIGURES:
        assert (report / f"{stem}.png").stat().st_size > 1000 and (report / f"{stem}.pdf").is_file()
        assert f"({stem}.png)" in index
    assert (report / "table.md").read_text(encoding="utf-8") in index


def test_every_literature_row_and_every_model_appears(report):
    table = pd.read_csv(report / "table.csv", dtype=str, keep_default_na=False)
    assert list(load_seed_table()["model"]) == [m for m in table["literature_model"] if m != "Variational GON"]
    ours = table[table["implemented"] == "True"]
    assert sorted(ours["trilemma_model"]) == ["dcgan", "ddpm", "gon", "pixelcnn"]
    dcgan = ours[ours["trilemma_model"] == "dcgan"].iloc[0]
    assert (dcgan["literature_model"], dcgan["seeds"], dcgan["fid_mean"], dcgan["lit_fid_cifar10"]) == \
        ("DCGAN", "2", "85", "37.11")


def _copy_runs(tmp_path, runs, edit=None):
    """A results folder holding some of the fixture runs, each optionally edited."""
    suite_dir = tmp_path / "results" / "fixture"
    for run in runs:
        shutil.copytree(RESULTS / "fixture" / run, suite_dir / run)
        if edit:
            path = suite_dir / run / "result.json"
            path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    return tmp_path / "results"


def test_a_suite_file_names_the_report(tmp_path):
    suite = tmp_path / "fixture.yaml"
    suite.write_text("name: fixture\nmodels:\n  - {name: dcgan}\n")
    out = build_report(suite, _copy_runs(tmp_path, ["ddpm-mnist-s0"]), tmp_path / "reports")
    assert out == tmp_path / "reports" / "fixture" and (out / "table.md").is_file()


def test_no_results_is_a_one_line_error(tmp_path):
    with pytest.raises(TrilemmaError, match="no results for suite 'absent'"):
        build_report("absent", RESULTS, tmp_path)
    with pytest.raises(TrilemmaError, match="not found"):
        build_report(str(tmp_path / "missing.yaml"), RESULTS, tmp_path)
    cli = subprocess.run([sys.executable, "-m", "trilemma", "report", "absent", "--results", str(RESULTS),
                          "--out", str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert cli.returncode == 2 and len(cli.stderr.strip().splitlines()) == 1


def test_only_failed_runs_degrade_to_dashes_and_notes(tmp_path):
    out = build_report("fixture", _copy_runs(tmp_path, ["ddpm-mnist-s0"]), tmp_path / "reports")
    table = (out / "table.md").read_text(encoding="utf-8")
    assert "`ddpm` (failed)" in table and "RuntimeError: test-only failure" in table
    assert "No run finished" in table and "Resolution scaling was not measured" in table
    index = (out / "index.md").read_text(encoding="utf-8")
    assert index.count("*Not drawn:") == len(FIGURES)


def test_results_without_fid_or_scaling_still_report(tmp_path):
    def strip(result):
        for key in ("fid", "scaling"):
            result["measurements"].pop(key, None)
        result["curve"] = [{k: v for k, v in p.items() if k not in ("fid", "fid_samples")} for p in result["curve"]]
        return result

    out = build_report("fixture", _copy_runs(tmp_path, ["dcgan-mnist-s0", "gon-mnist-s0"], strip),
                       tmp_path / "reports")
    table = (out / "table.md").read_text(encoding="utf-8")
    assert "FID not measured" in table
    assert not (out / "trilemma.png").exists() and (out / "samples.png").exists()


def test_latex_escaping():
    assert latex("a_b & 5% `x_y` ≤ ★☆ ✓") == r"a\_b \& 5\% \texttt{x\_y} $\leq$ \ding{72}\ding{73} \ding{51}"
    assert latex("é → 1") == "e ? 1"  # no glyph pdflatex could stop at


PAPER_PACKAGES = ("booktabs.sty", "amssymb.sty")  # what table.tex asks for (its header comment)


def _tex_with_packages():
    if shutil.which("pdflatex") is None or shutil.which("kpsewhich") is None:
        pytest.skip("no pdflatex installed")
    found = subprocess.run(["kpsewhich", *PAPER_PACKAGES], capture_output=True, text=True).stdout.split()
    if len(found) < len(PAPER_PACKAGES):
        pytest.skip(f"TeX lacks one of {', '.join(PAPER_PACKAGES)}")


def test_latex_table_compiles_in_one_column_of_a_two_column_paper(report, tmp_path):
    _tex_with_packages()
    for name in ("table.tex", "table_beyond.tex", "table_protocol.tex", "table_literature.tex"):
        shutil.copy(report / name, tmp_path / name)  # the fixture's gon is beyond the review
    (tmp_path / "main.tex").write_text("\\documentclass[twocolumn]{article}\n\\usepackage[utf8]{inputenc}\n"
                                       "\\usepackage{booktabs}\n\\usepackage{amssymb}\n"
                                       "\\begin{document}\n\\input{table.tex}\n\\input{table_beyond.tex}\n\\input{table_protocol.tex}\n"
                                       "\\input{table_literature.tex}\n"
                                       "\\end{document}\n")
    done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "main.tex"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:]
    assert (tmp_path / "main.pdf").is_file()
    log = (tmp_path / "main.log").read_text(errors="replace")
    assert "Overfull \\hbox" not in log and "Float too large" not in log  # fits the column, and its height


def test_the_paper_table_fits_a_column_and_leaves_the_literature_rows_out(report):
    from trilemma.report.render import COLUMN_WIDTH_PT, estimated_width_pt

    tex = (report / "table.tex").read_text(encoding="utf-8")
    assert estimated_width_pt(tex) <= COLUMN_WIDTH_PT
    assert "resizebox" not in tex and "table*" not in tex and "pifont" not in tex and "\\ding" not in tex
    assert tex.count("\\textit{GAN}") == 1 and "ProGAN" not in tex  # a family block; lit.-only rows out
    assert "CIFAR-10\\\\(lit.)" in tex and "@{\\hspace{4pt}}" in tex  # the literature's columns set apart
    caption = tex.split("\\caption{", 1)[1].split("}\n", 1)[0]
    assert caption.count(". ") + 1 <= 3
    appendix = (report / "table_literature.tex").read_text(encoding="utf-8")
    assert "ProGAN" in appendix and "DCGAN" not in appendix


def test_several_datasets_get_a_data_column_and_a_row_each(tmp_path):
    results = _copy_runs(tmp_path, ["dcgan-mnist-s0"])
    other = results / "fixture" / "dcgan-cifar10-s0"
    shutil.copytree(results / "fixture" / "dcgan-mnist-s0", other)
    result = json.loads((other / "result.json").read_text())
    result["run"], result["config"]["data"]["name"] = "dcgan-cifar10-s0", "cifar10"
    (other / "result.json").write_text(json.dumps(result))
    table = (build_report("fixture", results, tmp_path / "reports") / "table.md").read_text(encoding="utf-8")
    assert "| Data |" in table and "on cifar10, mnist" in table
    assert table.count("| DCGAN | `dcgan` | cifar10 |") == table.count("| DCGAN | `dcgan` | mnist |") == 1


def test_trilemma_labels_of_nearby_points_do_not_overlap():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from trilemma.report.figures import trilemma_figure

    # Three of the models within a few percent of each other on both axes: labels at one fixed offset collide.
    models = pd.DataFrame([
        {"model": name, "dataset": "mnist", "fid": fid, "sample_images_per_second": speed, "recall": 0.1}
        for name, fid, speed in [("realnvp", 160.2, 446.0), ("vae", 160.2, 430.0), ("glow", 158.0, 455.0),
                                 ("dcgan", 205.0, 4570.0)]])
    fig = trilemma_figure(models)
    renderer = FigureCanvasAgg(fig).get_renderer()
    boxes = [t.get_window_extent(renderer) for t in fig.axes[0].texts]
    assert sorted(t.get_text() for t in fig.axes[0].texts) == ["dcgan", "glow", "realnvp", "vae"]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b)


def _two_budgets(tmp_path):
    """The fixture suite with one dcgan seed trained for another budget and FID n."""
    results = tmp_path / "results"
    suite = shutil.copytree(RESULTS / "fixture", results / "fixture")
    path = suite / "dcgan-mnist-s1" / "result.json"
    result = json.loads(path.read_text())
    result["config"]["train"]["max_seconds"] = 15.0
    result["measurements"]["fid"]["fid_samples"] = 500
    path.write_text(json.dumps(result))
    return results


def test_a_report_over_two_protocols_refuses_naming_the_fields(tmp_path):
    with pytest.raises(TrilemmaError) as error:
        build_report("fixture", _two_budgets(tmp_path), tmp_path / "reports")
    message = str(error.value)
    assert "budget (100 s, batch 64 | 15 s, batch 64)" in message and "fid_samples (1000 | 500)" in message
    assert "\n" not in message and "--protocols split" in message


def test_a_report_over_two_protocols_splits_into_one_report_each(tmp_path):
    out = build_report("fixture", _two_budgets(tmp_path), tmp_path / "reports", protocols="split")
    parts = sorted(p for p in out.iterdir() if p.name.startswith("protocol-"))
    assert len(parts) == 2 and "differ in budget" in (out / "index.md").read_text(encoding="utf-8")
    tables = [pd.read_csv(p / "table.csv", dtype=str, keep_default_na=False) for p in parts]
    seeds = sorted(t[t["trilemma_model"] == "dcgan"]["seeds"].iloc[0] for t in tables)
    assert seeds == ["1", "1"]  # the two dcgan seeds are never averaged across protocols


def test_three_seeds_give_a_95_percent_student_t_interval(tmp_path):
    results = tmp_path / "results"
    suite = shutil.copytree(RESULTS / "fixture", results / "fixture")
    shutil.copytree(suite / "dcgan-mnist-s1", suite / "dcgan-mnist-s2")
    path = suite / "dcgan-mnist-s2" / "result.json"
    result = json.loads(path.read_text())
    result.update(run="dcgan-mnist-s2")
    result["config"]["seed"] = 2
    result["measurements"]["fid"]["fid"] = 95.0
    path.write_text(json.dumps(result))
    out = build_report("fixture", results, tmp_path / "reports")
    table = pd.read_csv(out / "table.csv", keep_default_na=False, dtype=str)
    dcgan = table[table["trilemma_model"] == "dcgan"].iloc[0]
    fids = [80.0, 90.0, 95.0]  # the fixture's two seeds and the planted third
    sd = pd.Series(fids).std()
    assert dcgan["seeds"] == "3"
    assert float(dcgan["fid_pm"]) == pytest.approx(4.302653 * sd / 3 ** 0.5, rel=1e-4)  # t(0.975, 2 dof)
    assert "×3" in (out / "table.md").read_text(encoding="utf-8")


def test_the_real_data_row_heads_the_fid_column(tmp_path):
    results = tmp_path / "results"
    suite = shutil.copytree(RESULTS / "fixture", results / "fixture")
    path = suite / "dcgan-mnist-s0" / "result.json"
    result = json.loads(path.read_text())
    result["measurements"]["fid"]["real_data"] = {
        "fid": 12.5, "kid_mean": 0.001, "precision": 0.79, "recall": 0.8, "fid_samples": 1000, "n_ref": 2000,
        "bootstrap": {"fid_ci": [11.9, 13.1], "precision_ci": [0.77, 0.81]}}
    path.write_text(json.dumps(result))
    out = build_report("fixture", results, tmp_path / "reports")
    rows = [line for line in (out / "table.md").read_text(encoding="utf-8").splitlines() if line.startswith("| ")]
    first = rows[2]  # after the header and the rule
    assert "Real data (test split)" in first and "12.5 ± 0.6@1k" in first and "0.79 ± 0.02" in first


def test_families_beyond_the_review_get_their_own_table_with_nfe_and_their_papers_figures(tmp_path):
    def as_edm(result):  # a result written before the runner recorded `reported`: the registry's figures
        result["model"].update(name="edm", title="EDM", family="EBM", literature=None)
        result["model"].pop("reported", None)
        return result

    root = _copy_runs(tmp_path, ["dcgan-mnist-s0", "gon-mnist-s0"])
    edited = root / "fixture" / "gon-mnist-s0" / "result.json"
    edited.write_text(json.dumps(as_edm(json.loads(edited.read_text()))))
    out = build_report("fixture", root, tmp_path / "reports")
    table = (out / "table.md").read_text(encoding="utf-8")
    main, beyond = table.split("### Beyond the review's table")
    assert "`gon`" not in main and "`dcgan`" in main  # the edm run is in the second table only
    edm_line = next(line for line in beyond.splitlines() if line.startswith("| EBM | EDM |"))
    assert edm_line.rstrip(" |").split(" | ")[-3:-1] == ["1.97", "35"]  # Karras et al. 2022: FID, NFE
    assert "Karras et al. 2022" in beyond
    csv = pd.read_csv(out / "table.csv", dtype=str, keep_default_na=False)
    row = csv[csv["trilemma_model"] == "edm"].iloc[0]
    assert (row["section"], row["reported_fid"], row["reported_nfe"]) == ("beyond", "1.97", "35")
    beyond = (out / "table_beyond.tex").read_text(encoding="utf-8")  # a LaTeX table of their own
    assert "Families beyond the review" in beyond and "& NFE" in beyond and "Paper\\\\CIFAR-10" in beyond
    assert "EDM" in beyond and "& 1.97 & 35 \\\\" in beyond and "EDM" not in (out / "table.tex").read_text(encoding="utf-8")


def test_fid_infinity_reaches_the_csv_with_its_fit_interval_and_show(tmp_path):
    from trilemma.results.show import show

    results = tmp_path / "results"
    suite = shutil.copytree(RESULTS / "fixture", results / "fixture")
    path = suite / "pixelcnn-mnist-s0" / "result.json"
    result = json.loads(path.read_text())
    result["measurements"]["fid"] |= {"fid_inf": 61.25, "fid_inf_se": 0.5}
    path.write_text(json.dumps(result))
    out = build_report("fixture", results, tmp_path / "reports")
    table = pd.read_csv(out / "table.csv", keep_default_na=False, dtype=str)
    pixelcnn = table[table["trilemma_model"] == "pixelcnn"].iloc[0]
    assert float(pixelcnn["fid_inf"]) == 61.25 and float(pixelcnn["fid_inf_pm"]) == pytest.approx(0.98)
    assert table[table["trilemma_model"] == "dcgan"].iloc[0]["fid_inf"] == ""  # not measured: blank
    assert "61.2 ± 1.0" in show(suite)


def test_a_wide_paper_table_closes_its_columns_up_to_fit():
    from trilemma.report.render import (COLUMN_WIDTH_PT, ESTIMATE_ERROR_PT, TABCOLSEP_PT, TIGHTEST_TABCOLSEP_PT,
                                        estimated_width_pt, fit_column)

    row = " & ".join(["Model"] + ["{\\tiny 3--4}"] * 4 + ["$\\checkmark$", "$\\leq$", "115$_{\\pm 40}$",
                                                       "2.55$_{\\pm .13}$", "37.11", "3.27"]) + r" \\"
    tex = "\n".join([rf"\setlength{{\tabcolsep}}{{{TABCOLSEP_PT}pt}}", r"\midrule", row, r"\bottomrule"])
    assert estimated_width_pt(tex) > COLUMN_WIDTH_PT  # star ranges in four columns: too wide at 2 pt
    fitted = fit_column(tex)
    sep = float(fitted.split(r"\tabcolsep}{", 1)[1].split("pt", 1)[0])
    assert TIGHTEST_TABCOLSEP_PT <= sep < TABCOLSEP_PT
    assert estimated_width_pt(fitted, sep) <= COLUMN_WIDTH_PT - ESTIMATE_ERROR_PT
    narrow = tex.replace("{\\tiny 3--4}", "3").replace("115$_{\\pm 40}$", "115")
    assert fit_column(narrow) == narrow  # a table that fits keeps its separation
