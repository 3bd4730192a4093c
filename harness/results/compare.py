"""``trilemma compare A B``: what changed between two results folders, and whether anything regressed.

A and B are results folders: a suite's (``results/<suite>``, runs in sub-folders), a results root that
holds one suite, or one run's folder. Runs are matched by name. For each run done in both, every
metric below is compared as a relative change, (B - A) / |A|, oriented so that "worse" is positive
(a higher FID, a lower recall, fewer images per second). A metric regressed when it got worse by more
than its tolerance *and* by more than the measured spread of the two runs, sqrt(a² + b²) of their ±
(95 % bootstrap half-widths for FID, KID, precision and recall; 1.96 standard errors for a Monte-Carlo
NLL; half the interquartile range of the timed repeats for speeds); a result without a spread is held
to its tolerance alone. A run done in A that is missing from B or not done in B also counts as a regression
(the nightly lost a model); a metric measured in A and missing in B likewise.

A change must also exceed the seed noise of its model (:mod:`trilemma.results.noise`): 1.96 sqrt(2) times
the standard deviation of the metric over seeds, which a new seed alone exceeds 5 % of the time. It is
measured from A's or B's folder where one holds several seeds of the model (a run folder: its suite's
folder), else read from a ``noise.json`` there (``make bench-seeds`` writes one); where several give it, the
one with the most seeds. A run without seed noise is held to its tolerance and spread, and says so. Two
run folders (``results/mnist/vae-mnist-s0 results/mnist/vae-mnist-s1``) are compared with each other
whatever their names.

Tolerances, per metric, in this order (as the brief of issue 4 specifies):
    1. the suite's ``tolerances: {metric: relative tolerance}``, read from ``suite.json`` in B's results
       folder (else A's);
    2. else the ``--tolerance`` argument;
    3. else :data:`DEFAULT_TOLERANCES`. Speeds are noisier than FID (other jobs on the machine, clocks,
       thermal state), so they get 30 %; the parameter count is deterministic and gets 0.

Speeds measured on different devices (``provenance.device_name``) are not compared at all: the change
would be the hardware's, not the code's. Likewise, a run whose protocol fingerprint
(:mod:`trilemma.results.protocol`: budget and its kind, processes, FID n and references, extractor,
precision, sampling, compile, EMA, scaling and NLL settings, device class, package versions) differs
between A and B is not compared: the line says which fields differ, and no regression is called on its
numbers (a lost or failed run still counts).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from trilemma.contract.errors import TrilemmaError
from trilemma.results import noise as seed_noise
from trilemma.results.io import read_json, read_result
from trilemma.results.protocol import describe_difference, differing, fingerprint
from trilemma.results.schema import RESULT_FILE, STATUS_DONE, SUITE_FILE, summarize


@dataclass(frozen=True)
class Metric:
    key: str  # the name in a suite's ``tolerances``, and the field of the result's summary
    label: str
    higher_is_better: bool
    speed: bool = False  # depends on the hardware: compared only on the same device

    def get(self, result: dict[str, Any]) -> Optional[float]:
        return getattr(summarize(result), self.key)

    def spread(self, result: dict[str, Any]) -> Optional[float]:
        return getattr(summarize(result), f"{self.key}_pm", None)


METRICS = (
    Metric("fid", "FID", False),
    Metric("kid", "KID", False),
    Metric("precision", "precision", True),
    Metric("recall", "recall", True),
    Metric("nll", "NLL (bits/dim)", False),
    Metric("train_images_per_second", "train images/s", True, True),
    Metric("sample_images_per_second", "sample images/s", True, True),
    Metric("params", "parameters", False),
)
METRIC_KEYS = tuple(m.key for m in METRICS)
# Relative tolerances when neither the suite nor --tolerance gives one. KID at a few thousand samples
# is noisier than FID (its standard deviation is often a third of its value), hence 0.5.
DEFAULT_TOLERANCES = {"fid": 0.10, "kid": 0.50, "precision": 0.10, "recall": 0.10, "nll": 0.02,
                      "train_images_per_second": 0.30, "sample_images_per_second": 0.30, "params": 0.0}
EPS = 1e-12  # a change exactly at the tolerance is within it


def _contended(result: dict[str, Any], metric: Metric) -> bool:
    """Whether ``result``'s figure of the speed ``metric`` was timed on a contended machine."""
    return bool(getattr(summarize(result), metric.key.replace("_images_per_second", "_contended"), False))


def compare(a: Path, b: Path, tolerance: Optional[float]) -> tuple[str, bool]:
    """The changes from results ``a`` (the reference) to ``b`` (new) as text, and whether ``b`` regressed."""
    runs_a, suite_a, folder_a = load_side(Path(a))
    runs_b, suite_b, folder_b = load_side(Path(b))
    if (Path(a) / RESULT_FILE).is_file() and (Path(b) / RESULT_FILE).is_file():  # two runs, whatever their names
        runs_b = {run: result for run, result in zip(runs_a, runs_b.values())}
    tolerances = resolve_tolerances(suite_b or suite_a, tolerance)
    noise, source = find_noise([(runs_a, folder_a, Path(a)), (runs_b, folder_b, Path(b))])
    lines = [f"compare {a} (reference) -> {b} (new); tolerances: "
             + ", ".join(f"{k} {v:.0%}" for k, v in tolerances.items()), source]
    regressions: list[str] = []
    for run in sorted(set(runs_a) | set(runs_b)):
        lines.append("")
        entry = noise.get(seed_noise.model_key(runs_a.get(run) or runs_b[run]))
        lines += compare_run(run, runs_a.get(run), runs_b.get(run), tolerances, regressions, entry)
    lines.append("")
    if regressions:
        lines.append(f"REGRESSED: {len(regressions)} ({'; '.join(regressions)})")
    else:
        both = [r for r in set(runs_a) & set(runs_b)
                if runs_a[r].get("status") == runs_b[r].get("status") == STATUS_DONE]
        other = [r for r in both if differing([fingerprint(runs_a[r]), fingerprint(runs_b[r])])]
        fields = sorted({f for r in other for f in differing([fingerprint(runs_a[r]), fingerprint(runs_b[r])])})
        lines.append(f"no regression ({len(both) - len(other)} runs done in both compared"
                     + (f"; {len(other)} not compared: their protocols differ in {', '.join(fields)}"
                        if other else "") + ")")
    return "\n".join(lines), bool(regressions)


# --- loading -------------------------------------------------------------------------------------

def load_side(path: Path) -> tuple[dict[str, dict], dict[str, Any], Path]:
    """(run name -> result, resolved suite or {}, the suite's folder) of a suite folder, a root with one
    suite, or a run."""
    if not path.is_dir():
        raise TrilemmaError(f"{path} is not a results folder")
    if (path / RESULT_FILE).is_file():  # one run's folder
        result = read_result(path)
        return {result["run"]: result}, _suite(path.parent), path.parent
    run_dirs = [d for d in sorted(path.iterdir()) if (d / RESULT_FILE).is_file()]
    if run_dirs:
        return {(r := read_result(d))["run"]: r for d in run_dirs}, _suite(path), path
    suites = [d for d in sorted(path.iterdir()) if d.is_dir()
              and any((e / RESULT_FILE).is_file() for e in d.iterdir() if e.is_dir())]
    if len(suites) == 1:
        return load_side(suites[0])
    if suites:
        raise TrilemmaError(f"{path} holds several suites ({', '.join(d.name for d in suites)}); "
                            f"give one, e.g. {suites[0]}")
    raise TrilemmaError(f"no results under {path}")


def _suite(folder: Path) -> dict[str, Any]:
    path = folder / SUITE_FILE
    if not path.is_file():
        return {}
    suite = read_json(path)
    if not isinstance(suite, dict):
        raise TrilemmaError(f"{path}: not a resolved suite (a {type(suite).__name__})")
    return suite | {"_path": str(path)}


def find_noise(sides: list[tuple[dict[str, dict], Path, Path]]) -> tuple[dict[str, dict], str]:
    """Per model key, the seed noise with the most seeds among the sides' folders (measured from their
    results) and their ``noise.json``; and a line saying where it came from. ``sides``: (runs, the
    suite's folder, the path given)."""
    sources: list[tuple[str, dict[str, dict]]] = []
    for runs, folder, given in sides:
        if given != folder:  # a run folder: the seeds are its suite folder's
            runs = {r["run"]: r for d in sorted(folder.iterdir()) if (d / RESULT_FILE).is_file()
                    and (r := read_result(d))}
        sources += [(str(folder), seed_noise.measure(runs.values())),
                    (str(folder / seed_noise.NOISE_FILE), seed_noise.read_noise(folder))]
    chosen: dict[str, dict] = {}
    for where, models in sources:
        for key, entry in models.items():
            if entry.get("seeds", 0) > chosen.get(key, {}).get("seeds", 0):
                chosen[key] = entry | {"source": where}
    used = {entry["source"] for entry in chosen.values()}
    if not chosen:
        return chosen, ("seed noise: none (no folder holds several seeds of a model, nor a noise.json): "
                        "changes are held to the tolerances and the runs' own spreads")
    seeds = sorted({entry["seeds"] for entry in chosen.values()})
    counts = str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"
    return chosen, (f"seed noise: {len(chosen)} models, {counts} seeds each, from {', '.join(sorted(used))}; "
                    f"a change within {seed_noise.Z} sqrt(2) standard deviations over seeds is not a regression")


def resolve_tolerances(suite: dict[str, Any], tolerance: Optional[float]) -> dict[str, float]:
    """Per metric: the suite's tolerance, else ``tolerance``, else the default."""
    given = suite.get("tolerances") or {}
    where = suite.get("_path", "suite")
    unknown = sorted(set(given) - set(METRIC_KEYS))
    if unknown:
        raise TrilemmaError(f"{where}: unknown tolerance {unknown[0]!r}; metrics: {', '.join(METRIC_KEYS)}")
    for key, value in list(given.items()) + [("--tolerance", tolerance)]:
        if value is not None and (not isinstance(value, (int, float)) or value < 0):
            raise TrilemmaError(f"tolerance {key} must be a number >= 0 (relative), got {value!r}")
    fallback = lambda k: DEFAULT_TOLERANCES[k] if tolerance is None else tolerance  # noqa: E731
    return {k: float(given[k]) if k in given else float(fallback(k)) for k in METRIC_KEYS}


# --- one run ------------------------------------------------------------------------------------------

def compare_run(run: str, a: Optional[dict], b: Optional[dict], tolerances: dict[str, float],
                regressions: list[str], noise: Optional[dict[str, Any]] = None) -> list[str]:
    """Lines describing one run; regressions found are appended to ``regressions``. ``noise``: the seed
    noise of its model (:mod:`trilemma.results.noise`), or None."""
    done_a = a is not None and a.get("status") == STATUS_DONE
    if b is None:
        if done_a:
            regressions.append(f"{run} missing")
        return [f"{run}: only in the reference" + (" (REGRESSED: done there, missing here)" if done_a else "")]
    if a is None:
        return [f"{run}: new (status {b.get('status')})"]
    if b.get("status") != STATUS_DONE:
        error = (b.get("error") or {}).get("type", "")
        if done_a:
            regressions.append(f"{run} {b.get('status')}")
        return [f"{run}: status {a.get('status')} -> {b.get('status')}" + (f" ({error})" if error else "")
                + (" REGRESSED" if done_a else "")]
    if not done_a:
        return [f"{run}: status {a.get('status')} -> done (nothing to compare against)"]

    lines, unchanged = [run], []
    fps = [fingerprint(a), fingerprint(b)]
    if differing(fps):
        return [run, f"  protocols differ, not compared: {describe_difference(fps)}"]
    seeds = [(r.get("config") or {}).get("seed") for r in (a, b)]
    if a.get("config_hash") != b.get("config_hash"):
        unseeded = [{k: v for k, v in (r.get("config") or {}).items() if k != "seed"} for r in (a, b)]
        lines.append(f"  note: only the seed changed ({seeds[0]} -> {seeds[1]})" if unseeded[0] == unseeded[1]
                     else "  note: the run's config changed; the numbers may not be comparable")
    device_a, device_b = (_device(r) for r in (a, b))
    if device_a != device_b:
        lines.append(f"  note: device changed ({device_a} -> {device_b}); speeds not compared")
    busy = {m.key: [side for side, r in (("reference", a), ("new", b)) if _contended(r, m)]
            for m in METRICS if m.speed}
    for metric in METRICS:
        if metric.speed and device_a != device_b:
            continue
        if busy.get(metric.key):  # other processes held its CPUs: the figure says nothing of the model
            lines.append(f"  {metric.label}: not compared: the {' and '.join(busy[metric.key])} run's was "
                         f"timed on a contended machine (other processes held CPUs it wanted)")
            continue
        va, vb = metric.get(a), metric.get(b)
        if va is not None and va == vb:
            unchanged.append(metric.label)
            continue
        spreads = [x for x in (metric.spread(a), metric.spread(b)) if x is not None]
        spread = sum(x * x for x in spreads) ** 0.5 if spreads else None
        line, regressed = compare_metric(metric, va, vb, tolerances[metric.key], spread,
                                         seed_noise.seed_spread(noise, metric.key, b))
        if line:
            lines.append("  " + line)
        if regressed:
            regressions.append(f"{run} {metric.key}")
    if unchanged:
        lines.append(f"  unchanged: {', '.join(unchanged)}")
    return lines


def _device(result: dict[str, Any]) -> str:
    return (result.get("provenance") or {}).get("device_name") or "?"


def compare_metric(metric: Metric, va: Optional[float], vb: Optional[float], tolerance: float,
                   spread: Optional[float] = None, seeds: Optional[float] = None) -> tuple[Optional[str], bool]:
    """(a line, regressed) for one metric; no line when neither side measured it. ``spread``: the
    combined measured spread of the two values (same units), and ``seeds`` the change seeds alone make
    (:func:`trilemma.results.noise.seed_spread`), which a regression must exceed too."""
    name = f"{metric.label:<17}"
    if va is None and vb is None:
        return None, False
    if vb is None:
        return f"{name} {_fmt(va)} -> missing  REGRESSED (no longer measured)", True
    if va is None:
        return f"{name} (new) -> {_fmt(vb)}", False
    change = relative_change(va, vb)
    worse = -change if metric.higher_is_better else change  # > 0: got worse
    text = f"{name} {_fmt(va):>10} -> {_fmt(vb):>10}  {change:+8.1%}"
    if worse <= 0:
        return f"{text}  better", False
    if worse <= tolerance + EPS:
        return f"{text}  worse, within {tolerance:.0%}", False
    if spread is not None and abs(vb - va) <= spread + EPS:
        return (f"{text}  worse by more than {tolerance:.0%}, but within the measured spread "
                f"(±{_fmt(spread)})"), False
    if seeds is not None and abs(vb - va) <= seeds + EPS:
        return f"{text}  worse by more than {tolerance:.0%}, but within the seed noise (±{_fmt(seeds)})", False
    within = f" and the measured spread ±{_fmt(spread)}" if spread is not None else ""
    noise = f", beyond the seed noise ±{_fmt(seeds)}" if seeds is not None else ", no seed noise measured"
    return f"{text}  REGRESSED (worse by more than {tolerance:.0%}{within}){noise}", True


def relative_change(a: float, b: float) -> float:
    """(b - a) / |a|; the absolute change when a is 0 (a recall of 0, a KID of 0)."""
    return (b - a) / abs(a) if a != 0 else b - a


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
