"""One name for the FID's sample count, `fid_samples`, from the suite file to the result file: a result
of the earlier schema (`trilemma.result/1`: `n_gen` in a measurement, `fid_n` in a curve point) is
migrated on read, and no module outside the codec knows the old names."""
import json
import re

from trilemma.results.io import read_result
from trilemma.results.schema import SCHEMA, summarize

from conftest import REPO

ARCHIVED = REPO / "results" / "archive" / "mnist-30s-three-seeds" / "dcgan-mnist-s0"


def test_a_schema_1_result_reads_in_todays_names():
    raw = json.loads((ARCHIVED / "result.json").read_text())
    assert raw["schema"] == "trilemma.result/1" and raw["measurements"]["fid"]["n_gen"] == 500
    result = read_result(ARCHIVED)
    fid = result["measurements"]["fid"]
    assert result["schema"] == SCHEMA == "trilemma.result/2"
    assert fid["fid_samples"] == 500 and "n_gen" not in fid
    assert fid["real_data"]["fid_samples"] == 500 and "n_gen" not in fid["real_data"]
    assert [p["fid_samples"] for p in result["curve"]] == [50, 50, 50, 50, 500]
    assert not any("fid_n" in p for p in result["curve"])
    assert summarize(result).fid_samples == 500


def test_no_module_outside_the_codec_names_the_old_keys():
    old = re.compile(r"\b(n_gen|fid_n)\b")
    found = [f"{path.relative_to(REPO)}:{i}" for path in sorted((REPO / "harness").rglob("*.py"))
             if path.name != "schema.py"
             for i, line in enumerate(path.read_text().splitlines(), 1) if old.search(line)]
    assert not found, found
