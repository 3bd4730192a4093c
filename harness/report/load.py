"""Loading a suite's results for the report, and the review's table as a data frame."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from trilemma.contract.errors import TrilemmaError
from trilemma.contract.literature import seed_rows
from trilemma.results.io import read_result
from trilemma.results.schema import RESULT_FILE
from trilemma.results.suites import read_suite_values, variant_name


def suite_name(suite: str | Path, overrides: list[str] = (), name: str | None = None) -> str:
    """A suite's results folder: the argument itself, or the ``name`` of a suite YAML file, as
    ``trilemma run`` names it (with the same overrides or ``--name``)."""
    if name is not None or Path(suite).suffix not in (".yaml", ".yml"):
        return variant_name(str(suite), overrides, name)
    values = read_suite_values(Path(suite))
    if not isinstance(values.get("name"), str) or not values["name"]:
        raise TrilemmaError(f"{suite}: the suite has no 'name'")
    return variant_name(values["name"], overrides)


def load_suite_results(suite_dir: Path, name: str) -> list[dict[str, Any]]:
    """Every run's result under ``suite_dir``, sorted by run name; an error when there are none."""
    if not suite_dir.is_dir():
        raise TrilemmaError(f"no results for suite {name!r}: {suite_dir} does not exist")
    results = [read_result(d) for d in sorted(suite_dir.iterdir()) if (d / RESULT_FILE).is_file()]
    if not results:
        raise TrilemmaError(f"no results for suite {name!r} under {suite_dir}")
    return results


def load_seed_table() -> pd.DataFrame:
    """The review's table, every cell a string (empty where the review has no figure)."""
    return pd.DataFrame(list(seed_rows()), dtype=str)
