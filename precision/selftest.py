"""Proof by planted faults: the analysis must pass a harmless change and fail real bugs at the right layer.

Cases (all transformers on CPU in the reference dtype, identical to the reference except for the change):
    reordered reduction      every matrix product sums in another order           must PASS
    bf16 accumulation        one layer's matrix products accumulate in BF16       must FAIL naming that layer
    scaled weight            one layer's MLP down-projection weight x (1 + 1e-2)   must FAIL naming that layer
    NaN                      a NaN written into one layer's output at a position   must FAIL and locate it
    NaN against NaN          the reference has a NaN at one element of a layer's    must FAIL naming that layer
                             output, the target at another element of the same row
    logit bias               +5 on one token's logit (lm_head output), the token    must FAIL at the logits, with
                             most often the reference's runner-up                   real (not near-tie) flips
Sensitivity: the weight scale is swept down (1e-2, 3e-3, 1e-3, 3e-4, 1e-4) to find the smallest scaling still
failed at the right layer, BF16 accumulation is planted in every layer in turn, and the logit bias is swept down
(2, 1, 0.5, ... 1/16) to find the smallest bias still failed at the logits.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from precision import (BackendOptions, CapturedReference, CaptureReader, CaptureSettings, Status, Thresholds, Verdict, capture_role,
                       compare_and_report, plan_from_prompts, resolve_model)
from precision.errors import PrecisionError
from precision.io import write_json_atomic
from precision.names import LOGITS, NEAR_TIE, RELATIVE_L2, layer_site
from precision.outputs import claim_output_dir

log = logging.getLogger(__name__)
SCALE_SWEEP = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4)
BIAS = 5.0
"""The planted logit bias: several times any logit margin a near-tie can have, so it must give real flips."""
BIAS_SWEEP = (2.0, 1.0, 0.5, 0.25, 0.125, 0.0625)
"""Powers of two, so adding one to a BF16 logit is the bias itself wherever the logit's ULP allows it."""
NAN_LAYER, NAN_POSITION = 1, 3
MAX_NEW_TOKENS = 16
"""Continuation length of every selftest prompt: enough generated positions for the flips, short enough to keep
the dozens of case captures fast."""
SELFTEST_FORMAT = "precision-check-selftest"
SELFTEST_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Case:
    name: str
    variants: tuple[str, ...]
    expected: Status
    site: str | None  # the site the verdict must name (None: any / not applicable)
    position: int | None = None
    sweep: str | None = None  # sensitivity sweep this case belongs to
    reference_variants: tuple[str, ...] = ()
    """Planted in the reference too (captured fed the unmodified reference's tokens): a fault the target is
    judged against, not one it is judged for."""
    real_flips: bool = False
    """The verdict must hold teacher-forced flips that are not near-ties (the real-flip rule fired)."""


@dataclass(frozen=True)
class CaseResult:
    case: Case
    verdict: Verdict
    named_site: str | None
    rule: str | None
    ok: bool
    changed: bool
    """False when the planted change vanished (a weight scaled by less than BF16's resolution is the same
    weight): such a case measures nothing and counts as neither caught nor missed."""
    real_flips: int = 0
    """Teacher-forced top-1 flips the comparison classed as beyond the near-tie bound, over all prompts."""
    flips: int = 0
    """All teacher-forced top-1 flips, over all prompts."""


def _named(verdict: Verdict) -> tuple[str | None, str | None]:
    """The site and rule of the first failing finding (run-level first: they name the layer that adds error)."""
    findings = list(verdict.findings) + [f for p in verdict.prompts for f in p.findings]
    failing = [f for f in findings if f.status is Status.FAIL]
    chosen = failing[0] if failing else next((f for f in findings if f.status is Status.PASS), None)
    return (chosen.site, chosen.rule) if chosen else (None, None)


def bias_case_name(token: int, bias: float) -> str:
    return f"logit of token {token} + {bias:g}"


SWEEPS = ("weight scale", "bf16 accumulation", "logit bias")


def default_cases(num_layers: int, *, sweep: bool | Iterable[str] = True, bias_token: int | None = None) -> list[Case]:
    """The planted faults, and the sensitivity sweeps named in ``sweep`` (True: all of ``SWEEPS``, False: none).
    The logit-bias cases need ``bias_token`` (see ``runner_up_token``)."""
    sweeps = set(SWEEPS if sweep is True else () if sweep is False else sweep)
    unknown = sweeps - set(SWEEPS)
    if unknown:
        raise PrecisionError(f"unknown sensitivity sweep(s) {sorted(unknown)}; choose from {list(SWEEPS)}")
    middle = num_layers // 2
    nan_site = layer_site(NAN_LAYER)
    cases = [
        Case("reordered reduction", ("permute-k:7",), Status.PASS, None),
        Case(f"bf16 accumulation in layer {middle}", (f"fault:bf16-accum:{middle}",), Status.FAIL, layer_site(middle)),
        Case(f"layer {middle} weight x (1 + 1e-2)", (f"fault:scale-weight:{middle}:1.01",), Status.FAIL, layer_site(middle)),
        Case(f"NaN in layer {NAN_LAYER} at position {NAN_POSITION}", (f"fault:nan:{NAN_LAYER}:{NAN_POSITION}",), Status.FAIL, nan_site, position=NAN_POSITION),
        # Same row, another column: a per-tensor (or per-row) non-finite check sees "both sides have a NaN here".
        Case(f"NaN in layer {NAN_LAYER} at position {NAN_POSITION} against a reference NaN at another element",
             (f"fault:nan:{NAN_LAYER}:{NAN_POSITION}:1",), Status.FAIL, nan_site, position=NAN_POSITION,
             reference_variants=(f"fault:nan:{NAN_LAYER}:{NAN_POSITION}:0",)),
    ]
    if bias_token is not None:
        cases.append(Case(bias_case_name(bias_token, BIAS), (f"fault:logit-bias:{bias_token}:{BIAS!r}",), Status.FAIL, LOGITS, real_flips=True))
    if "weight scale" in sweeps:
        cases += [Case(f"layer {middle} weight x (1 + {eps:g})", (f"fault:scale-weight:{middle}:{1 + eps!r}",), Status.FAIL, layer_site(middle), sweep="weight scale")
                  for eps in SCALE_SWEEP[1:]]
    if "bf16 accumulation" in sweeps:
        cases += [Case(f"bf16 accumulation in layer {i}", (f"fault:bf16-accum:{i}",), Status.FAIL, layer_site(i), sweep="bf16 accumulation")
                  for i in range(num_layers) if i != middle]
    if "logit bias" in sweeps and bias_token is not None:
        cases += [Case(bias_case_name(bias_token, bias), (f"fault:logit-bias:{bias_token}:{bias!r}",), Status.FAIL, LOGITS, sweep="logit bias")
                  for bias in BIAS_SWEEP]
    return cases


def runner_up_token(reference: CaptureReader) -> int:
    """The token that is most often the reference's second-highest logit over every captured position (ties: the
    lower id). A bias on it flips the positions where it trails the top-1 by less than the bias."""
    counts = None
    for record in reference.prompts:
        handle = reference.arrays(record)
        rows, vocab = handle.shape(LOGITS)
        counts = np.zeros(vocab, dtype=np.int64) if counts is None else counts
        step = max(1, (1 << 22) // max(vocab, 1))  # about 16 MB of float32 logits at a time
        for start in range(0, rows, step):
            block = handle.rows(LOGITS, start, start + step)
            block = block[np.isfinite(block).all(axis=1)]
            if block.shape[0] == 0 or vocab < 2:
                continue
            # The runner-up is the argmax once the top-1 (argmax: the lowest id among equal maxima) is set aside.
            top1 = block.argmax(axis=1)
            block[np.arange(block.shape[0]), top1] = -np.inf
            second = block.argmax(axis=1)
            counts += np.bincount(second, minlength=vocab)
    if counts is None or not counts.any():
        raise PrecisionError("the reference capture holds no finite logits row to choose a runner-up token from")
    return int(np.argmax(counts))


def _real_flips(comparison: dict) -> tuple[int, int]:
    flips = [f for prompt in comparison["prompts"] for f in prompt.get(LOGITS, {}).get("flips", [])]
    return sum(not f[NEAR_TIE] for f in flips), len(flips)


def _fails_with(verdict: Verdict, rule: str) -> bool:
    findings = list(verdict.findings) + [f for p in verdict.prompts for f in p.findings]
    return any(f.rule == rule and f.status is Status.FAIL for f in findings)


def run_selftest(prompts: Path, out: Path, *, model: Path | None = None, sweep: bool | Iterable[str] = True, force: bool = False,
                 thresholds: Thresholds | None = None, show_progress: bool = False) -> list[CaseResult]:
    info = resolve_model(model)
    plan = plan_from_prompts(prompts, info, max_new_tokens=MAX_NEW_TOKENS)
    settings = CaptureSettings(show_progress=show_progress)
    with claim_output_dir(out, "selftest", force=force, complete_marker="selftest.json", inputs=[info.path, prompts], can_resume=False):
        results = _run_cases(info, plan, out, settings, sweep, thresholds)
        write_json_atomic(out / "selftest.json", selftest_record(results))
    return results


def selftest_record(results: list[CaseResult]) -> dict:
    """selftest.json: every case with its expectation and outcome, and the sensitivity lines."""
    return {
        "format": SELFTEST_FORMAT,
        "schema_version": SELFTEST_SCHEMA_VERSION,
        "cases": [{"name": r.case.name, "variants": list(r.case.variants), "reference_variants": list(r.case.reference_variants),
                   "expected": r.case.expected.value, "verdict": r.verdict.status.value, "named_site": r.named_site, "rule": r.rule,
                   "ok": r.ok, "changed": r.changed, "real_flips": r.real_flips, "flips": r.flips} for r in results],
        "sensitivity": sensitivity(results),
    }


def _run_cases(info, plan, out: Path, settings: CaptureSettings, sweep, thresholds: Thresholds | None) -> list[CaseResult]:
    from precision import Replayer

    source = CapturedReference()
    cpu = source.open(info, plan, out, settings)
    replayer = Replayer(info.path, cpu.reference.dtype)
    bias_token = runner_up_token(cpu.reference)
    log.info("logit-bias cases bias token %d, most often the reference's runner-up", bias_token)
    results = []
    for index, case in enumerate(default_cases(info.num_layers, sweep=sweep, bias_token=bias_token)):
        case_dir = out / "cases" / f"{index:02d}"
        with claim_output_dir(case_dir, "selftest-case", complete_marker="summary.json", can_resume=False):
            results.append(_run_case(case, index, case_dir, info, out, source.reference, cpu, settings, replayer, thresholds))
        log.info("%s: %s (%s at %s)", case.name, results[-1].verdict.status.value, results[-1].rule, results[-1].named_site)
    return results


def _run_case(case: Case, index: int, case_dir: Path, info, out: Path, spec: str, cpu, settings: CaptureSettings, replayer,
              thresholds: Thresholds | None) -> CaseResult:
    """Capture the case's target (and its planted reference) fed the reference's tokens, then compare and judge.
    The captures live under ``out/cases/NN`` (capture_role puts a role under ``out/captures``)."""
    following = cpu.following
    target = capture_role(f"../cases/{index:02d}/target", spec, info, following, out, settings, options=BackendOptions(variants=case.variants))
    expected, members = cpu.reference, cpu.members
    if case.reference_variants:
        expected = capture_role(f"../cases/{index:02d}/reference", spec, info, following, out, settings,
                                options=BackendOptions(variants=case.reference_variants))
        members = None  # the envelope members were measured against the unmodified reference
    result = compare_and_report(expected, target, cpu.truth, case_dir, members=members, envelope_prompts=cpu.envelope_prompts,
                                replayer=replayer, thresholds=thresholds, show_progress=False)
    return _judge_case(case, result.verdict, result.comparison)


def _judge_case(case: Case, verdict: Verdict, comparison: dict) -> CaseResult:
    site, rule = _named(verdict)
    first = comparison["analysis"]["first_non_finite"]
    real, flips = _real_flips(comparison)
    ok = verdict.status is case.expected and (case.site is None or site == case.site)
    if ok and case.position is not None:
        ok = first is not None and first["site"] == case.site and first["position"] == case.position
    if ok and case.real_flips:
        ok = real > 0 and _fails_with(verdict, "real-flip")
    changed = any(row[RELATIVE_L2] != 0.0 for row in comparison["sites"]) or first is not None
    return CaseResult(case, verdict, site, rule, ok, changed, real_flips=real, flips=flips)


def sensitivity(results: list[CaseResult]) -> dict[str, str]:
    """The smallest planted error each sweep still caught, in words."""
    lines = {}
    scale = [r for r in results if r.case.sweep == "weight scale" or r.case.name.endswith("(1 + 1e-2)")]
    if scale:
        epsilon = lambda r: float(r.case.variants[0].rsplit(":", 1)[1]) - 1.0  # noqa: E731
        smallest = min((epsilon(r) for r in scale if r.ok), default=None)
        missed = sorted(epsilon(r) for r in scale if r.changed and not r.ok)
        vanished = sorted(epsilon(r) for r in scale if not r.changed)
        text = f"caught down to 1 + {smallest:.0e}" if smallest is not None else "never caught"
        text += f"; missed at 1 + {', '.join(f'{m:.0e}' for m in missed)}" if missed else "; none missed"
        if vanished:
            text += f"; at 1 + {', '.join(f'{v:.0e}' for v in vanished)} the scaled BF16 weights equal the originals (nothing to catch)"
        lines["weight scale"] = text
    accumulation = [r for r in results if "bf16-accum" in r.case.variants[0]]
    if accumulation:
        caught = sorted(int(r.case.site.split(".")[1]) for r in accumulation if r.ok)
        lines["bf16 accumulation"] = f"caught in {len(caught)} of {len(accumulation)} layers (layers {caught})"
    lone_nan = [r for r in results if "fault:nan" in r.case.variants[0] and not r.case.reference_variants]
    if lone_nan:
        lines["non-finite"] = "a single NaN element is caught and located" if any(r.ok for r in lone_nan) else "NOT caught"
    nan_against_nan = [r for r in results if "fault:nan" in r.case.variants[0] and r.case.reference_variants]
    if nan_against_nan:
        lines["non-finite against a reference NaN"] = ("a target NaN at another element than the reference's NaN is caught and located"
                                                       if any(r.ok for r in nan_against_nan) else "NOT caught")
    bias = _bias_sensitivity([r for r in results if "fault:logit-bias" in r.case.variants[0]])
    if bias:
        lines["logit bias"] = bias
    return lines


def _bias(result: CaseResult) -> float:
    return float(result.case.variants[0].rsplit(":", 1)[1])


def _bias_sensitivity(results: list[CaseResult]) -> str | None:
    """Caught: FAIL named at the logits. Real flips are counted separately: a small bias can be caught by the
    lm_head's local error before it is large enough to overturn any reference top-1."""
    if not results:
        return None
    caught = [_bias(r) for r in results if r.changed and r.verdict.status is Status.FAIL and r.named_site == LOGITS]
    flipping = [_bias(r) for r in results if r.real_flips > 0]
    missed = sorted((_bias(r) for r in results if r.changed and _bias(r) not in caught), reverse=True)
    vanished = sorted((_bias(r) for r in results if not r.changed), reverse=True)
    text = f"caught at the logits down to +{min(caught):g}" if caught else "never caught"
    text += f"; real flips down to +{min(flipping):g}" if flipping else "; no real flips"
    text += f" ({_flip_counts(results)})"
    text += f"; missed at +{', +'.join(f'{m:g}' for m in missed)}" if missed else "; none missed"
    if vanished:
        text += f"; at +{', +'.join(f'{v:g}' for v in vanished)} every biased BF16 logit rounds back to its original (nothing to catch)"
    return text


def _flip_counts(results: Iterable[CaseResult]) -> str:
    ordered = sorted(results, key=_bias, reverse=True)
    return "real/all flips by bias: " + ", ".join(f"+{_bias(r):g}: {r.real_flips}/{r.flips}" for r in ordered)


def all_as_expected(results: list[CaseResult]) -> bool:
    """The planted faults got their expected verdicts; sweep cases measure sensitivity and are reported."""
    return all(r.ok for r in results if r.case.sweep is None)


def format_table(results: list[CaseResult]) -> str:
    rows = [("case", "expected", "verdict", "named site", "rule", "ok")]
    rows += [(r.case.name, r.case.expected.value, r.verdict.status.value, r.named_site or "-", r.rule or "-",
              "yes" if r.ok else ("no-op" if not r.changed else "NO")) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows)
