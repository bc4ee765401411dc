"""The report's view model: everything the templates show, computed once from comparison + verdict.

Templates only format; every number they print is taken from comparison.json (or the verdict built from it).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from precision import names
from precision.analysis.theory import BF16_U, FP32_U, ONE_ROUNDING, ROUNDINGS_PER_LAYER
from precision.analysis.verdict import Status, Verdict
from precision.report.explanation import NO_ENVELOPE, R_SAME_BAND, explain, layers_phrase, r_wording
from precision.report.performance import performance_view
from precision.report.serving import serving_view
from precision.report.svg import Band, Series, bar_chart, line_chart

Decoder = Callable[[list[int]], str]
_THINK = re.compile(r"<think>(.*?)(</think>|$)", re.S)


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
class Segment:
    text: str
    thinking: bool
    diverged: bool


def _segments(common: str, rest: str) -> list[Segment]:
    """Split a generated text into thinking / answer parts, marking what follows the divergence point."""
    pieces: list[Segment] = []
    for text, diverged in ((common, False), (rest, True)):
        position = 0
        for match in _THINK.finditer(text):
            if match.start() > position:
                pieces.append(Segment(text[position:match.start()], False, diverged))
            pieces.append(Segment(match.group(0), True, diverged))
            position = match.end()
        if position < len(text):
            pieces.append(Segment(text[position:], False, diverged))
    return pieces


def fmt(value: Any, spec: str = ".3e") -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("∞" if value > 0 else "−∞")
    return format(value, spec)


def _prompt_view(p: dict, verdict, decode: Decoder | None, prompt_ids: list[int] | None) -> dict:
    logits = p.get(names.LOGITS, {})
    flips = logits.get("flips", [])
    render = decode or _ids_text
    tokens = p["tokens"]
    k = tokens[names.MATCHING_PREFIX]
    common = render(tokens["expected_generated"][:k])
    worst_site = max((s for s in p["sites"] if math.isfinite(s["metrics"][names.RELATIVE_L2])), key=lambda s: s["metrics"][names.RELATIVE_L2], default=None)
    per_position = logits.get("per_position", {})
    positions = [str(x) for x in logits.get("positions", [])]
    kl_chart = None
    if positions:
        flip_positions = {f["position"] for f in flips}
        flip_series = tuple(v if int(pos) in flip_positions else None for pos, v in zip(positions, per_position[names.KL]))
        kl_chart = line_chart(positions, [Series("KL per position", tuple(per_position[names.KL])), Series("top-1 flip", flip_series, dashed=True)],
                              y_label="KL (nats)", title=f"{p['id']}: logits KL per teacher-forced position", height=220)
    return {
        "id": p["id"], "category": p["category"], "status": verdict.status.value, "findings": verdict.findings,
        "prompt_tokens": p["prompt_tokens"], "forced_tokens": p["forced_tokens"], "tokens": tokens,
        names.KL_MEAN: logits.get(names.KL_MEAN), "kl_max": logits.get("kl_max"), "top1": logits.get(names.TOP1_AGREEMENT), "top5": logits.get("top5_overlap_mean"),
        "flips": [{**f, "expected_text": render([f["expected_token"]]), "actual_text": render([f["actual_token"]])} for f in flips],
        "near_tie_flips": sum(f[names.NEAR_TIE] for f in flips), "real_flips": sum(not f[names.NEAR_TIE] for f in flips),
        "worst_site": worst_site["site"] if worst_site else None, "worst_rel_l2": worst_site["metrics"][names.RELATIVE_L2] if worst_site else None,
        "reference_text": _segments(common, render(tokens["expected_generated"][k:])),
        "target_text": _segments(common, render(tokens["actual_generated"][k:])),
        "kl_chart": kl_chart,
        "prompt_text": render(prompt_ids) if prompt_ids is not None else None,
    }


def _charts(sites: list[dict], analysis: dict, has_truth: bool) -> dict:
    labels = [s["site"] for s in sites]
    series = [Series("target vs reference", tuple(s[names.RELATIVE_L2] for s in sites))]
    if has_truth:
        series.append(Series("reference vs FP32 truth", tuple(s[names.EXPECTED_VS_TRUTH] for s in sites), dashed=True))
        series.append(Series("target vs FP32 truth", tuple(s[names.ACTUAL_VS_TRUTH] for s in sites), dashed=True))
    bands = []
    envelope = {row["site"]: row for row in (analysis.get("envelope") or {}).get("sites", [])}
    if envelope:
        series.append(Series("implementation envelope: largest variant vs reference", tuple(envelope[s]["max"] if s in envelope else None for s in labels), dashed=True))
    theory = {row["site"]: row for row in analysis.get("theory") or []}
    if theory:
        bands.append(Band("theory band between two BF16 engines",
                          tuple(theory[s]["between_engines_low"] if s in theory else None for s in labels),
                          tuple(theory[s]["between_engines_high"] if s in theory else None for s in labels)))
    charts = {"error": line_chart(labels, series, y_label="relative L2 error", title="Error versus depth (pooled over prompts)", bands=tuple(bands), height=320),
              "r": None, "local": None}
    if has_truth:
        charts["r"] = line_chart(labels, [Series("R = err(target, truth) / err(reference, truth)", tuple(s["R"] for s in sites))],
                                 y_label="R", title="R per site (1 = as accurate as the reference)", log=False, height=240,
                                 hlines=((1.0, "R = 1"),))
    steps = (analysis.get("local") or {}).get("steps") or []
    if steps:
        step_labels = [s["site"] for s in steps]
        charts["local"] = line_chart(step_labels, [
            Series("local: error the step adds itself", tuple(s["local"] for s in steps)),
            Series("inherited: what the reference step makes of the target's input", tuple(s["inherited"] for s in steps)),
            Series("largest local error of any variant", tuple(s.get("envelope_local_max") for s in steps), dashed=True),
        ], y_label="relative L2 error", title="Local versus inherited error (reference layers replayed on the target's inputs)", height=300)
    chosen = [sites[i] for i in sorted({1, len(sites) // 2, len(sites) - 2, len(sites) - 1}) if 0 <= i < len(sites)]
    buckets = ulp_buckets(sites)
    charts["ulp"] = [bar_chart(list(buckets), [s[names.ULP_SHARES].get(k, math.nan) for k in buckets], title=f"{s['site']}: ULP distance",
                               y_label="share") for s in chosen]
    return charts


def ulp_buckets(sites: list[dict]) -> tuple[str, ...]:
    """The ULP-share keys the comparison holds, in its order (a newer comparison adds a non-finite bucket)."""
    keys: list[str] = []
    for s in sites:
        keys += [k for k in s.get(names.ULP_SHARES, {}) if k not in keys]
    return tuple(keys)


def _verdict_rows(comparison: dict, verdict: Verdict, manifests: dict, prompts: list[dict]) -> list[dict]:
    """The adaptation-report table: each row a status and the number behind it."""
    model = manifests.get("expected", {}).get("model", {})
    target = manifests.get("actual", {}).get("backend", {})
    sites = {s["site"]: s for s in comparison["sites"]}
    # Nothing is judged here: the row states what was run and what was captured, so its status is INFO.
    rows = [{"item": "Architecture and engine", "status": "INFO",
             "evidence": f"{model.get('architecture', '?')}, {model.get('num_layers', '?')} layers, hidden {model.get('hidden_size', '?')}, "
                         f"vocabulary {model.get('vocab_size', '?')}; target {target.get('engine', '?')} on {target.get('device', '?')} "
                         f"({target.get('dtype', '?')}); captured: {layers_phrase(comparison)}"}]
    categories: dict[str, list[dict]] = {}
    for p in prompts:
        categories.setdefault(p["category"], []).append(p)
    for category, members in categories.items():
        status = max((Status(p["status"]) for p in members), key=lambda s: s.rank).value
        agree = sum(p["tokens"][names.FIRST_DIVERGENCE] is None for p in members)
        rows.append({"item": f"Inference: {category}", "status": status,
                     "evidence": f"{agree}/{len(members)} greedy generations identical; teacher-forced top-1 {fmt(min(p['top1'] for p in members), '.1%')} (lowest)"})
    all_agree = sum(p["tokens"][names.FIRST_DIVERGENCE] is None for p in prompts)
    worst_layer = max((s for s in comparison["sites"] if s["layer"] is not None), key=lambda s: s[names.RELATIVE_L2], default=None)
    logits = sites.get(names.LOGITS)
    if worst_layer and logits:
        prompt_status = max((Status(p["status"]) for p in prompts), key=lambda s: s.rank).value
        rows.append({"item": "Precision versus CPU reference", "status": prompt_status,
                     "evidence": f"greedy tokens identical on {all_agree}/{len(prompts)} prompts; largest relative L2 error ‖a−e‖/‖e‖ "
                                 f"{fmt(worst_layer[names.RELATIVE_L2])} at {worst_layer['site']}, {fmt(logits[names.RELATIVE_L2])} at the logits"})
        if logits.get("R") is not None:
            r = logits["R"]
            status = "PASS" if math.isfinite(r) and r <= verdict.thresholds.r_logits_fail else "FAIL"
            rows.append({"item": "Accuracy versus FP32 truth", "status": status,
                         "evidence": f"R = {fmt(r, '.2f')} at the logits (target {fmt(logits[names.ACTUAL_VS_TRUTH])}, reference "
                                     f"{fmt(logits[names.EXPECTED_VS_TRUTH])}). {r_wording(r, verdict.thresholds.r_logits_fail)}"})
    analysis = comparison.get("analysis") or {}
    local_row = _local_row(verdict, analysis)
    if local_row:
        rows.append(local_row)
    determinism = analysis.get("determinism")
    if determinism and determinism.get("runs", 0) >= 2:
        ok = determinism["tokens_identical"] == determinism["prompts"]
        rows.append({"item": "Self-consistency (temperature 0)", "status": "PASS" if ok else "WARN",
                     "evidence": f"{determinism['runs']} target runs per prompt: tokens identical across runs on {determinism['tokens_identical']}/"
                                 f"{determinism['prompts']} prompts, tensors bitwise identical on {determinism['tensors_identical']}/{determinism['prompts']}; "
                                 f"run-to-run relative L2 up to {fmt(determinism['max_relative_l2'])}"})
    runtime = manifests.get("actual", {}).get("runtime_seconds")
    rows.append({"item": "Engine performance", "status": "INFO",
                 "evidence": f"capture run took {runtime:.1f} s (generation and capture"
                             + (f", {determinism['runs']} runs per prompt" if determinism and determinism.get("runs", 0) >= 2 else "")
                             + "; not a throughput benchmark)" if runtime else "not measured"})
    return rows


def _local_row(verdict: Verdict, analysis: dict) -> dict | None:
    """The layer-by-layer row: a failing rule's own sentence, or the replay's numbers (never a claim about an
    envelope that was not measured)."""
    failing = next((f for f in verdict.findings if f.rule in ("local-R", "local-gain", "local-envelope") and f.status is not Status.PASS), None)
    if failing is not None:
        return {"item": "Layer-by-layer explanation", "status": failing.status.value, "evidence": failing.message}
    steps = [s for s in (analysis.get("local") or {}).get("steps") or [] if isinstance(s.get("local_R"), (int, float))]
    if not steps:
        return None
    worst_r = max(steps, key=lambda s: s["local_R"])
    evidence = f"replayed {len(steps)} steps on the target's inputs; largest local R {fmt(worst_r['local_R'], '.2f')} at {worst_r['site']}"
    ratios = [s for s in steps if isinstance(s.get(names.LOCAL_RATIO), (int, float)) and math.isfinite(s[names.LOCAL_RATIO])]
    if ratios:
        worst = max(ratios, key=lambda s: s[names.LOCAL_RATIO])
        evidence += f"; largest local error {fmt(worst[names.LOCAL_RATIO], '.2f')}x the largest implementation variant's, at {worst['site']}"
    else:
        evidence += f"; {NO_ENVELOPE}, so local errors are not compared with variants"
    return {"item": "Layer-by-layer explanation", "status": "PASS", "evidence": evidence}


def _non_finite_rows(comparison: dict) -> list[dict]:
    """Every (prompt, site) with a NaN or Inf on either side, with whatever counts the comparison recorded."""
    rows = []
    for p in comparison["prompts"]:
        for entry in p["sites"]:
            nf = entry["metrics"].get(names.NON_FINITE) or {}
            shown = {k: v for k, v in nf.items() if k != "first_index" and v not in (None, 0, [])}
            if any(isinstance(v, (int, float)) for v in shown.values()):
                rows.append({"prompt": p["id"], "site": entry["site"], "counts": shown, "first_index": nf.get("first_index")})
    return rows


def _extra_site_columns(sites: list[dict]) -> list[str]:
    """Pooled per-site metrics beyond the fixed columns (for example a Euclidean distance), shown when present."""
    fixed = {"site", "layer", names.RELATIVE_L2, names.MAX_ABS, names.COSINE_MIN, names.ULP_SHARES, names.NON_FINITE, names.EXPECTED_VS_TRUTH, names.ACTUAL_VS_TRUTH, "R"}
    extra: list[str] = []
    for s in sites:
        extra += [k for k, v in s.items() if k not in fixed and k not in extra and (v is None or isinstance(v, (int, float)))]
    return extra


def _extra_step_columns(steps: list[dict]) -> list[str]:
    """Replay figures beyond the fixed columns (for example a step's rounding floor), shown when present."""
    fixed = {"site", "input_site", "input", "inherited", "amplification", "local", "envelope_local_max", names.LOCAL_RATIO, "local_R",
             names.LOCAL_GAIN, "local_ulp_shares", "envelope_gain_max"}
    extra: list[str] = []
    for s in steps:
        extra += [k for k, v in s.items() if k not in fixed and k not in extra and (v is None or isinstance(v, (int, float)))]
    return extra


def _report_definitions(has_truth: bool) -> dict[str, str]:
    """Definitions of the words and bands the report itself uses, written from the constants they stand for."""
    text = {
        "theory band": (f"Between two BF16 engines that round independently: from sqrt(2) x (u/sqrt(3) + a) to sqrt(2) x sqrt(n) x "
                        f"(u/sqrt(3) + a), with u = {BF16_U:.3e} (u/sqrt(3) = {ONE_ROUNDING:.3e}, one rounding in RMS), a = sqrt(K) x "
                        f"{FP32_U:.3e} for FP32 accumulation over the longest reduction K, and n the rounding points up to the site "
                        f"(1 at the embedding, {ROUNDINGS_PER_LAYER} per decoder layer, one more at the final norm, two more at the "
                        "logits); amplification is not modelled (precision/analysis/theory.py)."),
    }
    if has_truth:
        text["R wording"] = (f"R within 1 ± {R_SAME_BAND} is reported as 'about as accurate as the reference'; below that band the target is "
                             f"closer to FP32 truth than the reference, above it further (precision/report/explanation.py R_SAME_BAND).")
    return text


def build_view(comparison: dict, verdict: Verdict, *, decode: Decoder | None = None, command: str | None = None,
               manifests: dict[str, dict] | None = None, serving: dict | None = None) -> dict:
    manifests = manifests or {}
    verdicts = {p.id: p for p in verdict.prompts}
    has_truth = comparison.get("truth") is not None
    analysis = comparison.get("analysis") or {}
    prompt_ids = {r["id"]: r["prompt_ids"] for r in manifests.get("expected", {}).get("prompts", [])}
    prompts = [_prompt_view(p, verdicts[p["id"]], decode, prompt_ids.get(p["id"])) for p in comparison["prompts"]]
    sites = comparison["sites"]
    logits_site = next((s for s in sites if s["site"] == names.LOGITS), None)
    return {
        "verdict": verdict,
        "status": verdict.status.value,
        "summary": verdict.summary,
        "conclusion": _conclusion(verdict, logits_site, prompts, has_truth, analysis),
        "verdict_rows": _verdict_rows(comparison, verdict, manifests, prompts),
        "explanation": explain(comparison, verdict),
        "expected": comparison["expected"],
        "actual": comparison["actual"],
        "truth": comparison.get("truth"),
        "manifests": manifests,
        "created_at": comparison["created_at"],
        "prompts": prompts,
        "skipped": comparison.get("skipped_prompts", []),
        "sites": sites,
        "analysis": analysis,
        "has_truth": has_truth,
        "charts": _charts(sites, analysis, has_truth),
        "definitions": comparison["definitions"],
        "report_definitions": _report_definitions(has_truth),
        "non_finite_rows": _non_finite_rows(comparison),
        "performance": performance_view(manifests),
        "serving": serving_view(serving, verdict.status.value),
        "first_non_finite": analysis.get("first_non_finite"),
        "extra_site_columns": _extra_site_columns(sites),
        "ulp_buckets": ulp_buckets(sites),
        "extra_step_columns": _extra_step_columns((analysis.get("local") or {}).get("steps") or []),
        "flip_columns": _flip_columns(prompts),
        "layers_captured": layers_phrase(comparison),
        "model_path": manifests.get("expected", {}).get("model", {}).get("path"),
        "unit_roundoff": BF16_U,
        "command": command,
        "fmt": fmt,
    }


def _flip_columns(prompts: list[dict]) -> list[str]:
    """Flip fields beyond the fixed ones (for example the near-tie bound and the noise sigma), shown when present."""
    fixed = {"position", "expected_token", "actual_token", names.EXPECTED_MARGIN, names.NEAR_TIE, "expected_text", "actual_text"}
    extra: list[str] = []
    for p in prompts:
        for f in p["flips"]:
            extra += [k for k in f if k not in fixed and k not in extra]
    return sorted(extra, key=lambda k: k != "bound")  # the near-tie bound beside the margin it is compared with


def _conclusion(verdict: Verdict, logits_site: dict | None, prompts: list[dict], has_truth: bool, analysis: dict) -> str:
    n = len(prompts)
    agree = sum(p["tokens"][names.FIRST_DIVERGENCE] is None for p in prompts)
    parts = [f"{verdict.summary}."]
    parts.append(f"Free-running greedy generations are identical on {agree} of {n} prompts.")
    if logits_site is not None:
        parts.append(f"Teacher-forced logits differ by a relative L2 error of {fmt(logits_site[names.RELATIVE_L2])} (pooled).")
        if has_truth and logits_site["R"] is not None:
            parts.append(
                f"Against FP32 truth the target's logits err {fmt(logits_site[names.ACTUAL_VS_TRUTH])} and the reference's "
                f"{fmt(logits_site[names.EXPECTED_VS_TRUTH])}: R = {fmt(logits_site['R'], '.2f')}."
            )
    steps = (analysis.get("local") or {}).get("steps") or []
    ratios = [s for s in steps if isinstance(s.get(names.LOCAL_RATIO), (int, float)) and math.isfinite(s[names.LOCAL_RATIO])]
    if analysis.get("envelope") and ratios:
        worst = max(ratios, key=lambda s: s[names.LOCAL_RATIO])
        if worst[names.LOCAL_RATIO] <= 1.0:
            parts.append(f"Every replayed layer's own error is within the largest that an implementation variant adds there "
                         f"(at most {worst[names.LOCAL_RATIO]:.2f}x, at {worst['site']}).")
        else:
            parts.append(f"The largest own error of a replayed step, relative to the largest that an implementation variant adds there, "
                         f"is {worst[names.LOCAL_RATIO]:.2f}x at {worst['site']}.")
    return " ".join(parts)
