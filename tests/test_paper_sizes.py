"""The papers' CIFAR-10 model sizes (``literature_sizes.csv``) against the ``cifar10_gpu`` presets.

Every registered family has a row; a family whose paper's CIFAR-10 parameter count is known has a
``cifar10_gpu`` preset within 10 % of it, unless its row says "not matched" and why (then the test
checks that it is indeed not). Models are built on the meta device: no memory, no initialisation.
"""
import pytest
import torch

from trilemma.contract.family import count_parameters
from trilemma.contract.literature import (PAPER_SIZE_TOLERANCE, SIZE_COLUMNS, paper_sized, paper_sizes,
                                          seed_models)
from trilemma.contract.registry import build_model, get_model_class, model_names
from trilemma.report.marks import NOT_PAPER_SIZED, paper_size_mark

from conftest import REPO

CIFAR10 = (3, 32, 32)
SIZED = sorted(name for name, row in paper_sizes().items() if row["paper_params"] is not None)


def test_every_registered_family_has_one_row_and_every_row_a_family():
    from importlib.metadata import entry_points

    # The installed families (a plugin another test registered in this process is not one of them).
    built_in = {ep.name for ep in entry_points(group="trilemma.models")}
    assert sorted(paper_sizes()) == sorted(built_in) == sorted(n for n in model_names() if n in built_in)


def test_the_rows_parse_and_say_where_each_figure_comes_from():
    for name, row in paper_sizes().items():
        assert tuple(row) == SIZE_COLUMNS, name
        assert row["params_source"] and row["variant"], name  # a size, or why there is none
        assert row["paper_params"] is None or row["paper_params"] > 0, name
        assert (row["figure_for_our_variant"] is None) == (not row["figure_source"]), name
        # the literature row is the family's own (or empty for a family beyond the review)
        assert row["literature_row"] == (get_model_class(name).literature or ""), name
        assert not row["literature_row"] or row["literature_row"] in seed_models(), name


@pytest.mark.parametrize("name", SIZED)
def test_the_gpu_preset_is_the_papers_size_unless_the_row_says_why_not(name):
    with torch.device("meta"):
        model = build_model(name, CIFAR10, "cifar10_gpu")
    params, row = count_parameters([model]), paper_sizes()[name]
    expected = not row["params_note"].startswith("not matched")
    assert paper_sized(name, params) is expected, (
        f"{name}: cifar10_gpu has {params:,} parameters, {params / row['paper_params']:.2f}x the paper's "
        f"{row['paper_params']:,}; the row says {'matched' if expected else row['params_note']}")


def test_paper_sized_is_a_tolerance_around_the_count_and_unknown_without_one():
    name = SIZED[0]
    paper = paper_sizes()[name]["paper_params"]
    assert paper_sized(name, paper * (1 + PAPER_SIZE_TOLERANCE * 0.99))
    assert paper_sized(name, paper * (1 - PAPER_SIZE_TOLERANCE * 0.99))
    assert paper_sized(name, paper * (1 + PAPER_SIZE_TOLERANCE * 1.01)) is False
    assert paper_sized(name, None) is None and paper_sized("ot_decoder", 1e6) is None
    assert paper_size_mark(name, paper / 2) == NOT_PAPER_SIZED and paper_size_mark(name, paper) == ""
    assert paper_size_mark("ot_decoder", 1.0) == "" and paper_size_mark(None, 1.0) == ""


def test_the_dry_run_prints_the_papers_size_beside_ours(tmp_path, capsys):
    from trilemma.cli import main

    suite = REPO / "suites" / "smoke.yaml"
    argv = ["run", str(suite), "--dry-run", "--models", "ddpm,ot_decoder", "--results", str(tmp_path)]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    column = lines[0].index("paper params")  # the paper's count, our ratio to it, our count
    ddpm = next(line for line in lines if line.startswith("ddpm-"))[column:].split()
    assert ddpm[0] == "35,700,000" and ddpm[1].endswith(NOT_PAPER_SIZED)  # tiny is far from the paper's
    ratio, ours = float(ddpm[1].rstrip(NOT_PAPER_SIZED)), int(ddpm[2].replace(",", ""))
    assert ratio == pytest.approx(ours / 35.7e6, abs=0.01)
    ot = next(line for line in lines if line.startswith("ot_decoder-"))[column:].split()
    assert ot[:2] == ["-", "-"]  # no paper, no ratio
