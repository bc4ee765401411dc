"""Verdicts: PASS / WARN / FAIL per prompt and overall, from one documented rule table.

Rule table (defaults in ``Thresholds``; every finding carries the sentence that explains it):

| rule            | status | when                                                                                   |
|-----------------|--------|----------------------------------------------------------------------------------------|
| non-finite      | FAIL   | at any site, the target has NaN/Inf where the reference is finite, or both are         |
|                 |        | non-finite with different values (NaN vs Inf, +Inf vs -Inf); first site and element    |
| non-finite-ref  | WARN   | the reference alone has NaN/Inf, matched by the target (nothing to compare there)      |
| real-flip       | FAIL   | a teacher-forced top-1 disagreement whose reference margin e_i - e_j exceeds the        |
|                 |        | near-tie bound: stored rounding + z sqrt(2) sigma_other (precision.analysis.near_tie)  |
| near-tie-flip   | PASS   | top-1 disagreements within the near-tie bound (reported, not failed)                    |
| r-logits        | FAIL   | with FP32 truth: R at the logits > r_logits_fail (1.5)                                  |
| r-layer         | WARN   | with FP32 truth: R at any hidden-state site > r_layer_warn (1.5)                        |
| gross-error     | FAIL   | relative L2 at any site > rel_l2_fail (0.1): far beyond what BF16 rounding produces     |
| large-error     | WARN   | without FP32 truth: relative L2 at any site > rel_l2_warn (0.03)                        |
| self-check      | PASS   | none of the above                                                                       |
Run-level rules, from the analysis section (pooled over prompts; the first offending step is named):
| local-R         | FAIL   | a step's local R (its distance from an FP32 replay of its own input, over the          |
|                 |        | reference's BF16 rounding of it, floored at one rounding) > local_r_fail (1.5)          |
| local-gain      | FAIL   | a decoder layer's |local gain| > max(gain_floor (1e-3), gain_fail_factor (4) x the      |
|                 |        | larger of the envelope's and the reference's own BF16 rounding gain against FP32);     |
|                 |        | norms and the lm_head have no update to scale                                          |
| local-envelope  | FAIL   | a step's local error > local_ratio_fail (3) x max(the largest local error of any        |
|                 |        | envelope member, one rounding), and the step is not closer to FP32 (local R >= 1)      |
| envelope        | WARN   | the target's total error at a site > envelope_warn (2) x the largest envelope member's, |
|                 |        | where the target is not closer to FP32 truth than the reference (R >= 1)                |
| nondeterminism  | WARN   | repeated target runs on the same inputs generated different tokens                      |
| explained       | PASS   | otherwise: every step's local error is what implementation choices produce              |
The overall verdict is the worst of the prompt verdicts and the run-level findings.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, fields, replace

from precision import names
from precision.analysis.theory import BF16_U
from precision.contract.analysis import Analysis
from precision.contract.codec import ABSENT, decode, to_plain
from precision.contract.comparison import Comparison, Flip, PooledSite, PromptComparison, SiteComparison
from precision.contract.results import FindingRecord, PromptVerdictRecord, VerdictRecord
from precision.capture import sites as site_names


class Status(str, enum.Enum):
    PASS = "PASS"
    WARN = "WARN"
    FAIL = "FAIL"

    @property
    def rank(self) -> int:
        return {"PASS": 0, "WARN": 1, "FAIL": 2}[self.value]


def worst(statuses) -> Status:
    return max(statuses, key=lambda s: s.rank, default=Status.PASS)


@dataclass(frozen=True)
class Thresholds:
    r_logits_fail: float = 1.5
    r_layer_warn: float = 1.5
    rel_l2_fail: float = 0.1
    rel_l2_warn: float = 0.03
    local_r_fail: float = 1.5
    local_ratio_fail: float = 3.0
    gain_fail_factor: float = 4.0
    gain_floor: float = 1e-3
    envelope_warn: float = 2.0

    @classmethod
    def from_mapping(cls, values: dict) -> "Thresholds":
        from precision.config import from_mapping

        return from_mapping(cls, values, "threshold")


@dataclass(frozen=True)
class Finding:
    rule: str
    status: Status
    message: str
    site: str | None = None
    """The site (layer) the finding points at, when it points at one."""


@dataclass(frozen=True)
class PromptVerdict:
    id: str
    status: Status
    findings: tuple[Finding, ...]
    site_findings: tuple[Finding, ...] = ()
    """Every per-site rule's finding at every site where it fires (site_findings); ``findings`` holds one of each."""


@dataclass(frozen=True)
class Verdict:
    status: Status
    prompts: tuple[PromptVerdict, ...]
    thresholds: Thresholds = field(default_factory=Thresholds)
    findings: tuple[Finding, ...] = ()
    """Run-level findings (local error, envelope, determinism)."""

    @property
    def summary(self) -> str:
        counts = {s: sum(p.status is s for p in self.prompts) for s in Status}
        text = f"{self.status.value}: {counts[Status.PASS]} pass, {counts[Status.WARN]} warn, {counts[Status.FAIL]} fail of {len(self.prompts)} prompts"
        failing = [f for f in self.findings if f.status is not Status.PASS]
        return text + (f"; run-level: {', '.join(f.rule for f in failing)}" if failing else "")

    def to_record(self) -> VerdictRecord:
        """The verdict as summary.json's typed ``verdict`` (precision.contract.results.VerdictRecord)."""
        def record(f: Finding) -> FindingRecord:
            return FindingRecord(rule=f.rule, status=f.status.value, message=f.message, site=f.site)

        return VerdictRecord(status=self.status.value, summary=self.summary,
                             thresholds={f.name: getattr(self.thresholds, f.name) for f in fields(self.thresholds)},
                             findings=[record(f) for f in self.findings],
                             prompts=[PromptVerdictRecord(id=p.id, status=p.status.value, findings=[record(f) for f in p.findings])
                                      for p in self.prompts])

    def to_json(self) -> dict:
        return to_plain(self.to_record())


def judge(comparison: Comparison | dict, thresholds: Thresholds | None = None) -> Verdict:
    """The verdict of a comparison: the typed document, or its JSON form (decoded, and so checked, first)."""
    if not isinstance(comparison, Comparison):
        comparison = decode(Comparison, comparison, "comparison")
    thresholds = thresholds or Thresholds()
    prompts = tuple(_judge_prompt(p, thresholds) for p in comparison.prompts)
    findings = tuple(_judge_analysis(comparison.analysis, comparison.sites, thresholds))
    status = worst([p.status for p in prompts] + [f.status for f in findings])
    return Verdict(status=status, prompts=prompts, thresholds=thresholds, findings=findings)


def _judge_analysis(analysis: Analysis | None, sites: list[PooledSite], th: Thresholds) -> list[Finding]:
    if not analysis:  # None, or ABSENT: a comparison not explained
        return []
    findings: list[Finding] = []
    steps = analysis.local.steps
    for step in steps:
        site = step.site
        if step.local_R > th.local_r_fail:
            findings.append(Finding("local-R", Status.FAIL,
                f"{site} adds error of its own: replayed on the target's own input, its output is {step.local_R:.2f}x as far from "
                f"FP32 as the reference's BF16 rounding of the same step (limit {th.local_r_fail}); local error {step.local:.2e}, "
                f"largest envelope member {step.envelope_local_max:.2e}", site))
            break
        gain, envelope_gain = step.local_gain, step.envelope_gain_max
        if site_names.layer_index(site) is None:
            gain = None  # only a decoder layer has an update; comparisons written before replay knew it carry a norm's gain
        rounding_gain = step.rounding_gain or 0.0  # None (no update) or ABSENT (written before it was measured)
        if gain is not None and abs(gain) > max(th.gain_floor, th.gain_fail_factor * max(envelope_gain or 0.0, rounding_gain)):
            findings.append(Finding("local-gain", Status.FAIL,
                f"{site} computes its update scaled by (1 {'+' if gain > 0 else '-'} {abs(gain):.2e}): a systematic error along what the "
                f"layer computes, where "
                + (f"implementation variants show at most {envelope_gain:.1e} and " if envelope_gain is not None else "")
                + f"the reference's own BF16 rounding shows {rounding_gain:.1e} (limit max({th.gain_floor:g}, {th.gain_fail_factor:g}x "
                + ("the larger))" if envelope_gain is not None else "that))"), site))
            break
        # A step outside the envelope fails only when it is not also closer to FP32 than the reference: a target
        # in a wider dtype (FP16, FP32) differs from the BF16 reference by more than BF16 variants do, and is right to.
        if step.local_ratio is not None and step.local_ratio > th.local_ratio_fail and step.local_R >= 1.0:
            floor = step.rounding_floor or 0.0
            basis = (f"the largest any implementation variant adds there ({step.envelope_local_max:.2e})"
                     if step.envelope_local_max >= floor else
                     f"one rounding ({floor:.2e}; the implementation variants add at most {step.envelope_local_max:.2e} there)")
            findings.append(Finding("local-envelope", Status.FAIL,
                f"{site}'s local error {step.local:.2e} is {step.local_ratio:.1f}x {basis}; limit {th.local_ratio_fail}x", site))
            break
    if analysis.envelope:
        closer_to_truth = {s.site for s in sites if s.R is not None and s.R < 1.0}
        outside = [row for row in analysis.envelope.sites if row.ratio > th.envelope_warn and row.site not in closer_to_truth]
        if outside:
            row = outside[0]
            findings.append(Finding("envelope", Status.WARN,
                f"at {row.site} the target differs from the reference by {row.target:.2e}, {row.ratio:.1f}x the largest of "
                f"{len(row.members)} implementation variants ({row.max:.2e}); {len(outside)} site(s) are outside {th.envelope_warn}x", row.site))
    repeat = analysis.determinism
    if repeat and repeat.tokens_identical < repeat.prompts:
        findings.append(Finding("nondeterminism", Status.WARN,
            f"repeated target runs ({repeat.runs} per prompt) generated different tokens on {repeat.prompts - repeat.tokens_identical} "
            f"of {repeat.prompts} prompts; run-to-run relative L2 up to {repeat.max_relative_l2:.2e}"))
    if steps and not any(f.status is Status.FAIL for f in findings):
        worst_r = max(steps, key=lambda s: s.local_R)
        ratios = [s for s in steps if s.local_ratio is not None]
        worst_ratio = max(ratios, key=lambda s: s.local_ratio) if ratios else None
        ratio_text = f", largest local error relative to the envelope {worst_ratio.local_ratio:.2f}x at {worst_ratio.site}" if worst_ratio else ""
        claim = ("every step's own error is what implementation choices produce" if worst_ratio is not None else
                 "every step's own error is within the limits applied (no implementation envelope was measured)")
        findings.append(Finding("explained", Status.PASS,
            f"{claim}: largest local R {worst_r.local_R:.2f} at {worst_r.site}{ratio_text}; the rest is inherited and amplified"))
    return findings


def _judge_prompt(prompt: PromptComparison, th: Thresholds) -> PromptVerdict:
    """The prompt's findings: each per-site rule (site_findings) once, at the site that represents it (the first
    non-finite site, the logits, the hidden layer with the largest R, the site with the largest relative L2)."""
    logits = next((s for s in prompt.sites if s.site == names.LOGITS), None)
    has_truth = logits is not None and logits.truth is not None
    per_site = site_findings(prompt, th)

    def at(rule: str, site: str | None) -> list[Finding]:
        return [f for f in per_site if f.rule == rule and f.site == site]

    findings: list[Finding] = []
    target_bad, reference_only = [f for f in per_site if f.rule == "non-finite"], [f for f in per_site if f.rule == "non-finite-ref"]
    if target_bad:
        more = f"; {len(target_bad) - 1} later site(s) too" if len(target_bad) > 1 else ""
        findings.append(replace(target_bad[0], message=target_bad[0].message + more))
    if reference_only:
        findings.append(replace(reference_only[0], message=f"{reference_only[0].message}; {len(reference_only)} site(s) so"))
    findings += at("real-flip", names.LOGITS) + _near_tie_findings(prompt)
    hidden = [s for s in prompt.sites if s.site != names.LOGITS]
    if has_truth:
        findings += at("r-logits", names.LOGITS)
        worst_layer = max(hidden, key=lambda s: s.truth.R, default=None)
        findings += at("r-layer", worst_layer.site if worst_layer is not None else None)
    finite_sites = [s for s in prompt.sites if math.isfinite(s.metrics.relative_l2)]
    biggest = max(finite_sites, key=lambda s: s.metrics.relative_l2, default=None)
    if biggest is not None:
        findings += at("gross-error", biggest.site) + at("large-error", biggest.site)
    if not any(f.status is not Status.PASS for f in findings):
        largest = f"largest relative L2 error {biggest.metrics.relative_l2:.2e} at {biggest.site}" if biggest else "no finite site"
        r_text = f", R at the logits {logits.truth.R:.2f}" if has_truth else ""
        top1 = prompt.logits.top1_agreement if prompt.logits else None
        top1_text = f", teacher-forced top-1 agreement {top1:.1%}" if top1 is not None and math.isfinite(top1) else ""
        findings.append(Finding("self-check", Status.PASS, f"{largest}{r_text}{top1_text}"))
    return PromptVerdict(prompt.id, worst(f.status for f in findings), tuple(findings), tuple(per_site))


def site_findings(prompt: PromptComparison, th: Thresholds) -> list[Finding]:
    """Every per-site rule at every site of the prompt where it fires, in site order, each finding with its site
    (msprobe_compare.csv's Result per row; the prompt's findings take one of each rule, see _judge_prompt)."""
    logits = next((s for s in prompt.sites if s.site == names.LOGITS), None)
    has_truth = logits is not None and logits.truth is not None
    findings: list[Finding] = []
    for entry in prompt.sites:
        findings += _non_finite_findings(entry)
        if entry.truth is not None and has_truth:
            r = entry.truth.R
            if entry.site == names.LOGITS and r > th.r_logits_fail:
                findings.append(Finding("r-logits", Status.FAIL,
                    f"at the logits the target is {r:.2f}x as far from FP32 truth as the reference "
                    f"({entry.truth.actual_vs_truth:.2e} vs {entry.truth.expected_vs_truth:.2e}); the limit is {th.r_logits_fail}", entry.site))
            elif entry.site != names.LOGITS and r > th.r_layer_warn:
                findings.append(Finding("r-layer", Status.WARN,
                    f"at {entry.site} the target is {r:.2f}x as far from FP32 truth as the reference "
                    f"({entry.truth.actual_vs_truth:.2e} vs {entry.truth.expected_vs_truth:.2e}); the limit is {th.r_layer_warn}", entry.site))
        err = entry.metrics.relative_l2
        if math.isfinite(err) and err > th.rel_l2_fail:
            findings.append(Finding("gross-error", Status.FAIL,
                f"relative L2 error {err:.2e} at {entry.site} exceeds {th.rel_l2_fail}, far beyond BF16 rounding (unit roundoff {BF16_U:.1e})", entry.site))
        elif math.isfinite(err) and err > th.rel_l2_warn and not has_truth:
            findings.append(Finding("large-error", Status.WARN,
                f"relative L2 error {err:.2e} at {entry.site} exceeds {th.rel_l2_warn}; capture an FP32 truth to tell whether the target or the reference is off",
                entry.site))
        if entry.site == names.LOGITS:
            findings += _real_flip_findings(prompt)
    return findings


def _non_finite_findings(entry: SiteComparison) -> list[Finding]:
    """One site, element by element where the comparison measured it.

    A site's ``non_finite`` counts, when present, ``actual_only`` (target NaN/Inf where the reference is finite)
    and ``mismatched`` (both non-finite, different values: NaN vs Inf, +Inf vs -Inf), each with its first
    [row, column]; either FAILs. Comparisons written before those counts existed are judged on per-kind counts:
    more target NaN (or Inf) than reference NaN (or Inf) means at least one target element is non-finite where
    the reference is not. What is non-finite in the reference alone is a WARN: nothing to compare there."""
    nf = entry.metrics.non_finite
    target_bad, reference_bad = nf.actual_nan + nf.actual_inf, nf.expected_nan + nf.expected_inf
    text = None
    if nf.actual_only is not ABSENT:
        if nf.actual_only:
            text = f"{nf.actual_only} NaN/Inf value(s) where the reference is finite, first at [row, column] {nf.actual_only_first_index}"
        elif nf.mismatched:
            text = (f"{nf.mismatched} element(s) non-finite on both sides with different values "
                    f"(NaN vs Inf or +Inf vs -Inf), first at [row, column] {nf.mismatched_first_index}")
    elif target_bad and (nf.actual_nan > nf.expected_nan or nf.actual_inf > nf.expected_inf):
        text = (f"{nf.actual_nan} NaN and {nf.actual_inf} Inf values against {nf.expected_nan} NaN and {nf.expected_inf} Inf in the "
                f"reference, first non-finite at [row, column] {nf.first_index}")
    if text is not None:
        return [Finding("non-finite", Status.FAIL, f"at {entry.site} the target has {text}", entry.site)]
    if reference_bad:
        return [Finding("non-finite-ref", Status.WARN,
            f"the reference itself has {nf.expected_nan} NaN and {nf.expected_inf} Inf values at {entry.site}, first at "
            f"{nf.first_index} (nothing to compare against there; the target is not non-finite anywhere the reference is finite)", entry.site)]
    return []


def _flip_margin(f: Flip) -> float:  # comparisons written before flip_margin existed carry only the reference's margin
    return f.expected_margin if f.flip_margin is ABSENT else f.flip_margin


def _real_flip_findings(prompt: PromptComparison) -> list[Finding]:
    """Real flips FAIL (precision.analysis.near_tie: the bound is the stored logits' rounding plus z sqrt(2) sigma,
    sigma the logit noise of the position's other tokens)."""
    real = [f for f in (prompt.logits.flips if prompt.logits else []) if not f.near_tie]
    if not real:
        return []
    f = real[0]
    bound_text = (f"the near-tie bound {f.bound:.3g} ({f.rounding_allowance:.3g} for the stored logits' rounding + "
                  f"z {f.z:.2f} x sqrt(2) x the other tokens' logit noise {f.other_rms:.3g})") if f.bound is not ABSENT else \
                 f"a logit noise of {f.logit_noise:.3g}"
    return [Finding("real-flip", Status.FAIL,
        f"{len(real)} teacher-forced top-1 flip(s) beyond the near-tie bound; first at position {f.position}: "
        f"token {f.expected_token} -> {f.actual_token}, which the reference ranks {_flip_margin(f):.3g} logits lower, against "
        f"{bound_text}", names.LOGITS)]


def _near_tie_findings(prompt: PromptComparison) -> list[Finding]:
    """Near-ties are reported, not failed."""
    near = [f for f in (prompt.logits.flips if prompt.logits else []) if f.near_tie]
    if not near:
        return []
    widest = max(near, key=_flip_margin)
    detail = (f"; largest margin {widest.flip_margin:.3g} against its bound {widest.bound:.3g}" if widest.bound is not ABSENT else "")
    return [Finding("near-tie-flip", Status.PASS,
        f"{len(near)} teacher-forced top-1 flip(s) at near-ties (reference margin within what the position's rounding noise "
        f"produces){detail}", names.LOGITS)]
