"""Build-to-build comparison: two runs against the same reference (a baseline build and a candidate build).

Rows are paired by NAME, (prompt id, site, metric), never by position: a reordered prompt set or site list still
pairs, and a row the baseline measured that the candidate lacks (a missing prompt or site, a candidate made with
--no-replay or --truth none against a baseline with them) is a failure that names the row, never a silent skip.
Rows the candidate has and the baseline lacks are listed as not compared.

Compared metrics (``METRICS``), each with the allowance of its kind. With b the baseline's value and c the
candidate's, a lower-is-better metric got worse when

    c > b * (1 + relative_tolerance) + noise(kind)

and top-1 agreement when c < b - top1_drop. A NaN candidate value where the baseline's was not NaN, and an Inf
where the baseline's was finite, are worse whatever the allowance; a baseline NaN compared with a finite candidate
value is not. The target's own NaN/Inf count per (prompt, site) is a row: any increase is worse (no allowance).

Noise allowances, per kind, from the BASELINE's own measurements (the candidate's noise must not widen the gate it
is judged by). delta is the baseline's run-to-run spread: the largest relative L2 between repeated target runs on
the same inputs (analysis.determinism.max_relative_l2; 0 for a deterministic engine, and 0 with a note when the
baseline ran with --repeats 1). Each formula is first order in delta:

    relative error   noise_factor * delta
      (relative_l2, target_vs_truth, local_error.) A rerun that moves the target by delta (relative L2) moves its
      relative L2 to any fixed tensor by at most delta: the triangle inequality.
    R                noise_factor * delta / err(reference, truth)                        site R
                     noise_factor * delta * (1 + local_R_b) / local_b                    local R
      R = err(target, truth) / err(reference, truth); the denominator is the shared reference's, so only the
      numerator moves, by at most delta. For local R the denominator D = |ref16(x) - ref32(x)| is not stored;
      the triangle inequality gives local <= (local_R + 1) * D, hence D >= local / (1 + local_R) and the bound.
    KL               KL_b * ((1 + noise_factor * delta / r_b)**2 - 1),  r_b the baseline's logits relative L2
      To second order KL(p_e || p_a) = 1/2 Var_pe(a - e), so sqrt(KL) is a seminorm of the logit difference and
      obeys the triangle inequality. A perturbation of relative size delta is taken to cost KL in the same
      proportion as the baseline's own difference (KL_b per r_b squared); the bound follows. Never
      relative-L2 units added to KL.
    local gain       envelope_factor * envelope_gain_max_b
      |local gain| measures a systematic error along a layer's update; rerun noise, uncorrelated with the
      update, does not move it, so its spread is that of legitimate implementation choices: the largest |gain|
      of any envelope member at that step (analysis.local.steps[].envelope_gain_max). 0 without an envelope.
    top-1 agreement  top1_drop (an absolute share of positions).
    non-finite count 0.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

from precision import names
from precision.contract import ContractError
from precision.contract.comparison import COMPARISON_FORMAT
from precision.contract.results import REGRESSION_FORMAT, REGRESSION_VERSION, SUMMARY_FORMAT
from precision.errors import MismatchedCapturesError, PrecisionError
from precision.io import read_result_json

RELATIVE_ERROR, R_KIND, KL_KIND, GAIN_KIND, TOP1_KIND, NON_FINITE_KIND = "relative error", "R", "KL", "local gain", "top-1", "non-finite"

METRICS: dict[str, str] = {
    names.RELATIVE_L2: RELATIVE_ERROR,      # ‖a−e‖/‖e‖ per (prompt, site)
    "target_vs_truth": RELATIVE_ERROR,  # ‖a−t‖/‖t‖ per (prompt, site), t the FP32 truth
    "R": R_KIND,                        # err(a, t) / err(e, t) per (prompt, site)
    "target_non_finite": NON_FINITE_KIND,  # NaN + Inf count in the target per (prompt, site)
    "local_error": RELATIVE_ERROR,      # per replayed step, pooled over prompts (precision.analysis.replay)
    "local_R": R_KIND,                  # per replayed step, pooled over prompts
    "local_gain_abs": GAIN_KIND,        # |local gain| per replayed step with an update
    "logits_kl_mean": KL_KIND,          # mean KL over teacher-forced positions, per prompt
    names.TOP1_AGREEMENT: TOP1_KIND,        # share of teacher-forced positions with equal argmax, per prompt
}
"""Every compared metric and its kind (which allowance applies). Order: the order of rows at one site."""


@dataclass(frozen=True)
class RegressTolerance:
    relative_tolerance: float = 0.10
    """Every lower-is-better metric may grow by this share of the baseline's value."""
    noise_factor: float = 3.0
    """Multiplies the baseline's run-to-run spread in the relative-error, R and KL allowances."""
    envelope_factor: float = 1.0
    """Multiplies the baseline's largest envelope |local gain| at a step in the local-gain allowance."""
    top1_drop: float = 0.01
    """Top-1 agreement may drop by this much (absolute share) before it counts as worse."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not math.isfinite(value) or value < 0:
                raise PrecisionError(f"[regress] {f.name} = {value}: a tolerance must be a finite number >= 0")
        if self.top1_drop > 1:
            raise PrecisionError(f"[regress] top1_drop = {self.top1_drop}: a share of positions, between 0 and 1")

    @classmethod
    def from_mapping(cls, values: dict) -> "RegressTolerance":
        from precision.config import from_mapping

        return from_mapping(cls, values, "[regress]")


RowKey = tuple  # (prompt id or None for pooled over prompts, site, metric)


class _Malformed(Exception):
    """Raised inside extraction; turned into a PrecisionError naming the file."""


def _number(value, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Malformed(f"{where} is {value!r}, not a number")
    return float(value)


def _mapping(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise _Malformed(f"{where} is {type(value).__name__}, not an object")
    return value


def _listing(value, where: str) -> list:
    if not isinstance(value, list):
        raise _Malformed(f"{where} is {type(value).__name__}, not a list")
    return value


def _read(path: Path, expected_format: str, what: str) -> dict:
    fix = f"pass the --out directory of a finished 'precision-check run' (it holds {what})"
    if not path.is_file():
        raise PrecisionError(f"{path} is missing: {path.parent} is not a finished run directory; {fix}")
    try:
        data = read_result_json(path, expected_format)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise PrecisionError(f"{path} cannot be read as JSON ({exc}); {fix}") from exc
    except ContractError as exc:
        raise PrecisionError(f"{exc}; {fix}") from None
    if not isinstance(data, dict) or data.get("format") != expected_format:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise PrecisionError(f"{path} is not a {expected_format} document (format {found!r}); {fix}")
    return data


def _load(run_dir: Path) -> tuple[dict, dict]:
    if not run_dir.is_dir():
        raise PrecisionError(f"{run_dir} is not a directory; pass the --out directory of a finished 'precision-check run'")
    comparison = _read(run_dir / "comparison.json", COMPARISON_FORMAT, "comparison.json")
    summary_path = run_dir / "summary.json"
    summary = _read(summary_path, SUMMARY_FORMAT, "summary.json")
    verdict = summary.get("verdict")
    if not isinstance(verdict, dict) or verdict.get("status") not in ("PASS", "WARN", "FAIL") or not isinstance(verdict.get("summary"), str):
        raise PrecisionError(f"{summary_path} has no valid verdict (a 'verdict' object with status PASS/WARN/FAIL and a summary); "
                             f"regenerate it with 'precision-check report {run_dir}'")
    return comparison, summary


def _extract(comparison: dict) -> tuple[dict[RowKey, dict], list[str], dict]:
    """Measured values by row key, the site order, and the run facts the allowances use."""
    rows: dict[RowKey, dict] = {}
    for name in ("expected", "actual"):
        _mapping(comparison.get(name), name)
        if not isinstance(comparison[name].get("manifest_sha256"), str):
            raise _Malformed(f"{name}.manifest_sha256 is missing")
    site_order = [_mapping(s, "sites[]").get("site") for s in _listing(comparison.get("sites"), "sites")]

    def put(key: RowKey, value, **context) -> None:
        if value is None:
            return  # not measured in this run (no truth, no replay, a step without an update)
        if key in rows:
            raise _Malformed(f"two entries for prompt {key[0]!r}, site {key[1]!r}")
        rows[key] = {"value": value, **context}

    for p_index, prompt in enumerate(_listing(comparison.get("prompts"), "prompts")):
        where = f"prompts[{p_index}]"
        prompt = _mapping(prompt, where)
        pid = prompt.get("id")
        if not isinstance(pid, str):
            raise _Malformed(f"{where}.id is {pid!r}, not a prompt id")
        logits_error = None
        for s_index, entry in enumerate(_listing(prompt.get("sites"), f"{where}.sites")):
            at = f"{where}.sites[{s_index}]"
            site = _mapping(entry, at).get("site")
            if not isinstance(site, str):
                raise _Malformed(f"{at}.site is {site!r}")
            metrics = _mapping(entry.get("metrics"), f"{at}.metrics")
            relative = _number(metrics.get(names.RELATIVE_L2), f"{at}.metrics.relative_l2")
            if site == names.LOGITS:
                logits_error = relative
            put((pid, site, names.RELATIVE_L2), relative)
            nf = _mapping(metrics.get(names.NON_FINITE), f"{at}.metrics.non_finite")
            put((pid, site, "target_non_finite"), (_number(nf.get("actual_nan"), f"{at}.actual_nan") or 0.0) + (_number(nf.get("actual_inf"), f"{at}.actual_inf") or 0.0))
            truth = entry.get("truth")
            if truth is not None:
                truth = _mapping(truth, f"{at}.truth")
                put((pid, site, "target_vs_truth"), _number(truth.get(names.ACTUAL_VS_TRUTH), f"{at}.truth.actual_vs_truth"))
                put((pid, site, "R"), _number(truth.get("R"), f"{at}.truth.R"),
                    reference_vs_truth=_number(truth.get(names.EXPECTED_VS_TRUTH), f"{at}.truth.expected_vs_truth"))
        logits = prompt.get(names.LOGITS)
        if logits is not None:
            logits = _mapping(logits, f"{where}.logits")
            put((pid, names.LOGITS, "logits_kl_mean"), _number(logits.get(names.KL_MEAN), f"{where}.logits.kl_mean"), logits_relative_l2=logits_error)
            put((pid, names.LOGITS, names.TOP1_AGREEMENT), _number(logits.get(names.TOP1_AGREEMENT), f"{where}.logits.top1_agreement"))

    analysis = _mapping(comparison.get("analysis") or {}, "analysis")
    local = _mapping(analysis.get("local") or {}, "analysis.local")
    for index, step in enumerate(_listing(local.get("steps") or [], "analysis.local.steps")):
        at = f"analysis.local.steps[{index}]"
        step = _mapping(step, at)
        site = step.get("site")
        if not isinstance(site, str):
            raise _Malformed(f"{at}.site is {site!r}")
        local_error = _number(step.get("local"), f"{at}.local")
        local_r = _number(step.get("local_R"), f"{at}.local_R")
        gain = _number(step.get(names.LOCAL_GAIN), f"{at}.local_gain")
        put((None, site, "local_error"), local_error)
        put((None, site, "local_R"), local_r, local_error=local_error)
        put((None, site, "local_gain_abs"), None if gain is None else abs(gain),
            envelope_gain_max=_number(step.get("envelope_gain_max"), f"{at}.envelope_gain_max"))
    determinism = analysis.get("determinism")
    spread = None if determinism is None else _number(_mapping(determinism, "analysis.determinism").get("max_relative_l2"),
                                                       "analysis.determinism.max_relative_l2")
    facts = {"run_to_run": spread, "local_reason": local.get("reason")}
    return rows, site_order, facts


def _extract_or_explain(comparison: dict, path: Path) -> tuple[dict[RowKey, dict], list[str], dict]:
    try:
        return _extract(comparison)
    except _Malformed as exc:
        raise PrecisionError(f"{path} is not a comparison written by precision-check ({exc}); pass the --out directory of a finished "
                             f"'precision-check run', or rebuild it with 'precision-check compare'") from exc


def _ratio_or_zero(numerator: float, denominator: float | None) -> float:
    """numerator / denominator, 0 when there is no noise to scale or no finite positive scale to divide by."""
    if numerator == 0 or denominator is None or not math.isfinite(denominator) or denominator <= 0:
        return 0.0
    return numerator / denominator


def noise_allowance(metric: str, baseline: dict, spread: float, tolerance: RegressTolerance) -> float:
    """The absolute amount the candidate may exceed the baseline's value by, beyond the relative tolerance
    (or, for top-1 agreement, drop below it). The derivations are in the module docstring."""
    kind = METRICS[metric]
    delta = tolerance.noise_factor * spread
    if kind == RELATIVE_ERROR:
        return delta
    if kind == R_KIND and metric == "R":
        return _ratio_or_zero(delta, baseline.get("reference_vs_truth"))
    if kind == R_KIND:
        return _ratio_or_zero(delta * (1.0 + baseline["value"]), baseline.get("local_error")) if math.isfinite(baseline["value"]) else 0.0
    if kind == KL_KIND:
        scale = _ratio_or_zero(delta, baseline.get("logits_relative_l2"))
        return baseline["value"] * ((1.0 + scale) ** 2 - 1.0) if math.isfinite(baseline["value"]) else 0.0
    if kind == GAIN_KIND:
        return tolerance.envelope_factor * (baseline.get("envelope_gain_max") or 0.0)
    if kind == TOP1_KIND:
        return tolerance.top1_drop
    return 0.0  # non-finite counts: any new NaN/Inf is worse


def _judge(metric: str, base: dict, cand: float, spread: float, tolerance: RegressTolerance) -> tuple[float, bool]:
    """(limit, worse): the candidate value beyond which it counts as worse, and whether it is."""
    b = base["value"]
    allowance = noise_allowance(metric, base, spread, tolerance)
    if METRICS[metric] == TOP1_KIND:
        limit = b - allowance
        worse = (math.isnan(cand) and not math.isnan(b)) or cand < limit
        return limit, bool(worse)
    if METRICS[metric] == NON_FINITE_KIND:
        return b, cand > b
    limit = b * (1.0 + tolerance.relative_tolerance) + allowance
    if math.isnan(cand):
        return limit, not math.isnan(b)
    if not math.isfinite(b):
        return limit, False  # nothing finite to be worse than; a NaN candidate was handled above
    return limit, cand > limit


def _change(b: float, c: float) -> float:
    if b == c:
        return 1.0
    return c / b if b else math.inf


def _label(key: RowKey) -> str:
    prompt, site, metric = key
    return f"{metric} at {site}" + ("" if prompt is None else f" of prompt {prompt}")


def regress(baseline_dir: str | Path, candidate_dir: str | Path, tolerance: RegressTolerance | None = None) -> dict:
    tolerance = tolerance or RegressTolerance()
    baseline_dir, candidate_dir = Path(baseline_dir), Path(candidate_dir)
    base, base_summary = _load(baseline_dir)
    cand, cand_summary = _load(candidate_dir)
    base_rows, site_order, base_facts = _extract_or_explain(base, baseline_dir / "comparison.json")
    cand_rows, cand_sites, cand_facts = _extract_or_explain(cand, candidate_dir / "comparison.json")
    for side in ("expected", "truth"):
        b_sha = (base.get(side) or {}).get("manifest_sha256")
        c_sha = (cand.get(side) or {}).get("manifest_sha256")
        if b_sha and c_sha and b_sha != c_sha:
            what = "references" if side == "expected" else "FP32 truths"
            raise MismatchedCapturesError(
                f"{baseline_dir} and {candidate_dir} were measured against different {what} ({side} manifests {b_sha[:12]}… and "
                f"{c_sha[:12]}…); run both with the same --reference STORE")
    spread = base_facts["run_to_run"]
    noise = 0.0 if spread is None or not math.isfinite(spread) else spread

    site_rank = {site: i for i, site in enumerate(site_order + [s for s in cand_sites if s not in site_order])}
    prompt_rank = {pid: i for i, pid in enumerate(dict.fromkeys(k[0] for k in base_rows if k[0] is not None))}
    metric_rank = {m: i for i, m in enumerate(METRICS)}

    def order(key: RowKey) -> tuple:
        prompt, site, metric = key
        return (site_rank.get(site, len(site_rank)), prompt is not None, prompt_rank.get(prompt, -1), metric_rank[metric])

    rows = []
    for key in sorted(base_rows, key=order):
        prompt, site, metric = key
        b = base_rows[key]
        row = {"prompt": prompt, "site": site, "scope": site, "metric": metric, "kind": METRICS[metric], "baseline": b["value"]}
        if key not in cand_rows:
            rows.append({**row, "candidate": None, "limit": None, "change": None, "worse": True, "missing": True})
            continue
        c = cand_rows[key]["value"]
        limit, worse = _judge(metric, b, c, noise, tolerance)
        rows.append({**row, "candidate": c, "limit": limit, "change": _change(b["value"], c), "worse": worse, "missing": False})
    not_compared = [{"prompt": k[0], "site": k[1], "metric": k[2]} for k in sorted(set(cand_rows) - set(base_rows), key=order)]

    missing = [r for r in rows if r["missing"]]
    worse = [r for r in rows if r["worse"] and not r["missing"]]
    candidate_failed = cand_summary["verdict"]["status"] == "FAIL"
    parts = []
    if missing:
        names = ", ".join(_label((r["prompt"], r["site"], r["metric"])) for r in missing[:8])
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        why = f" (the candidate's replay: {cand_facts['local_reason']})" if any(r["metric"].startswith("local") for r in missing) and cand_facts["local_reason"] else ""
        parts.append(f"the candidate lacks {len(missing)} row(s) the baseline measured: {names}{more}{why}")
    if worse:
        first = worse[0]
        parts.append(f"{len(worse)} metric(s) got worse beyond their allowance; first: {_label((first['prompt'], first['site'], first['metric']))} "
                     f"{first['baseline']:.3e} -> {first['candidate']:.3e} (limit {first['limit']:.3e})")
    if candidate_failed:
        parts.append(f"the candidate's own verdict failed: {cand_summary['verdict']['summary']}")
    if not parts:
        parts.append(f"{len(rows)} metric(s) compared by (prompt, site) name; none got worse than the baseline beyond its allowance")
    status = "FAIL" if missing or worse or candidate_failed else "PASS"
    first_bad = next((r for r in rows if r["worse"]), None)
    return {
        "schema_version": REGRESSION_VERSION,
        "format": REGRESSION_FORMAT,
        "baseline": {"run": str(baseline_dir.resolve()), "target": base["actual"].get("backend"), "verdict": base_summary["verdict"]["status"]},
        "candidate": {"run": str(candidate_dir.resolve()), "target": cand["actual"].get("backend"), "verdict": cand_summary["verdict"]["status"]},
        "tolerance": {f.name: getattr(tolerance, f.name) for f in fields(tolerance)},
        "run_to_run_noise": noise,
        "run_to_run_measured": spread is not None,
        "status": status,
        "message": "; ".join(parts),
        "first_worse_scope": first_bad["site"] if first_bad else None,
        "first_worse": None if first_bad is None else {"prompt": first_bad["prompt"], "site": first_bad["site"], "metric": first_bad["metric"]},
        "missing": [{"prompt": r["prompt"], "site": r["site"], "metric": r["metric"]} for r in missing],
        "not_compared": not_compared,
        "rows": rows,
    }

