"""Compare two captures (and optionally an FP32 truth) into the comparison document, comparison.json.

The document's schema is the typed precision.contract.comparison.Comparison (published as
docs/schema/precision-check-comparison.schema.json, every field's definition included): per prompt, every site's
element-wise metrics and the truth's errors, the logits position by position with every top-1 flip classified
near-tie or real; per site, the figures pooled over prompts:
pooled relative L2 = sqrt(sum_p ||a_p - e_p||^2) / sqrt(sum_p ||e_p||^2).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from typing import Any

import numpy as np

from precision import names
from precision.analysis.alignment import check_comparable
from precision.analysis.compare_jobs import in_order, logits_block_job, site_job
from precision.analysis.near_tie import classify_flips
from precision.capture import sites as site_names
from precision.capture.arrays import TensorFile
from precision.capture.reader import CaptureReader, PromptRecord
from precision.contract.comparison import COMPARISON_FORMAT, COMPARISON_VERSION
from precision.environment import utc_now
from precision.errors import PrecisionError
from precision.metrics import CONVENTIONS, DEFINITIONS, token_agreement
from precision.metrics.logits import concat
from precision.metrics.tensor import ULP_BUCKETS, StreamingStats

log = logging.getLogger(__name__)
DEFAULT_CONVENTION = CONVENTIONS[0]
SCHEMA_VERSION, FORMAT_NAME = COMPARISON_VERSION, COMPARISON_FORMAT


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator with 0/0 = 1 (both exact) and x/0 = inf."""
    if denominator == 0.0:
        return 1.0 if numerator == 0.0 else math.inf
    return numerator / denominator


def describe_capture(reader: CaptureReader | None) -> dict | None:
    if reader is None:
        return None
    backend = reader.manifest["backend"]
    return {
        "path": str(reader.path.resolve()),
        "backend": backend.get("spec"),
        "engine": backend.get("engine"),
        "dtype": backend.get("dtype"),
        "device": backend.get("device"),
        "manifest_sha256": reader.manifest_sha256(),
    }


def compare_captures(expected: CaptureReader, actual: CaptureReader, *, truth: CaptureReader | None = None,
                     verify: bool = True, show_progress: bool = False, prompt_ids: list[str] | None = None,
                     metric_convention: str = DEFAULT_CONVENTION) -> dict:
    """The comparison document of ``actual`` against ``expected`` (see the module docstring).

    ``prompt_ids`` restricts the comparison to those prompts (each capture must hold them all); otherwise both
    captures must hold the same prompts. ``metric_convention`` "msprobe" computes the target-versus-reference
    Cosine, EucDist, MaxAbsErr, MaxRelativeErr and Err Ratios exactly as msprobe's compare does (see
    precision.metrics.msprobe); the truth comparisons, R and the verdict's relative L2 are the same in both."""
    from tqdm import tqdm

    if metric_convention not in CONVENTIONS:
        raise PrecisionError(f"metric convention {metric_convention!r} is not one of {', '.join(CONVENTIONS)}")
    check_comparable(expected, actual, prompt_ids=prompt_ids)
    if truth is not None:
        check_comparable(expected, truth, role="truth", prompt_ids=prompt_ids)
    e_records, a_records = expected.records(prompt_ids), actual.records(prompt_ids)
    t_records = truth.records(prompt_ids) if truth is not None else [None] * len(e_records)
    prompts = []
    for e, a, t in tqdm(list(zip(e_records, a_records, t_records)), desc="compare", unit="prompt", disable=not show_progress):
        prompts.append(_compare_prompt(expected, actual, truth, e, a, t, verify=verify, convention=metric_convention))
    _classify_run_flips(prompts, expected, actual)
    return {
        "schema_version": SCHEMA_VERSION,
        "format": FORMAT_NAME,
        "created_at": utc_now(),
        "expected": describe_capture(expected),
        "actual": describe_capture(actual),
        "truth": describe_capture(truth),
        "num_layers": expected.num_layers,
        "metric_convention": metric_convention,
        "skipped_prompts": expected.manifest.get("skipped", []),
        "definitions": DEFINITIONS,
        "prompts": prompts,
        "sites": pool_sites(prompts),
    }


def _classify_run_flips(prompts: list[dict], expected: CaptureReader, actual: CaptureReader) -> None:
    """Near-tie or real, for every flip of the run at once: the false-alarm rate is held over all positions
    compared in the run (see precision.analysis.near_tie)."""
    logits = [p[names.LOGITS] for p in prompts if names.LOGITS in p]
    compared = sum(sum(1 for kl in lg["per_position"][names.KL] if math.isfinite(kl)) for lg in logits)
    flips = [flip for lg in logits for flip in lg["flips"]]
    classify_flips(flips, compared, reference_dtype=expected.manifest["backend"].get("dtype"),
                   target_dtype=actual.manifest["backend"].get("dtype"))


def _compare_prompt(expected: CaptureReader, actual: CaptureReader, truth: CaptureReader | None,
                    e_rec: PromptRecord, a_rec: PromptRecord, t_rec: PromptRecord | None, *, verify: bool,
                    convention: str = DEFAULT_CONVENTION) -> dict:
    agreement = token_agreement(e_rec.generated_ids, a_rec.generated_ids)
    result: dict[str, Any] = {
        "id": e_rec.id,
        "category": e_rec.category,
        "prompt_tokens": len(e_rec.prompt_ids),
        "forced_tokens": len(e_rec.forced_ids),
        "tokens": {"expected_generated": list(e_rec.generated_ids), "actual_generated": list(a_rec.generated_ids), **asdict(agreement)},
        "sites": [],
    }
    eh, ah = expected.arrays(e_rec, verify=verify), actual.arrays(a_rec, verify=verify)
    th = truth.arrays(t_rec, verify=verify) if truth is not None else None
    positions = eh.array(site_names.POSITIONS).tolist()
    result["positions"] = len(positions)
    hidden = [site for site in e_rec.sites if site != site_names.LOGITS]
    hidden_stats = dict(zip(hidden, in_order(site_job, ((eh, ah, th, site, convention) for site in hidden))))
    for site in e_rec.sites:
        if site == site_names.LOGITS:
            result[names.LOGITS], pair, truth_pairs = _compare_logits(eh, ah, th, positions, convention)
        else:
            pair, truth_pairs = hidden_stats[site]
        entry = {"site": site, "layer": site_names.layer_index(site), "metrics": _stats_json(pair), "truth": None}
        if truth_pairs is not None:
            e_err, a_err = truth_pairs
            entry["truth"] = {
                names.EXPECTED_VS_TRUTH: e_err.relative_l2,
                names.ACTUAL_VS_TRUTH: a_err.relative_l2,
                "R": ratio(a_err.relative_l2, e_err.relative_l2),
                "truth_l2": e_err.expected_l2,
            }
        result["sites"].append(entry)
    return result


def _stats_json(stats) -> dict:
    data = asdict(stats)
    nf = data.pop(names.NON_FINITE)
    for key in [k for k in nf if k.endswith("first_index")]:  # [row, column] lists, as they read back from JSON
        nf[key] = list(nf[key]) if nf[key] is not None else None
    data[names.NON_FINITE] = nf
    return data


_LOGITS_BLOCK_ELEMENTS = 4 << 20
"""Logits are read in blocks of rows of about this many elements (16 MB in float32 per side), so memory does not
grow with positions x vocabulary (2048 x 166144 would be 1.4 GB per side in float32)."""


def _compare_logits(eh: TensorFile, ah: TensorFile, th: TensorFile | None, positions: list[int], convention: str = DEFAULT_CONVENTION):
    """One pass over the logits rows, block by block on the worker threads: per-position metrics, element-wise
    metrics, and the truth's."""
    shape = eh.shape(site_names.LOGITS)
    rows_per_block = max(1, _LOGITS_BLOCK_ELEMENTS // max(shape[1], 1))
    pair = StreamingStats(shape, convention)
    truth_streams = (StreamingStats(shape), StreamingStats(shape)) if th is not None else None
    parts = []
    blocks = [(eh, ah, site_names.LOGITS, start, min(start + rows_per_block, shape[0]), convention, th is not None)
              for start in range(0, shape[0], rows_per_block)]
    for (sums, part, e, a), (_, _, _, start, stop, _, _) in zip(in_order(logits_block_job, blocks), blocks):
        if sums is not None:
            pair.add_sums(sums, (stop - start) * shape[1])
        else:
            pair.add(e, a)
        parts.append(part)
        if truth_streams is not None:
            t = th.rows(site_names.LOGITS, start, stop)
            truth_streams[0].add(t, e)
            truth_streams[1].add(t, a)
    stats = concat(parts)
    flips = []
    for row in np.flatnonzero(stats.finite_rows & ~stats.top1_agree):
        flips.append({
            "position": positions[row],
            "expected_token": int(stats.expected_top1[row]),
            "actual_token": int(stats.actual_top1[row]),
            names.EXPECTED_MARGIN: float(stats.expected_margin[row]),
            "flip_margin": float(stats.flip_margin[row]),
            "other_rms": float(stats.other_rms[row]),
            "flip_scale": float(stats.flip_scale[row]),
            "logit_noise": float(stats.max_abs[row]),
        })  # near_tie and its bound are set once the whole run is compared (_classify_run_flips)
    finite = stats.finite_rows
    kl = stats.kl[finite]
    summary = {
        names.KL_MEAN: float(kl.mean()) if kl.size else math.nan,
        "kl_max": float(kl.max()) if kl.size else math.nan,
        names.TOP1_AGREEMENT: float(stats.top1_agree[finite].mean()) if finite.any() else math.nan,
        "top5_overlap_mean": float(stats.top5_overlap[finite].mean()) if finite.any() else math.nan,
        "positions": positions,
        "per_position": {
            names.KL: stats.kl.tolist(),
            names.TOP1_AGREE: stats.top1_agree.tolist(),
            names.TOP5_OVERLAP: stats.top5_overlap.tolist(),
            names.EXPECTED_MARGIN: stats.expected_margin.tolist(),
            names.MAX_ABS: stats.max_abs.tolist(),
        },
        "flips": flips,
        "non_finite_positions": [positions[r] for r in np.flatnonzero(~finite)],
    }
    truth_pairs = tuple(s.result() for s in truth_streams) if truth_streams is not None else None
    return summary, pair.result(), truth_pairs


def pool_sites(prompts: list[dict]) -> list[dict]:
    """Per-site figures pooled over prompts (weights: each prompt's elements and norms). max_abs and cosine_min
    are NaN when any prompt's value is (``undefined_prompts`` counts those prompts); relative L2 is Inf when any
    prompt's is not finite."""
    pooled: dict[str, dict] = {}
    for prompt in prompts:
        for entry in prompt["sites"]:
            m = entry["metrics"]
            acc = pooled.setdefault(entry["site"], {"site": entry["site"], "layer": entry["layer"], "e2": 0.0, "d2": 0.0, names.MAX_ABS: 0.0,
                                                    names.COSINE_MIN: 1.0, "ulp": dict.fromkeys(ULP_BUCKETS, 0.0), "n": 0,
                                                    "t2": 0.0, "te2": 0.0, "ta2": 0.0, "has_truth": entry["truth"] is not None, names.NON_FINITE: 0,
                                                    "undefined_prompts": 0})
            acc["e2"] += m["expected_l2"] ** 2
            acc["d2"] += (m[names.RELATIVE_L2] * m["expected_l2"]) ** 2 if math.isfinite(m[names.RELATIVE_L2]) else math.inf
            # NaN propagates: a prompt whose cosine or max |a-e| is undefined (an all-zero side, no finite element)
            # makes the pooled value undefined, and undefined_prompts counts them, instead of pooling the others.
            acc[names.MAX_ABS] = max(acc[names.MAX_ABS], m[names.MAX_ABS]) if not math.isnan(m[names.MAX_ABS]) else math.nan
            acc[names.COSINE_MIN] = min(acc[names.COSINE_MIN], m[names.COSINE]) if not math.isnan(m[names.COSINE]) else math.nan
            acc["undefined_prompts"] += math.isnan(m[names.MAX_ABS]) or math.isnan(m[names.COSINE])
            nf = m[names.NON_FINITE]
            acc[names.NON_FINITE] += nf["expected_nan"] + nf["expected_inf"] + nf["actual_nan"] + nf["actual_inf"]
            for bucket in ULP_BUCKETS:
                share = m[names.ULP_SHARES].get(bucket, math.nan)  # comparisons written before a bucket existed lack it
                if math.isfinite(share):
                    acc["ulp"][bucket] += share * m["elements"]
            acc["n"] += m["elements"]
            if entry["truth"] is not None:
                t = entry["truth"]
                acc["t2"] += t["truth_l2"] ** 2
                acc["te2"] += (t[names.EXPECTED_VS_TRUTH] * t["truth_l2"]) ** 2
                acc["ta2"] += (t[names.ACTUAL_VS_TRUTH] * t["truth_l2"]) ** 2
    result = []
    for site in site_names.site_order(list(pooled)):
        acc = pooled[site]
        row = {
            "site": site,
            "layer": acc["layer"],
            names.RELATIVE_L2: ratio(math.sqrt(acc["d2"]), math.sqrt(acc["e2"])),
            names.MAX_ABS: acc[names.MAX_ABS],
            names.COSINE_MIN: acc[names.COSINE_MIN],
            names.ULP_SHARES: {b: (v / acc["n"] if acc["n"] else math.nan) for b, v in acc["ulp"].items()},
            names.NON_FINITE: acc[names.NON_FINITE],
            "undefined_prompts": acc["undefined_prompts"],
            names.EXPECTED_VS_TRUTH: None,
            names.ACTUAL_VS_TRUTH: None,
            "R": None,
        }
        if acc["has_truth"]:
            e_err = ratio(math.sqrt(acc["te2"]), math.sqrt(acc["t2"]))
            a_err = ratio(math.sqrt(acc["ta2"]), math.sqrt(acc["t2"]))
            row.update(expected_vs_truth=e_err, actual_vs_truth=a_err, R=ratio(a_err, e_err))
        result.append(row)
    return result
