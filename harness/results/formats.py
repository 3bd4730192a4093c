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


def decimals_for(error: Optional[float], default: int, most: int = 4) -> int:
    """Decimals that an uncertainty allows: its first significant digit (two when that digit is a 1,
    as 1.2 or 0.015), never more than ``most``; ``default`` without one."""
    if _missing(error) or error <= 0 or not math.isfinite(error):
        return default
    exponent = math.floor(math.log10(error))
    leading_one = int(error / 10 ** exponent) == 1
    return max(0, min(most, -exponent + (1 if leading_one else 0)))


def format_pm(mean: float, pm: Optional[float], default: int, most: int = 4) -> str:
    """"50.3 ± 1.2": the value to the digits its ± allows (at most ``most`` decimals); the value alone
    when there is none."""
    places = decimals_for(pm, default, most)
    return f"{mean:.{places}f}" + ("" if _missing(pm) else f" ± {pm:.{places}f}")


def format_fid(mean: Optional[float], pm: Optional[float], n: Optional[float]) -> str:
    """FID@n, e.g. "12.3@1k", or "12.3 ± 0.4@1k" with a 95 % interval's half-width; with ``n`` None
    (FID∞, extrapolated to infinitely many samples) the value alone, "11.2 ± 0.3"."""
    if _missing(mean):
        return DASH
    return format_pm(mean, pm, 1) + ("" if n is None else f"@{format_count(n)}")


def format_nll(mean: Optional[float], pm: Optional[float], bound: Optional[bool],
               kind: Optional[str] = None, most: int = 4) -> str:
    """Bits/dim, "≤" marking an upper bound and "≈" an estimate, e.g. "≤3.75" or "≈1.23 ± 0.01"."""
    if _missing(mean):
        return DASH
    bounded = not _missing(bound) and bool(bound)
    prefix = NLL_PREFIX.get(kind if isinstance(kind, str) else "", "") or ("≤" if bounded else "")
    return f"{prefix}{format_pm(mean, pm, 2, most)}"


def format_fraction(mean: Optional[float], pm: Optional[float] = None) -> str:
    """Precision or recall, in [0, 1]."""
    if _missing(mean):
        return DASH
    return format_pm(mean, pm, 2)


def format_kid(mean: Optional[float], pm: Optional[float] = None) -> str:
    """KID in units of 10^-3, as papers print it: "12.4 ± 1.1"."""
    if _missing(mean):
        return DASH
    return format_pm(mean * 1e3, None if _missing(pm) else pm * 1e3, 1)


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


def format_budget(train: dict) -> str:
    """A training budget from a run's ``train`` settings: its limits, whichever ends first, and the batch."""
    limits = [f"{train['max_seconds']:g} s" if train.get("max_seconds") else "",
              f"{train['max_images']:,} images" if train.get("max_images") else "",
              f"{train['max_flops']:.3g} FLOPs" if train.get("max_flops") else ""]
    limits = [x for x in limits if x]
    limit = " or ".join(limits) + (", whichever first" if len(limits) > 1 else "") if limits else "unlimited"
    return f"{limit}, batch {train.get('batch_size')}"

