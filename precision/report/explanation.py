""""Why do they differ?": the explanation in plain words, every number taken from this run's comparison."""

from __future__ import annotations

import math

from precision.analysis.theory import BF16_U, ONE_ROUNDING
from precision.analysis.verdict import Status, Verdict


def _e(value: float | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.2e}"


def _site(sites: list[dict], name: str) -> dict | None:
    return next((s for s in sites if s["site"] == name), None)


def explain(comparison: dict, verdict: Verdict) -> list[str]:
    """Paragraphs, in reading order."""
    sites = comparison["sites"]
    analysis = comparison.get("analysis") or {}
    logits = _site(sites, "logits")
    layers = [s for s in sites if s["layer"] is not None]
    last = layers[-1] if layers else None
    paragraphs = []
    if logits and last:
        paragraphs.append(
            f"The target and the reference differ by a relative L2 error of {_e(last['relative_l2'])} after the last decoder layer "
            f"({last['site']}) and {_e(logits['relative_l2'])} at the logits. For scale: one rounding to BF16 changes a value by at most "
            f"u = 2^-8 = {BF16_U:.1e} of itself, about {ONE_ROUNDING:.1e} on average, and every layer rounds many intermediate results."
        )
    if logits and logits.get("R") is not None:
        paragraphs.append(
            f"Against the FP32 run of the same model on the same tokens (the numerical truth), the reference errs by "
            f"{_e(logits['expected_vs_truth'])} and the target by {_e(logits['actual_vs_truth'])} at the logits: R = {logits['R']:.2f}. "
            + ("R near 1 means both are equally good roundings of the same computation: their mutual difference is rounding, not a different model."
               if logits["R"] <= verdict.thresholds.r_logits_fail else
               "R well above 1 means the target is less accurate than the reference.")
        )
    if layers:
        first, deepest = layers[0], layers[-1]
        paragraphs.append(
            f"Element by element, after {first['site']} {first['ulp_shares']['0']:.0%} of the values are the same BF16 number on both sides and "
            f"{first['ulp_shares']['1']:.0%} differ by one BF16 step (ULP); after {deepest['site']} {deepest['ulp_shares']['0']:.0%} are identical "
            f"and {deepest['ulp_shares']['>2']:.0%} differ by more than two steps. One-step flips are the signature of rounding; they spread and "
            "grow with depth because every layer passes on, and amplifies, the differences it receives."
        )
    envelope = analysis.get("envelope")
    if envelope:
        row = _site(envelope["sites"], "logits") or envelope["sites"][-1]
        reorder = {k: v for k, v in row["members"].items() if k.startswith(("permute-k", "split-k"))}
        placement = {k: v for k, v in row["members"].items() if k not in reorder}
        text = (f"Re-running the reference itself with {len(row['members'])} legitimate implementation variants moves its {row['site']} by up to "
                f"{_e(row['max'])}; the target's difference is {row['ratio']:.2f}x that (larger than {row['percentile']:.0%} of the variants). ")
        if reorder and placement:
            text += (f"Changing only the order of the sums in every matrix product (FP32 accumulators) moves it by at most {_e(max(reorder.values()))}: "
                     f"accumulation order explains little of a BF16 difference. Where results are rounded to BF16 (fused RMSNorm, fused SwiGLU) and "
                     f"how attention is computed move it by up to {_e(max(placement.values()))}: these choices, all correct, explain the rest.")
        paragraphs.append(text)
    local = analysis.get("local") or {}
    steps = local.get("steps") or []
    if steps:
        worst_r = max(steps, key=lambda s: s["local_R"])
        worst_local = max(steps, key=lambda s: s["local"])
        amplifications = [s["amplification"] for s in steps if s.get("amplification")]
        paragraphs.append(
            f"Replaying every reference layer on the target's own input separates what a layer adds from what it inherits. The largest error a "
            f"layer adds itself is {_e(worst_local['local'])} at {worst_local['site']}"
            + (f" (the largest any implementation variant adds there: {_e(worst_local['envelope_local_max'])})" if worst_local.get("envelope_local_max") is not None else "")
            + f"; the largest local R is {worst_r['local_R']:.2f} at {worst_r['site']}"
            + (f", and layers pass on the error they receive with amplification between {min(amplifications):.2f} and {max(amplifications):.2f}." if amplifications else ".")
        )
    elif local.get("reason"):
        paragraphs.append(f"No layer replay: {local['reason']}.")
    failing = [f for f in verdict.findings if f.status is Status.FAIL] + [f for p in verdict.prompts for f in p.findings if f.status is Status.FAIL]
    if failing:
        paragraphs.append("This run FAILS: " + "; ".join(f"{f.message}" for f in failing[:3]) + ".")
    paragraphs.append(
        "What would have shown a real problem: a layer whose own error is far from FP32 (local R above "
        f"{verdict.thresholds.local_r_fail}; accumulating a layer's sums in BF16 gives about 2.5), a systematic gain along what a layer computes "
        "(a weight off by a few tenths of a percent), a teacher-forced top-1 flip at a margin wider than the logit noise, NaN or Inf, or R at the "
        f"logits above {verdict.thresholds.r_logits_fail}. `precision-check selftest` plants each of these and shows they are caught."
    )
    return paragraphs
