"""Each row names the variant it measured and the literature figure of that variant.

The fixture runs are relabelled as families whose literature figure is of another variant than ours
(``ddpm_pp``: the review's 2.20 is NCSN++, the paper gives 2.55 for DDPM++ cont. (VP); ``consistency``:
the reported 8.70 is CT, ours is iCT at 2.83), as one run of another conditioning than its figure's
(an unconditional ``stylegan2_ada``), and as one whose figure is of our variant (``dcgan``), then
``trilemma list``, ``trilemma show`` and the report are read.
"""
import json
import shutil
import subprocess

import pandas as pd
import pytest

from trilemma.cli import main
from trilemma.report.build import build_report
from trilemma.results.show import show

from conftest import REPO

FIXTURE = REPO / "tests" / "fixtures" / "results" / "fixture"
REPLACED, OTHER = "‡", "§"  # the marks of a figure for our variant, and of one of another variant


def _relabel(suite_dir, source: str, run: str, model: dict, model_config: dict | None = None):
    """A copy of fixture run ``source`` as run ``run`` of another model (its ``model`` section updated)."""
    shutil.copytree(FIXTURE / source, suite_dir / run)
    path = suite_dir / run / "result.json"
    result = json.loads(path.read_text(encoding="utf-8"))
    result["run"], result["model"] = run, {**result["model"], **model}
    result["config"] = {**result["config"], "model": model["name"], "model_config": model_config or {}}
    path.write_text(json.dumps(result), encoding="utf-8")


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """A suite of dcgan (figure of our variant), ddpm_pp and consistency (figures for our variant
    replace the review's and the paper's), and an unconditional stylegan2_ada (conditional figure)."""
    suite_dir = tmp_path_factory.mktemp("results") / "fixture"
    shutil.copytree(FIXTURE / "dcgan-mnist-s0", suite_dir / "dcgan-mnist-s0")
    _relabel(suite_dir, "dcgan-mnist-s1", "ddpm_pp-mnist-s0",
             {"name": "ddpm_pp", "family": "EBM", "literature": "DDPM++ Continuous"})
    _relabel(suite_dir, "gon-mnist-s0", "consistency-mnist-s0",
             {"name": "consistency", "family": "EBM", "literature": None,
              "reported": {"fid": 8.70, "nfe": 1, "source": "Song et al. 2023, Table 2 (CT)"}})
    _relabel(suite_dir, "pixelcnn-mnist-s0", "stylegan2_ada-mnist-s0",
             {"name": "stylegan2_ada", "family": "GAN", "literature": "StyleGAN2 + ADA",
              "capabilities": {"density": "none", "free_form_jacobian": True, "sampling": "one_pass",
                               "conditional": False}},
             {"conditional": False})
    return suite_dir


@pytest.fixture(scope="module")
def report(suite, tmp_path_factory):
    return build_report("fixture", suite.parent, tmp_path_factory.mktemp("reports"))


def _row(table_md: str, label: str) -> list[str]:
    """The cells of the Markdown table row of literature model ``label``."""
    line = next(line for line in table_md.splitlines() if f"| {label} | `" in line)
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_list_names_each_familys_variant_and_the_figure_it_is_compared_with(capsys):
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0]
    column = header.index("lit. FID")
    ddpm_pp = lines.index(next(line for line in lines if line.startswith("ddpm_pp ")))
    assert lines[ddpm_pp][column:].split()[0] == "2.55" + REPLACED
    variant = {line.split(":")[0].strip(): line for line in lines if line.startswith("  ")}  # the variants block
    assert "ours unconditional" in variant["ddpm_pp"] and "DDPM++ cont. (VP)" in variant["ddpm_pp"]
    biggan = lines.index(next(line for line in lines if line.startswith("biggan ")))
    assert lines[biggan][column:].split()[0] == "14.73"  # the review's figure is of our variant
    assert "ours class-conditional" in variant["biggan"] and "variant: class-conditional" in variant["biggan"]


def test_list_json_gives_the_literature_figure_and_its_variant(capsys):
    assert main(["list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["consistency"]["literature"]["fid"] == "2.83"
    assert listed["consistency"]["literature"]["mark"] == REPLACED
    assert listed["dcgan"]["literature"]["fid"] == "37.11" and listed["dcgan"]["literature"]["mark"] == ""


def test_show_names_the_variant_each_run_measured_and_its_figure(suite):
    text = show(suite)
    head = text.splitlines()[0]
    assert "lit. FID" in head
    line = lambda model: next(l for l in text.splitlines() if l.startswith(model + " ("))  # noqa: E731
    assert "2.55" + REPLACED in line("ddpm_pp") and "DDPM++ cont. (VP)" in line("ddpm_pp")
    assert "2.83" + REPLACED in line("consistency") and "iCT" in line("consistency")
    # an unconditional run beside the conditional figure: marked, and said why
    assert "2.42" + OTHER in line("stylegan2_ada") and "the run is unconditional" in line("stylegan2_ada")
    assert line("dcgan").startswith("dcgan (sampler `default`, NFE 1): FID 37.11 (")
    assert REPLACED not in line("dcgan") and OTHER not in line("dcgan")


def test_a_figure_for_our_variant_replaces_the_reviews_in_markdown_with_its_mark(report):
    table = (report / "table.md").read_text(encoding="utf-8")
    header = [cell.strip() for cell in table.splitlines()[2].strip("|").split("|")]
    lit_fid = header.index("FID (lit.)")
    assert _row(table, "DDPM++ Continuous")[lit_fid] == "2.55" + REPLACED
    assert _row(table, "StyleGAN2 + ADA")[lit_fid] == "2.42" + OTHER
    # the mark is explained in the caption, and the row's variants under the table
    assert REPLACED in table.split("\n")[0] and "variant we run" in table.split("\n")[0]
    note = next(line for line in table.splitlines() if line.startswith("- DDPM++ Continuous (`ddpm_pp`"))
    assert "in place of 2.20" in note and "NCSN++ cont. (deep, VE)" in note and "Song et al. 2021, Table 3" in note
    beyond = table[table.index("### Beyond the review's table"):]
    assert "2.83" + REPLACED in beyond and "8.7 |" not in beyond


def test_a_figure_of_our_variant_stays_the_reviews_without_a_mark(report):
    table = (report / "table.md").read_text(encoding="utf-8")
    header = [cell.strip() for cell in table.splitlines()[2].strip("|").split("|")]
    assert _row(table, "DCGAN")[header.index("FID (lit.)")] == "37.11"
    note = next(line for line in table.splitlines() if line.startswith("- DCGAN (`dcgan`"))
    assert "variant: unconditional, one pass, NFE 1" in note and REPLACED not in note


def test_the_csv_gives_each_rows_figure_its_mark_variant_and_source(report):
    table = pd.read_csv(report / "table.csv", dtype=str, keep_default_na=False).set_index("literature_model")
    ddpm_pp, dcgan = table.loc["DDPM++ Continuous"], table.loc["DCGAN"]
    assert (ddpm_pp["lit_fid_cifar10"], ddpm_pp["lit_mark"]) == ("2.55", REPLACED)
    assert "DDPM++ cont. (VP)" in ddpm_pp["literature_variant"]
    assert ddpm_pp["literature_figure_source"].startswith("Song et al. 2021, Table 3")
    assert (dcgan["lit_fid_cifar10"], dcgan["lit_mark"]) == ("37.11", "")
    assert dcgan["literature_variant"].startswith("unconditional, one pass, NFE 1")
    assert dcgan["literature_figure_source"] == "Bond-Taylor et al. 2021, TPAMI, Table 1: DCGAN (ref. 182)"
    consistency = table[table["trilemma_model"] == "consistency"].iloc[0]
    assert (consistency["reported_fid"], consistency["lit_mark"]) == ("2.83", REPLACED)
    assert consistency["literature_figure_source"].startswith("Song & Dhariwal 2023, Table 2")
    assert table.loc["StyleGAN2 + ADA", "measured_variant"].startswith("unconditional")


def test_the_latex_tables_carry_the_marks_and_compile(report, tmp_path):
    assert r"2.55$^{\ddagger}$" in (report / "table.tex").read_text(encoding="utf-8")
    assert r"2.42$^{\S}$" in (report / "table.tex").read_text(encoding="utf-8")
    assert r"2.83$^{\ddagger}$" in (report / "table_beyond.tex").read_text(encoding="utf-8")
    assert "the paper's FID for the variant we run" in (report / "table.tex").read_text(encoding="utf-8")
    if shutil.which("pdflatex") is None:
        return  # the marks are checked; compiling them needs TeX
    names = ("table.tex", "table_beyond.tex", "table_protocol.tex")  # the marks' legend in the protocol too
    for name in names:
        shutil.copy(report / name, tmp_path / name)
    inputs = "".join(f"\\input{{{name}}}\n" for name in names)
    (tmp_path / "main.tex").write_text("\\documentclass[twocolumn]{article}\n\\usepackage{booktabs}\n"
                                       "\\usepackage{amssymb}\n\\begin{document}\n" + inputs
                                       + "\\end{document}\n", encoding="utf-8")
    done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "main.tex"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:]
