"""Build-to-build comparison: two runs against the same reference (a baseline build and a candidate build).

For every site and replayed step, and every prompt's logits, a metric "got worse" when

    candidate > baseline * (1 + relative_tolerance) + noise_factor * run_to_run_noise

where run_to_run_noise is the largest run-to-run relative L2 either run measured by repeating itself on the same
inputs (0 for deterministic engines). Lower-is-better metrics: relative L2 to the reference, error to FP32 truth,
R, local error, local R, |local gain|, logits KL; top-1 agreement is higher-is-better.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from precision.errors import MismatchedCapturesError, PrecisionError
from precision.io import read_result_json


@dataclass(frozen=True)
class RegressTolerance:
    relative_tolerance: float = 0.10
    noise_factor: float = 3.0
    top1_drop: float = 0.01
    """Top-1 agreement may drop by this much (absolute share) before it counts as worse."""

    @classmethod
    def from_mapping(cls, values: dict) -> "RegressTolerance":
        from precision.config import from_mapping

        return from_mapping(cls, values, "[regress]")


def _load(run_dir: Path) -> tuple[dict, dict]:
    try:
        comparison = read_result_json(run_dir / "comparison.json")
        summary = read_result_json(run_dir / "summary.json")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PrecisionError(f"{run_dir} is not a finished run directory ({exc}); pass two --out directories of 'precision-check run'") from exc
    return comparison, summary


def _noise(comparison: dict) -> float:
    determinism = (comparison.get("analysis") or {}).get("determinism") or {}
    return float(determinism.get("max_relative_l2") or 0.0)


def regress(baseline_dir: str | Path, candidate_dir: str | Path, tolerance: RegressTolerance | None = None) -> dict:
    tolerance = tolerance or RegressTolerance()
    base, base_summary = _load(Path(baseline_dir))
    cand, cand_summary = _load(Path(candidate_dir))
    if base["expected"]["manifest_sha256"] != cand["expected"]["manifest_sha256"]:
        raise MismatchedCapturesError(
            f"{baseline_dir} and {candidate_dir} were measured against different references (reference manifests "
            f"{base['expected']['manifest_sha256'][:12]}… and {cand['expected']['manifest_sha256'][:12]}…); run both with the same --reference STORE")
    noise = max(_noise(base), _noise(cand))
    allowance = lambda b: b * (1.0 + tolerance.relative_tolerance) + tolerance.noise_factor * noise  # noqa: E731
    rows = []

    def add(scope: str, metric: str, b: float | None, c: float | None, higher_is_better: bool = False) -> None:
        if b is None or c is None:
            return
        worse = (c < b - tolerance.top1_drop) if higher_is_better else (c > allowance(b))
        rows.append({"scope": scope, "metric": metric, "baseline": b, "candidate": c,
                     "change": (c / b if b else (1.0 if c == b else float("inf"))), "worse": bool(worse)})

    for b_site, c_site in zip(base["sites"], cand["sites"]):
        add(b_site["site"], "relative_l2", b_site["relative_l2"], c_site["relative_l2"])
        add(b_site["site"], "target_vs_truth", b_site.get("actual_vs_truth"), c_site.get("actual_vs_truth"))
    b_steps = (base.get("analysis") or {}).get("local", {}).get("steps", [])
    c_steps = (cand.get("analysis") or {}).get("local", {}).get("steps", [])
    for b_step, c_step in zip(b_steps, c_steps):
        add(b_step["site"], "local_error", b_step["local"], c_step["local"])
        add(b_step["site"], "local_R", b_step["local_R"], c_step["local_R"])
    for b_prompt, c_prompt in zip(base["prompts"], cand["prompts"]):
        b_logits, c_logits = b_prompt.get("logits", {}), c_prompt.get("logits", {})
        add(f"prompt {b_prompt['id']}", "logits_kl_mean", b_logits.get("kl_mean"), c_logits.get("kl_mean"))
        add(f"prompt {b_prompt['id']}", "top1_agreement", b_logits.get("top1_agreement"), c_logits.get("top1_agreement"), higher_is_better=True)
    worse = [r for r in rows if r["worse"]]
    candidate_failed = cand_summary["verdict"]["status"] == "FAIL"
    status = "FAIL" if worse or candidate_failed else "PASS"
    first = worse[0] if worse else None
    if first:
        message = (f"{len(worse)} metric(s) got worse beyond tolerance; first: {first['metric']} at {first['scope']} "
                   f"{first['baseline']:.3e} -> {first['candidate']:.3e} ({first['change']:.2f}x)")
    elif candidate_failed:
        message = f"no metric got worse than the baseline, but the candidate's own verdict failed: {cand_summary['verdict']['summary']}"
    else:
        message = f"no metric got worse than the baseline beyond {tolerance.relative_tolerance:.0%} + {tolerance.noise_factor:g}x run-to-run noise ({noise:.1e})"
    return {
        "schema_version": 1,
        "format": "precision-check-regression",
        "baseline": {"run": str(Path(baseline_dir).resolve()), "target": base["actual"]["backend"], "verdict": base_summary["verdict"]["status"]},
        "candidate": {"run": str(Path(candidate_dir).resolve()), "target": cand["actual"]["backend"], "verdict": cand_summary["verdict"]["status"]},
        "tolerance": {f.name: getattr(tolerance, f.name) for f in fields(tolerance)},
        "run_to_run_noise": noise,
        "status": status,
        "message": message,
        "first_worse_scope": first["scope"] if first else None,
        "rows": rows,
    }
