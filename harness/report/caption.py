"""The table's caption and the notes under it: budget, device, FID protocol, failed runs."""
from __future__ import annotations

from typing import Optional

import pandas as pd

from trilemma.contract.literature import CITATION as LITERATURE
from trilemma.contract.literature import mark_legend
from trilemma.report.load import load_seed_table
from trilemma.report.marks import paper_size_mark, paper_size_note
from trilemma.report.table import LIT_ONLY, PRETRAINED_MARK, _bool, _number, _text, compared
from trilemma.results.formats import DASH, format_budget, format_count
from trilemma.results.schema import FID, MEASURED, STATUS_DONE, TRAIN, summarize


def describe(name: str, results: list[dict], models: pd.DataFrame) -> tuple[str, list[str]]:
    """The caption (budget, device, FID protocol, literature) and the notes under the table."""
    done = [r for r in results if r.get("status") in MEASURED]
    datasets = ", ".join(sorted(models["dataset"].unique()))
    caption = (f"Suite `{name}` on {datasets}: {len(done)} finished runs of {models['model'].nunique()} "
               f"models. {_budget(done)} {_devices(done)} {_fid_protocol(done)} NLL in bits/dim on the test "
               f"split; ≤ marks an upper bound, ≈ a Monte-Carlo estimate. Columns marked (lit.) are the "
               f"figures on CIFAR-10 reported in the review ({LITERATURE}); they are comparable to ours "
               f"only where the dataset and protocol match.{_variants(models)} "
               f"“{LIT_ONLY}”: a model of the review that trilemma does not implement; "
               f"{DASH}: not measured or not applicable. ±: half-width of a 95 % interval: over the "
               f"seeds (Student t) where a model has several (×n), else the run's own (FID, KID, precision, "
               f"recall: 1.96 bootstrap standard deviations over resamples of the generated samples; "
               f"NLL: 1.96 standard errors over test images).")
    return caption, _notes(results, models)


def _variants(models: pd.DataFrame) -> str:
    """What the (lit.) FID is of, and its marks where the table has some (a leading space)."""
    seed = {row["model"]: row for row in load_seed_table().to_dict("records")}
    legend = mark_legend(compared(m, seed.get(_text(m["literature"]))).mark for m in models.to_dict("records"))
    return (" The FID (lit.) is the papers' figure for the variant we run where they give one; the variant "
            "each row measured and that of its figure are listed under the table"
            + (f" ({legend})." if legend else "."))


def _budget(done: list[dict]) -> str:
    if not done:
        return "No run finished."
    budget = "; ".join(sorted({format_budget(r["config"].get("train") or {}) for r in done
                               if not summarize(r).pretrained}) or {"none (pretrained weights only)"})
    seen = [r["measurements"].get(TRAIN, {}) for r in done if not summarize(r).pretrained]
    images = [t["images_seen"] for t in seen if t.get("images_seen") is not None]
    seconds = [t["train_seconds"] for t in seen if t.get("train_seconds") is not None]
    measured = ""
    if images and seconds:
        measured = (f" (runs saw {_span(images, '{:,.0f}')} images in {_span(seconds, '{:.0f}')} s of "
                    f"training)")
    return f"Training budget: {budget}{measured}."


def _span(values: list[float], fmt: str) -> str:
    lo, hi = fmt.format(min(values)), fmt.format(max(values))
    return lo if lo == hi else f"{lo}–{hi}"


def _devices(done: list[dict]) -> str:
    # How each run trained, or, a pretrained one that did not, how it sampled.
    runs = [(r, r["measurements"].get(TRAIN) or (r["measurements"].get(FID) or {}).get("sample_execution") or {})
            for r in done]
    names = sorted({f"{(r.get('provenance') or {}).get('device_name', '?')} "
                    f"({how.get('device', '?')}, {how.get('precision', '?')})" for r, how in runs})
    return f"Device: {'; '.join(names)}." if names else ""


def _fid_protocol(done: list[dict]) -> str:
    protocols = sorted({(f["fid_samples"], f["n_ref"], f.get("split", "train"), f.get("reference", "?"),
                         f.get("extractor", "?"), f.get("weights", "?"))
                        for r in done if (f := r["measurements"].get(FID))}, key=str)
    if not protocols:
        return "FID not measured."
    text = "; ".join(f"FID@{format_count(fid_samples)} ({fid_samples:,} samples) against {n_ref:,} images of the "
                     f"{split} split (reference `{ref}`), {extractor} pool3 features (weights {weights})"
                     for fid_samples, n_ref, split, ref, extractor, weights in protocols)
    return f"{text}; recall as Kynkäänniemi et al. (2019) on the same features."


def _notes(results: list[dict], models: pd.DataFrame) -> list[str]:
    notes = []
    for r in results:
        summary = summarize(r)
        if summary.status == STATUS_DONE:
            continue
        if summary.errors:  # trained and measured, but some measurement failed
            failed = "; ".join(f"its {key} failed ({_first_line(text)})"
                               for key, text in summary.errors.items())
            notes.append(f"Run `{r.get('run')}` is incomplete: {failed}; its other numbers stand.")
            continue
        error = r.get("error") or {}
        why = f" ({error.get('type')}: {_first_line(error.get('message'))})" if error else ""
        state = "failed" if r.get("status") == "failed" else f"is {r.get('status')}"
        notes.append(f"Run `{r.get('run')}` {state}{why}: it gives no numbers.")
    remeasured = sorted({f"{key.upper()} of `{r.get('run')}`" for r in results
                         for key in r.get("measured_by") or {}})
    if remeasured:
        notes.append(f"From the latest `trilemma eval` re-measurement (--evaluations latest): "
                     f"{', '.join(remeasured)}.")
    busy = [r.get("run") for r in results if r.get("status") in MEASURED and summarize(r).contended]
    if busy:
        notes.append(f"Speeds of {', '.join(f'`{b}`' for b in busy)} were timed while other processes held "
                     f"CPUs they wanted (contended): they understate the speed, so they have no stars "
                     f"(a model's speed stars come from its runs timed on a quiet machine, where it has any).")
    known = set(load_seed_table()["model"])
    for m in models.to_dict("records"):
        if _text(m["literature"]) and m["literature"] not in known:
            notes.append(f"`{m['model']}` names the literature row \"{m['literature']}\", which the "
                         f"review's table does not have; it is listed on its own.")
    pretrained = [m["model"] for m in models.to_dict("records") if _bool(m.get("pretrained"))]
    if pretrained:
        notes.append(f"{PRETRAINED_MARK}: {', '.join(f'`{p}`' for p in pretrained)} pretrained, not trained "
                     f"here: measured from weights trained elsewhere (their SHA-256 is in each run's "
                     f"provenance); a training speed shown is a short timed run from those weights.")
    if models["scaling"].isna().all():
        notes.append("Resolution scaling was not measured in this suite: the scaling column is empty.")
    if any(paper_size_mark(_text(m["model"]), _number(m["params"])) for m in models.to_dict("records")):
        notes.append(paper_size_note())
    return notes


def _first_line(text: Optional[str], limit: int = 160) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line if len(line) <= limit else line[:limit - 1] + "…"


