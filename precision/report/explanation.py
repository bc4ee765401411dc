""""Why do they differ?": the explanation in plain words, every number taken from this run's comparison.

Rules this module keeps (tested on real runs in tests/report/test_claims.py):
- a number in a sentence is a value of comparison.json (or of the verdict's thresholds, or a named constant of
  precision.analysis.theory); nothing is remembered from another run (selftest's figures are selftest's);
- a sentence about the FP32 truth, the implementation envelope, the layer replay or the captured layers is
  written only when that data exists, and its wording is chosen from the numbers (which is larger, which side is
  closer to FP32), never fixed in advance.
"""

from __future__ import annotations

import math

from precision import names
from precision.analysis.theory import BF16_U, ONE_ROUNDING
from precision.analysis.verdict import Status, Verdict

R_SAME_BAND = 0.1
"""R within 1 +/- R_SAME_BAND is worded "about as accurate as the reference"; outside it the report says which side
is closer to FP32 truth. A wording band, not a verdict threshold (the verdict uses Thresholds.r_logits_fail)."""

NOT_MEASURED = "Not measured:"
"""Opens the sentence that lists what this run did not measure (the only sentence that names absent data)."""
NO_TRUTH = "no FP32 truth was captured"
NO_ENVELOPE = "no implementation envelope was measured"

REORDER_PREFIXES = ("permute-k", "split-k")
"""Envelope members that change only the order of the sums in matrix products (FP32 accumulators); the other
members change where results are rounded to BF16 or how attention is computed (precision.backends.variants)."""


def _e(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.2e}"


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _site(sites: list[dict], name: str) -> dict | None:
    return next((s for s in sites if s["site"] == name), None)


def captured_layers(comparison: dict) -> tuple[list[int], int | None]:
    """The decoder layer indices present in the comparison, and the model's layer count when recorded."""
    layers = sorted({s["layer"] for s in comparison["sites"] if s.get("layer") is not None})
    return layers, comparison.get("num_layers")


def layers_phrase(comparison: dict) -> str:
    """Which decoder layers were captured, from the data: "all 5 decoder layers" or "decoder layers 0, 2 of 5"."""
    layers, total = captured_layers(comparison)
    if total is not None and layers == list(range(total)):
        return f"all {total} decoder layers"
    if not layers:
        return "no decoder layer" + (f" of {total}" if total is not None else "")
    listed = ", ".join(str(i) for i in layers)
    return f"decoder layer{'s' if len(layers) > 1 else ''} {listed}" + (f" of {total}" if total is not None else "")


def r_wording(r: float, r_fail: float) -> str:
    """What R says, worded from its value (R = err(target, truth) / err(reference, truth))."""
    if not math.isfinite(r):
        return "R is not finite, so the two sides' accuracy cannot be compared."
    if abs(r - 1.0) <= R_SAME_BAND:
        return (f"R within 1 ± {R_SAME_BAND}: the target is about as accurate as the reference, so their mutual difference "
                "is of the size their own rounding errors are.")
    if r < 1.0:
        return f"The target is closer to FP32 than the reference: its error against FP32 is {r:.2f} times the reference's."
    side = "above" if r > r_fail else "within"
    return (f"The target is further from FP32 than the reference: {r:.2f} times the reference's error against FP32, "
            f"{side} the limit of {r_fail}.")


def _size_paragraph(comparison: dict, sites: list[dict], analysis: dict) -> str | None:
    logits = _site(sites, names.LOGITS)
    layers = [s for s in sites if s.get("layer") is not None]
    layer_indices, total = captured_layers(comparison)
    all_layers = total is not None and layer_indices == list(range(total))
    parts = []
    if layers:
        deepest = layers[-1]
        where = ("the last decoder layer" if total is not None and deepest["layer"] == total - 1
                 else f"the deepest captured; {layers_phrase(comparison)} were captured")
        parts.append(f"a relative L2 error of {_e(deepest[names.RELATIVE_L2])} after {deepest['site']} ({where})")
    if logits:
        parts.append(f"{_e(logits[names.RELATIVE_L2])} at the logits")
    if not parts:
        return None
    text = "The target and the reference differ by " + " and ".join(parts) + "."
    if "bfloat16" in {comparison["expected"].get("dtype"), comparison["actual"].get("dtype")}:
        text += (f" For scale: one rounding to BF16 changes a value by at most u = {BF16_U:.2e} (2^-8) of itself, and by "
                 f"u/√3 = {ONE_ROUNDING:.2e} in RMS.")
    theory = {row["site"]: row for row in analysis.get("theory") or []}
    # The theory counts rounding points from the captured sites, so past a skipped layer only a layer site is anchored right.
    candidates = (logits if all_layers else None, layers[-1] if layers else None)
    anchor = next((s for s in candidates if s is not None and s["site"] in theory), None)
    if anchor is not None:
        row = theory[anchor["site"]]
        low, high, measured = row["between_engines_low"], row["between_engines_high"], anchor[names.RELATIVE_L2]
        place = "below" if measured < low else ("above" if measured > high else "within")
        text += (f" Rounding theory for two BF16 engines ({row['roundings']} rounding points up to {anchor['site']}, no amplification) "
                 f"predicts between {_e(low)} and {_e(high)} there; the measured difference is {place} that band.")
    return text


def _truth_paragraph(logits: dict | None, verdict: Verdict) -> str | None:
    if not logits or logits.get("R") is None:
        return None
    return (f"Against the FP32 run of the same model on the same tokens (the numerical truth), the reference errs by "
            f"{_e(logits[names.EXPECTED_VS_TRUTH])} and the target by {_e(logits[names.ACTUAL_VS_TRUTH])} at the logits: R = {logits['R']:.2f}. "
            + r_wording(logits["R"], verdict.thresholds.r_logits_fail))


def _ulp_paragraph(layers: list[dict]) -> str | None:
    usable = [s for s in layers if all(_finite(s[names.ULP_SHARES].get(k)) for k in ("0", "1", ">2"))]
    if not usable:
        return None
    first, deepest = usable[0], usable[-1]
    text = (f"Element by element, after {first['site']} {first[names.ULP_SHARES]['0']:.0%} of the values are the same BF16 number on both "
            f"sides and {first[names.ULP_SHARES]['1']:.0%} differ by one BF16 step (ULP)")
    if deepest is first:
        return text + "."
    text += (f"; after {deepest['site']} {deepest[names.ULP_SHARES]['0']:.0%} are identical and {deepest[names.ULP_SHARES]['>2']:.0%} differ by "
             "more than two steps.")
    if deepest[names.ULP_SHARES]["0"] < first[names.ULP_SHARES]["0"]:
        text += " Fewer values are identical deeper in the model: the differences spread as each layer passes on those it receives."
    else:
        text += " The deeper layer has no fewer identical values than the first: the differences do not spread with depth here."
    return text


def _envelope_paragraph(envelope: dict | None) -> str | None:
    if not envelope or not envelope.get("sites"):
        return None
    row = _site(envelope["sites"], names.LOGITS) or envelope["sites"][-1]
    members = row["members"]
    within = "within" if row["ratio"] <= 1.0 else "beyond"
    text = (f"Re-running the reference itself with {len(members)} legitimate implementation variants moves its {row['site']} by up to "
            f"{_e(row['max'])}; the target's difference, {_e(row['target'])}, is {row['ratio']:.2f}x that ({within} the largest variant; "
            f"larger than {row['percentile']:.0%} of the variants).")
    reorder = {k: v for k, v in members.items() if k.startswith(REORDER_PREFIXES) and _finite(v)}
    placement = {k: v for k, v in members.items() if not k.startswith(REORDER_PREFIXES) and _finite(v)}
    if reorder and placement:
        order, place = max(reorder.values()), max(placement.values())
        order_text = f"changing only the order of the sums in every matrix product (FP32 accumulators) moves it by at most {_e(order)}"
        place_text = f"changing where results are rounded to BF16 (fused RMSNorm, fused SwiGLU) and how attention is computed, by up to {_e(place)}"
        if order < place:
            text += f" Of these, rounding placement moves it more than order does: {place_text}; {order_text}."
        elif order > place:
            text += f" Of these, accumulation order moves it more than rounding placement does: {order_text}; {place_text}."
        else:
            text += f" Accumulation order and rounding placement move it equally: {order_text}; {place_text}."
    return text


def _local_paragraph(local: dict) -> str | None:
    steps = local.get("steps") or []
    if not steps:  # the closing paragraph says that no layer was replayed, and why
        return None
    measured = [s for s in steps if _finite(s.get("local_R"))]
    worst_local = max((s for s in steps if _finite(s.get("local"))), key=lambda s: s["local"], default=None)
    text = "Replaying every reference layer on the target's own input separates what a layer adds from what it inherits."
    if worst_local is not None:
        text += f" The largest error a layer adds itself is {_e(worst_local['local'])} at {worst_local['site']}"
        if _finite(worst_local.get("envelope_local_max")):
            text += f" (the largest any implementation variant adds there: {_e(worst_local['envelope_local_max'])})"
        text += "."
    if measured:
        worst_r = max(measured, key=lambda s: s["local_R"])
        text += f" The largest local R is {worst_r['local_R']:.2f} at {worst_r['site']}."
    amplifications = [s["amplification"] for s in steps if _finite(s.get("amplification"))]
    if amplifications:
        text += f" Layers pass on the error they receive with amplification between {min(amplifications):.2f} and {max(amplifications):.2f}."
    return text


def _checks_paragraph(comparison: dict, verdict: Verdict, analysis: dict) -> str:
    """The checks this run applied (with their limits), then what it did not measure and why."""
    th = verdict.thresholds
    has_truth = comparison.get("truth") is not None
    envelope = analysis.get("envelope")
    local = analysis.get("local") or {}
    replayed = bool(local.get("steps"))
    applied = ["NaN or Inf in the target where the reference is finite",
               "a teacher-forced top-1 flip at a margin wider than the near-tie bound",
               f"a relative L2 error above {th.rel_l2_fail} at any site"]
    if has_truth:
        applied.append(f"R at the logits above {th.r_logits_fail}")
    if replayed:
        applied.append(f"a layer whose own error is far from FP32 (local R above {th.local_r_fail})")
        applied.append(f"a systematic gain along what a layer computes (|local gain| above {th.gain_floor:g}"
                       + (f" or {th.gain_fail_factor:g}x the variants'" if envelope else "") + ")")
        if envelope:
            applied.append(f"a layer adding more than {th.local_ratio_fail:g}x the local error of any implementation variant")
    text = "What would have shown a real problem in this run: " + "; ".join(applied) + "."
    missing = []
    if not has_truth:
        missing.append(f"{NO_TRUTH}, so R (which side is closer to FP32) is unknown")
    if not envelope:
        missing.append(f"{NO_ENVELOPE}, so the difference is not placed among implementation variants")
    if not replayed:
        missing.append("no layer was replayed" + (f" ({local['reason']})" if local.get("reason") else "")
                       + ", so local and inherited error are not separated")
    layers, total = captured_layers(comparison)
    if total is not None and layers != list(range(total)):
        missing.append(f"captured only {layers_phrase(comparison)}")
    if missing:
        text += f" {NOT_MEASURED} " + "; ".join(missing) + "."
    return text + " `precision-check selftest` plants faults of these kinds and shows which checks catch them."


def explain(comparison: dict, verdict: Verdict) -> list[str]:
    """Paragraphs, in reading order; a paragraph whose data the run lacks is left out."""
    sites = comparison["sites"]
    analysis = comparison.get("analysis") or {}
    layers = [s for s in sites if s.get("layer") is not None]
    paragraphs = [
        _size_paragraph(comparison, sites, analysis),
        _truth_paragraph(_site(sites, names.LOGITS), verdict),
        _ulp_paragraph(layers),
        _envelope_paragraph(analysis.get("envelope")),
        _local_paragraph(analysis.get("local") or {}),
    ]
    failing = [f for f in verdict.findings if f.status is Status.FAIL] + [f for p in verdict.prompts for f in p.findings if f.status is Status.FAIL]
    if failing:
        paragraphs.append("This run FAILS: " + "; ".join(f.message for f in failing[:3]) + ".")
    paragraphs.append(_checks_paragraph(comparison, verdict, analysis))
    return [p for p in paragraphs if p]
