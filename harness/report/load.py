"""Loading a suite's results for the report, and the review's table as a data frame."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from trilemma.contract.errors import TrilemmaError
from trilemma.contract.literature import seed_rows
from trilemma.results.io import read_result
from trilemma.results.schema import RESULT_FILE


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
    results = [read_result(d) for d in sorted(suite_dir.iterdir()) if (d / RESULT_FILE).is_file()]
    if not results:
        raise TrilemmaError(f"no results for suite {name!r} under {suite_dir}")
    return results


def load_seed_table() -> pd.DataFrame:
    """The review's table, every cell a string (empty where the review has no figure)."""
    return pd.DataFrame(list(seed_rows()), dtype=str)
