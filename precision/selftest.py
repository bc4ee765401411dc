"""Proof by planted faults: the analysis must pass a harmless change and fail real bugs at the right layer.

Cases (all transformers on CPU in the reference dtype, identical to the reference except for the change):
    reordered reduction      every matrix product sums in another order           must PASS
    bf16 accumulation        one layer's matrix products accumulate in BF16       must FAIL naming that layer
    scaled weight            one layer's MLP down-projection weight x (1 + 1e-2)   must FAIL naming that layer
    NaN                      a NaN written into one layer's output at a position   must FAIL and locate it
Sensitivity: the weight scale is swept down (1e-2, 3e-3, 1e-3, 3e-4, 1e-4) to find the smallest scaling still
failed at the right layer, and BF16 accumulation is planted in every layer in turn.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from precision.analysis.verdict import Status, Thresholds, Verdict
from precision.backends import BackendOptions
from precision.io import prepare_output_dir
from precision.pipeline import RunConfig, capture_cpu_side, capture_role, compare_and_report, resolve_model
from precision.planning import plan_from_prompts

log = logging.getLogger(__name__)
SCALE_SWEEP = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4)


@dataclass(frozen=True)
class Case:
    name: str
    variants: tuple[str, ...]
    expected: Status
    site: str | None  # the site the verdict must name (None: any / not applicable)
    position: int | None = None
    sweep: str | None = None  # sensitivity sweep this case belongs to


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


def _named(verdict: Verdict) -> tuple[str | None, str | None]:
    """The site and rule of the first failing finding (run-level first: they name the layer that adds error)."""
    findings = list(verdict.findings) + [f for p in verdict.prompts for f in p.findings]
    failing = [f for f in findings if f.status is Status.FAIL]
    chosen = failing[0] if failing else next((f for f in findings if f.status is Status.PASS), None)
    return (chosen.site, chosen.rule) if chosen else (None, None)


def default_cases(num_layers: int, *, sweep: bool = True) -> list[Case]:
    middle = num_layers // 2
    cases = [
        Case("reordered reduction", ("permute-k:7",), Status.PASS, None),
        Case(f"bf16 accumulation in layer {middle}", (f"fault:bf16-accum:{middle}",), Status.FAIL, f"layer.{middle}"),
        Case(f"layer {middle} weight x (1 + 1e-2)", (f"fault:scale-weight:{middle}:1.01",), Status.FAIL, f"layer.{middle}"),
        Case("NaN in layer 1 at position 3", ("fault:nan:1:3",), Status.FAIL, "layer.1", position=3),
    ]
    if sweep:
        cases += [Case(f"layer {middle} weight x (1 + {eps:g})", (f"fault:scale-weight:{middle}:{1 + eps!r}",), Status.FAIL, f"layer.{middle}", sweep="weight scale")
                  for eps in SCALE_SWEEP[1:]]
        cases += [Case(f"bf16 accumulation in layer {i}", (f"fault:bf16-accum:{i}",), Status.FAIL, f"layer.{i}", sweep="bf16 accumulation")
                  for i in range(num_layers) if i != middle]
    return cases


def run_selftest(prompts: Path, out: Path, *, model: Path | None = None, sweep: bool = True, force: bool = False,
                 thresholds: Thresholds | None = None, show_progress: bool = False) -> list[CaseResult]:
    from precision.analysis.replay import Replayer

    info = resolve_model(model)
    config = RunConfig(prompts=prompts, out=out, model=model, force=force, show_progress=show_progress, max_new_tokens=16)
    plan = plan_from_prompts(prompts, info, max_new_tokens=config.max_new_tokens)
    prepare_output_dir(out, force=force, complete_marker="selftest.json")
    cpu = capture_cpu_side(info, plan, out, config)
    reference, truth, members, envelope_ids, following = cpu.reference, cpu.truth, cpu.members, cpu.envelope_prompts, cpu.following
    replayer = Replayer(info.path, reference.dtype)
    results = []
    for index, case in enumerate(default_cases(info.num_layers, sweep=sweep)):
        case_dir = out / "cases" / f"{index:02d}"
        case_dir.mkdir(parents=True, exist_ok=True)
        options = BackendOptions(variants=case.variants)
        target = capture_role(f"../cases/{index:02d}/target", config.reference, info, following, out, config, options=options)
        result = compare_and_report(reference, target, truth, case_dir, members=members, envelope_prompts=envelope_ids,
                                    replayer=replayer, thresholds=thresholds, show_progress=False)
        site, rule = _named(result.verdict)
        ok = result.verdict.status is case.expected and (case.site is None or site == case.site)
        if ok and case.position is not None:
            first = result.comparison["analysis"]["first_non_finite"]
            ok = first is not None and first["site"] == case.site and first["position"] == case.position
        changed = any(row["relative_l2"] != 0.0 for row in result.comparison["sites"]) or result.comparison["analysis"]["first_non_finite"] is not None
        results.append(CaseResult(case, result.verdict, site, rule, ok, changed))
        log.info("%s: %s (%s at %s)", case.name, result.verdict.status.value, rule, site)
    return results


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
    lines["non-finite"] = "a single NaN element is caught and located" if any(r.ok for r in results if "nan" in r.case.variants[0]) else "NOT caught"
    return lines


def all_as_expected(results: list[CaseResult]) -> bool:
    """The four planted faults got their expected verdicts; sweep cases measure sensitivity and are reported."""
    return all(r.ok for r in results if r.case.sweep is None)


def format_table(results: list[CaseResult]) -> str:
    rows = [("case", "expected", "verdict", "named site", "rule", "ok")]
    rows += [(r.case.name, r.case.expected.value, r.verdict.status.value, r.named_site or "-", r.rule or "-",
              "yes" if r.ok else ("no-op" if not r.changed else "NO")) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows)
