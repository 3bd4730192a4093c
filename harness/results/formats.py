"""Number formats, one for each kind of figure, shared by ``trilemma show`` and the report."""
from __future__ import annotations

import math
from typing import Optional

DASH = "—"  # a missing value, in every table
NLL_PREFIX = {"bound": "≤", "estimate": "≈"}  # what an NLL is, as the table marks it


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def format_count(n: Optional[float]) -> str:
    """Sample counts as the field writes them: 500, 1k, 2.5k, 50k."""
    if n is None or _missing(n):
        return "?"
    n = int(n)
    return f"{n / 1000:g}k" if n >= 1000 and n % 100 == 0 else str(n)


def format_fid(mean: Optional[float], std: Optional[float], n: Optional[float]) -> str:
    """FID@n, e.g. "12.3@1k", or "12.3 ± 0.4@1k" over several seeds."""
    if _missing(mean):
        return DASH
    spread = "" if _missing(std) else f" ± {std:.1f}"
    return f"{mean:.1f}{spread}@{format_count(n)}"


def format_nll(mean: Optional[float], std: Optional[float], bound: Optional[bool],
               kind: Optional[str] = None) -> str:
    """Bits/dim, "≤" marking an upper bound and "≈" an estimate, e.g. "≤3.75" or "1.23 ± 0.01"."""
    if _missing(mean):
        return DASH
    spread = "" if _missing(std) else f" ± {std:.2f}"
    bounded = not _missing(bound) and bool(bound)
    prefix = NLL_PREFIX.get(kind if isinstance(kind, str) else "", "") or ("≤" if bounded else "")
    return f"{prefix}{mean:.2f}{spread}"


def format_fraction(mean: Optional[float], std: Optional[float] = None) -> str:
    """Precision or recall, in [0, 1]."""
    if _missing(mean):
        return DASH
    return f"{mean:.2f}" + ("" if _missing(std) else f" ± {std:.2f}")


def format_rate(value: Optional[float]) -> str:
    """Images per second: "12,520", "217", "11.5", "0.42"."""
    if _missing(value):
        return DASH
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def format_integer(value: Optional[float]) -> str:
    """Counts such as parameters: "270,754"."""
    if _missing(value):
        return DASH
    return f"{int(value):,}"
