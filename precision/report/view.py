"""The report's view model: everything the templates show, computed once from comparison + verdict.

Templates only format; every number they print is taken from comparison.json (or the verdict built from it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from precision.analysis.verdict import Verdict
from precision.metrics.tensor import BF16_UNIT_ROUNDOFF
from precision.report.svg import Series, line_chart

Decoder = Callable[[list[int]], str]


def load_decoder(model_path: str | None) -> Decoder | None:
    """A detokenizer from the model's tokenizer.json, when the model directory is still there."""
    if not model_path or not (Path(model_path) / "tokenizer.json").is_file():
        return None
    try:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(Path(model_path) / "tokenizer.json"))
    except Exception:  # a tokenizer we cannot read only costs the texts; ids are shown instead
        return None
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=False)


def _ids_text(ids: list[int]) -> str:
    return " ".join(str(i) for i in ids)


@dataclass(frozen=True)
class GeneratedPair:
    common: str
    expected_rest: str
    actual_rest: str
    diverged: bool


def _texts(tokens: dict, decode: Decoder | None) -> GeneratedPair:
    e, a = tokens["expected_generated"], tokens["actual_generated"]
    k = tokens["matching_prefix"]
    render = decode or _ids_text
    return GeneratedPair(render(e[:k]), render(e[k:]), render(a[k:]), tokens["first_divergence"] is not None)


def fmt(value: Any, spec: str = ".3e") -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("∞" if value > 0 else "−∞")
    return format(value, spec)


def build_view(comparison: dict, verdict: Verdict, *, decode: Decoder | None = None, command: str | None = None,
               manifests: dict[str, dict] | None = None) -> dict:
    verdicts = {p.id: p for p in verdict.prompts}
    has_truth = comparison.get("truth") is not None
    prompts = []
    for p in comparison["prompts"]:
        logits = p.get("logits", {})
        flips = logits.get("flips", [])
        worst_site = max((s for s in p["sites"] if math.isfinite(s["metrics"]["relative_l2"])), key=lambda s: s["metrics"]["relative_l2"], default=None)
        prompts.append({
            "id": p["id"],
            "category": p["category"],
            "status": verdicts[p["id"]].status.value,
            "findings": verdicts[p["id"]].findings,
            "prompt_tokens": p["prompt_tokens"],
            "forced_tokens": p["forced_tokens"],
            "tokens": p["tokens"],
            "kl_mean": logits.get("kl_mean"),
            "kl_max": logits.get("kl_max"),
            "top1": logits.get("top1_agreement"),
            "top5": logits.get("top5_overlap_mean"),
            "near_tie_flips": sum(f["near_tie"] for f in flips),
            "real_flips": sum(not f["near_tie"] for f in flips),
            "worst_site": worst_site["site"] if worst_site else None,
            "worst_rel_l2": worst_site["metrics"]["relative_l2"] if worst_site else None,
            "texts": _texts(p["tokens"], decode),
        })
    sites = comparison["sites"]
    labels = [s["site"] for s in sites]
    series = [Series("target vs reference", tuple(s["relative_l2"] for s in sites))]
    if has_truth:
        series.append(Series("reference vs FP32 truth", tuple(s["expected_vs_truth"] for s in sites), dashed=True))
        series.append(Series("target vs FP32 truth", tuple(s["actual_vs_truth"] for s in sites), dashed=True))
    chart = line_chart(labels, series, y_label="relative L2 error", title="Error versus depth (pooled over prompts)")
    r_chart = None
    if has_truth:
        r_chart = line_chart(labels, [Series("R = err(target, truth) / err(reference, truth)", tuple(s["R"] for s in sites))],
                             y_label="R", title="R per site (1 = as accurate as the reference)", log=False, height=240)
    logits_site = next((s for s in sites if s["site"] == "logits"), None)
    return {
        "verdict": verdict,
        "status": verdict.status.value,
        "summary": verdict.summary,
        "conclusion": _conclusion(verdict, logits_site, prompts, has_truth),
        "expected": comparison["expected"],
        "actual": comparison["actual"],
        "truth": comparison.get("truth"),
        "manifests": manifests or {},
        "created_at": comparison["created_at"],
        "prompts": prompts,
        "skipped": comparison.get("skipped_prompts", []),
        "sites": sites,
        "has_truth": has_truth,
        "chart": chart,
        "r_chart": r_chart,
        "definitions": comparison["definitions"],
        "unit_roundoff": BF16_UNIT_ROUNDOFF,
        "command": command,
        "fmt": fmt,
    }


def _conclusion(verdict: Verdict, logits_site: dict | None, prompts: list[dict], has_truth: bool) -> str:
    n = len(prompts)
    agree = sum(p["tokens"]["first_divergence"] is None for p in prompts)
    parts = [f"{verdict.summary}."]
    parts.append(f"Free-running greedy generations are identical on {agree} of {n} prompts.")
    if logits_site is not None:
        parts.append(f"Teacher-forced logits differ by a relative L2 error of {fmt(logits_site['relative_l2'])} (pooled).")
        if has_truth and logits_site["R"] is not None:
            parts.append(
                f"Against FP32 truth the target's logits err {fmt(logits_site['actual_vs_truth'])} and the reference's "
                f"{fmt(logits_site['expected_vs_truth'])}: R = {fmt(logits_site['R'], '.2f')}."
            )
    return " ".join(parts)
