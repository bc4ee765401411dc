"""The prompt-logprobs level of detail compared and judged: a configuration that gave only the engine's own
``prompt_logprobs`` top-K (precision.serving.logprob_level) against the eager baseline's full-vocabulary logits.

A row r of a sequence is the distribution of token r+1 (vLLM's prompt position r+1, the logits row r). The engine
returns, per row, its top-K tokens T_r with their logprobs and the logprob of the teacher-forced token x_{r+1}; the
baseline (and the FP32 truth, and every envelope member) has full logits, turned into float64 log_softmax here.
Definitions (float64; the engine's float32 logprobs widened exactly):

- ``topk_logprob_delta[r]`` = max over t in T_r of |lp_conf(t) - lp_base(t)|: the largest logprob difference over
  the tokens the configuration ranks highest (the only ones it reports).
- ``actual_logprob_delta[r]`` = lp_conf(x_{r+1}) - lp_base(x_{r+1}), signed: negative where the configuration
  gives the teacher-forced text less probability than the baseline does.
- ``top1_agree[r]``: the configuration's rank-1 token j has the baseline's largest logprob (a tie for the largest
  counts as agreement: BF16 logits tie often). Otherwise a flip, judged by the near-tie bound of
  precision.analysis.near_tie with the baseline's margin m = lp_base(i) - lp_base(j) (i the baseline's argmax;
  the log-normaliser cancels, so m is the logit margin), flip_scale = max(|logit_i|, |logit_j|) of the baseline,
  and sigma_other estimated from the configuration's other top-K tokens: the RMS about their mean of
  lp_conf(t) - lp_base(t) over T_r without i and j (a logprob difference is the logit difference minus one
  constant per row, the change of the log-normaliser, which the mean removes).
- ``R_topk`` = rms(lp_conf - lp_truth) / rms(lp_base - lp_truth) over every (r, t in T_r): how much farther from
  the FP32 truth the configuration is than the baseline on the same tokens (the logits level's R, here on the
  tokens the engine reports).
- ``envelope_topk_max`` = max over envelope members M and their rows of max over M's own top-K tokens of
  |lp_M(t) - lp_ref(t)|: the same statistic for the implementation variants of the reference, which have full
  logits. ``envelope_ratio`` = max topk_logprob_delta over the envelope's prompts / envelope_topk_max.

Rules (thresholds from precision.analysis.verdict.Thresholds, as at the other levels):
  real-flip      FAIL  a top-1 flip whose baseline margin exceeds the near-tie bound
  near-tie-flip  PASS  flips within the bound (reported)
  r-topk         FAIL  R_topk > r_logits_fail (1.5), per prompt
  envelope       WARN  envelope_ratio > envelope_warn (2) where R_topk >= 1 (not closer to FP32 than the baseline)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from precision.analysis.compare import ratio
from precision.analysis.near_tie import classify_flips
from precision.analysis.verdict import Finding, PromptVerdict, Status, Thresholds, Verdict, worst
from precision.capture.reader import CaptureReader
from precision.names import LOGITS, NEAR_TIE, POSITIONS, TOP1_AGREE, TOP1_AGREEMENT, TOPK_DELTA

ACTUAL_DELTA = "actual_logprob_delta"
R_TOPK = "R_topk"
ENVELOPE_TOPK_MAX = "envelope_topk_max"
LEVEL_SITE = "prompt_logprobs top-K"
"""What the row's "site" names at this level: no layer, the engine's top-K logprobs."""


DEFINITIONS = {
    TOPK_DELTA: "per position, max over the configuration's top-K tokens of |its logprob - the baseline's float64 log_softmax "
                "logprob|; the row shows the largest over every position",
    ACTUAL_DELTA: "per position, the configuration's logprob of the teacher-forced next token minus the baseline's (signed)",
    R_TOPK: "rms over positions and the configuration's top-K tokens of (configuration - FP32 truth logprob) over the same rms "
            "of (baseline - FP32 truth); FAIL above the r_logits_fail threshold",
    ENVELOPE_TOPK_MAX: "the largest top-K logprob difference any implementation variant of the reference makes against the "
                       "reference (each over its own top-K); the configuration's largest over it is the envelope ratio, WARN "
                       "above envelope_warn where R_topk >= 1",
    "top-1 flip": "the configuration's rank-1 token is not the baseline's argmax; real (FAIL) when the baseline's margin exceeds "
                  "the near-tie bound with sigma from the configuration's other top-K tokens",
}
"""The level's metric definitions, as the report and summary.json state them."""


@dataclass(frozen=True)
class ServedLogprobs:
    """One sequence's prompt logprobs as the engine returned them: ``rows`` [R] (logits rows, r = position - 1),
    ``top_ids`` / ``top_logprobs`` [R, K] by rank, ``actual_ids`` / ``actual_logprobs`` [R] (token r+1)."""

    rows: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray
    actual_ids: np.ndarray
    actual_logprobs: np.ndarray

    @classmethod
    def from_record(cls, record: dict, forced_ids: list[int]) -> "ServedLogprobs":
        rows = np.asarray(record["rows"], dtype=np.int64)
        return cls(rows=rows, top_ids=np.asarray(record["top_ids"], dtype=np.int64).reshape(len(rows), -1),
                   top_logprobs=np.asarray(record["top_logprobs"], dtype=np.float64).reshape(len(rows), -1),
                   actual_ids=np.asarray([forced_ids[r + 1] for r in rows], dtype=np.int64),
                   actual_logprobs=np.asarray(record["actual_logprobs"], dtype=np.float64))


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    """float64 log_softmax over the last axis."""
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - np.max(x, axis=-1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def _difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a - b with equal values (both -inf included) 0 and any other non-finite result +inf (the worst)."""
    with np.errstate(invalid="ignore"):
        d = np.where(a == b, 0.0, a - b)
    return np.where(np.isfinite(d), d, np.inf)


def _rms(values: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(values)))) if values.size else math.nan


def position_metrics(baseline_logits: np.ndarray, served: ServedLogprobs) -> dict:
    """Per row: topk_logprob_delta, actual_logprob_delta, top1_agree and the flip figures (module docstring);
    ``baseline_logits`` holds the baseline's logits of ``served.rows``, in that order."""
    base = log_softmax64(baseline_logits)
    rows = np.arange(len(served.rows))
    deltas = _difference(served.top_logprobs, np.take_along_axis(base, served.top_ids, axis=1))
    actual = _difference(served.actual_logprobs, base[rows, served.actual_ids])
    i = np.argmax(base, axis=1)
    j = served.top_ids[:, 0]
    agree = base[rows, j] >= base[rows, i]
    flips = []
    for r in np.flatnonzero(~agree):
        others = (served.top_ids[r] != i[r]) & (served.top_ids[r] != j[r]) & np.isfinite(deltas[r])
        d = deltas[r][others]
        sigma = float(np.sqrt(np.mean(np.square(d - d.mean())))) if d.size >= 2 else math.inf
        e_i, e_j = float(baseline_logits[r, i[r]]), float(baseline_logits[r, j[r]])
        flips.append({"position": int(served.rows[r]), "expected_token": int(i[r]), "actual_token": int(j[r]),
                      "flip_margin": float(base[r, i[r]] - base[r, j[r]]), "other_rms": sigma,
                      "flip_scale": max(abs(e_i), abs(e_j))})
    return {"rows": served.rows.tolist(), TOPK_DELTA: np.max(np.abs(deltas), axis=1), ACTUAL_DELTA: actual,
            TOP1_AGREE: agree, "flips": flips, "deltas": deltas}


def truth_ratio(baseline_logits: np.ndarray, truth_logits: np.ndarray, served: ServedLogprobs) -> tuple[float, float, float]:
    """(R_topk, rms configuration-vs-truth, rms baseline-vs-truth) over every row and the configuration's top-K."""
    truth = np.take_along_axis(log_softmax64(truth_logits), served.top_ids, axis=1)
    base = np.take_along_axis(log_softmax64(baseline_logits), served.top_ids, axis=1)
    conf_err, base_err = _rms(_difference(served.top_logprobs, truth)), _rms(_difference(base, truth))
    return ratio(conf_err, base_err), conf_err, base_err


def member_topk_max(reference_logits: np.ndarray, member_logits: np.ndarray, top_k: int) -> float:
    """max over rows of max over the member's own top-K tokens of |lp_member - lp_reference| (float64)."""
    member = log_softmax64(member_logits)
    ids = np.argsort(-member, axis=1, kind="stable")[:, :top_k]
    picked = _difference(np.take_along_axis(member, ids, axis=1), np.take_along_axis(log_softmax64(reference_logits), ids, axis=1))
    return float(np.max(np.abs(picked))) if picked.size else 0.0


def _logits_rows(reader: CaptureReader, record, rows: np.ndarray) -> np.ndarray:
    arrays = reader.arrays(record)
    positions = arrays.array(POSITIONS).tolist()
    index = {p: k for k, p in enumerate(positions)}
    missing = [int(r) for r in rows if int(r) not in index]
    if missing:
        raise ValueError(f"{reader.path}: prompt {record.id!r} has no logits at positions {missing[:5]}")
    return arrays.array(LOGITS)[[index[int(r)] for r in rows]].astype(np.float64)


def compare_logprob_level(baseline: CaptureReader, served_records: list[tuple[str, ServedLogprobs]], *, top_k: int,
                          truth: CaptureReader | None = None, reference: CaptureReader | None = None,
                          members: dict[str, CaptureReader] | None = None, envelope_prompts: list[str] | None = None,
                          target_dtype: str | None = None) -> dict:
    """The level's comparison document: per prompt the per-position figures, R_topk and flips; pooled maxima; the
    envelope's scale. ``served_records``: (prompt id, its logprobs), prompts of ``baseline``."""
    by_id = {r.id: r for r in baseline.prompts}
    truth_by_id = {r.id: r for r in truth.prompts} if truth is not None else {}
    prompts = []
    for prompt_id, served in served_records:
        base_logits = _logits_rows(baseline, by_id[prompt_id], served.rows)
        metrics = position_metrics(base_logits, served)
        entry = {"id": prompt_id, "rows": metrics["rows"], TOPK_DELTA: metrics[TOPK_DELTA].tolist(),
                 ACTUAL_DELTA: metrics[ACTUAL_DELTA].tolist(), TOP1_AGREEMENT: float(np.mean(metrics[TOP1_AGREE])) if len(served.rows) else math.nan,
                 "flips": metrics["flips"], "topk_max": float(np.max(metrics[TOPK_DELTA])) if len(served.rows) else 0.0}
        entry["worst_position"] = int(served.rows[int(np.argmax(metrics[TOPK_DELTA]))]) if len(served.rows) else None
        if prompt_id in truth_by_id:
            r, conf_err, base_err = truth_ratio(base_logits, _logits_rows(truth, truth_by_id[prompt_id], served.rows), served)
            entry.update({R_TOPK: r, "configuration_vs_truth_rms": conf_err, "baseline_vs_truth_rms": base_err})
        prompts.append(entry)
    positions = sum(len(p["rows"]) for p in prompts)
    all_flips = [f for p in prompts for f in p["flips"]]
    classify_flips(all_flips, positions, reference_dtype=baseline.dtype, target_dtype=target_dtype)
    document = {"level": "prompt-logprobs", "top_k": top_k, "positions": positions, "prompts": prompts,
                "topk_max": max((p["topk_max"] for p in prompts), default=0.0),
                "actual_max": max((max(map(abs, p[ACTUAL_DELTA]), default=0.0) for p in prompts), default=0.0),
                "envelope": None, "definitions": DEFINITIONS}
    if reference is not None and members:
        document["envelope"] = _envelope(reference, members, envelope_prompts or [], prompts, top_k)
    return document


def _envelope(reference: CaptureReader, members: dict[str, CaptureReader], envelope_prompts: list[str], prompts: list[dict],
              top_k: int) -> dict:
    ref_by_id = {r.id: r for r in reference.prompts}
    wanted = [p for p in prompts if p["id"] in set(envelope_prompts)]
    rows_by_id = {p["id"]: np.asarray(p["rows"], dtype=np.int64) for p in wanted}
    per_member = {}
    for name, member in members.items():
        # The member's statistic on the rows the configuration was compared on, so both sides cover the same positions.
        per_member[name] = max((member_topk_max(_logits_rows(reference, ref_by_id[record.id], rows_by_id[record.id]),
                                                _logits_rows(member, record, rows_by_id[record.id]), top_k)
                                for record in member.prompts if record.id in rows_by_id), default=0.0)
    envelope_max = max(per_member.values(), default=0.0)
    configuration = max((p["topk_max"] for p in wanted), default=0.0)
    return {"prompts": [p["id"] for p in wanted], "members": per_member, ENVELOPE_TOPK_MAX: envelope_max,
            "configuration": configuration, "ratio": ratio(configuration, envelope_max)}


def judge_logprob_level(document: dict, thresholds: Thresholds | None = None) -> Verdict:
    """The level's verdict by the rules of the module docstring."""
    th = thresholds or Thresholds()
    verdicts = []
    for prompt in document["prompts"]:
        findings = []
        real = [f for f in prompt["flips"] if not f[NEAR_TIE]]
        near = [f for f in prompt["flips"] if f[NEAR_TIE]]
        if real:
            f = real[0]
            findings.append(Finding("real-flip", Status.FAIL, f"{len(real)} top-1 flip(s) of the engine's prompt logprobs beyond the "
                                    f"near-tie bound; first at position {f['position']}: baseline margin {f['flip_margin']:.3g} > "
                                    f"bound {f['bound']:.3g}", LEVEL_SITE))
        if near:
            findings.append(Finding("near-tie-flip", Status.PASS, f"{len(near)} top-1 flip(s) at near-ties (baseline margin within the "
                                    "position's rounding-noise bound)", LEVEL_SITE))
        r = prompt.get(R_TOPK)
        if r is not None and r > th.r_logits_fail:
            findings.append(Finding("r-topk", Status.FAIL, f"over the engine's top-{document['top_k']} tokens the configuration is "
                                    f"{r:.2f}x as far from FP32 truth as the baseline (rms {prompt['configuration_vs_truth_rms']:.3g} vs "
                                    f"{prompt['baseline_vs_truth_rms']:.3g}; limit {th.r_logits_fail:g})", LEVEL_SITE))
        verdicts.append(PromptVerdict(prompt["id"], worst(f.status for f in findings), tuple(findings)))
    run_findings = []
    envelope = document.get("envelope")
    if envelope and envelope["ratio"] > th.envelope_warn:
        r_values = [p[R_TOPK] for p in document["prompts"] if p.get(R_TOPK) is not None and p["id"] in envelope["prompts"]]
        if not r_values or max(r_values) >= 1.0:
            run_findings.append(Finding("envelope", Status.WARN, f"the configuration's largest top-K logprob difference from the baseline, "
                                        f"{envelope['configuration']:.3g}, is {envelope['ratio']:.2f}x the largest any implementation "
                                        f"variant makes against the reference ({envelope[ENVELOPE_TOPK_MAX]:.3g}; limit "
                                        f"{th.envelope_warn:g}x)", LEVEL_SITE))
    status = worst([*(v.status for v in verdicts), *(f.status for f in run_findings)])
    return Verdict(status=status, prompts=tuple(verdicts), thresholds=th, findings=tuple(run_findings))
