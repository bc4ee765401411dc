"""Turns a comparison into findings: theory band, implementation envelope, local versus inherited error,
determinism and the first non-finite value. The result is the ``analysis`` section of comparison.json:

    analysis: {
      theory:      [{site, roundings, vs_truth_low/high, between_engines_low/high}]        precision.analysis.theory
      envelope:    {members, prompts, sites: [{site, target, members, max, ratio, percentile}]} | null
      local:       {available, reason, steps: [{site, input_site, local, inherited, input, amplification,
                    local_R, local_gain, local_ulp_shares, envelope_local_max, local_ratio, envelope_gain_max}]}
      determinism: {runs, prompts, tokens_identical, tensors_identical, max_relative_l2} | null
      first_non_finite: {prompt, site, index, side} | null
    }
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from precision.analysis.envelope import local_envelope, site_envelope
from precision.analysis.replay import Replayer, replayable
from precision.analysis.theory import model_reductions, theory_band
from precision.capture.reader import CaptureReader

log = logging.getLogger(__name__)


def first_non_finite(comparison: dict) -> dict | None:
    """The first prompt and site, in model order, where either side holds NaN or Inf."""
    for prompt in comparison["prompts"]:
        for entry in prompt["sites"]:
            nf = entry["metrics"]["non_finite"]
            actual, expected = nf["actual_nan"] + nf["actual_inf"], nf["expected_nan"] + nf["expected_inf"]
            if actual or expected:
                index = nf["first_index"]
                return {"prompt": prompt["id"], "site": entry["site"], "index": index,
                        "position": None if not index else index[0], "side": "target" if actual and not expected else ("both" if actual else "reference")}
    return None


def determinism(target: CaptureReader) -> dict | None:
    records = [r.determinism for r in target.prompts if r.determinism]
    if not records:
        return None
    return {
        "runs": records[0]["runs"],
        "prompts": len(records),
        "tokens_identical": sum(r["tokens_identical"] for r in records),
        "tensors_identical": sum(r["tensors_identical"] for r in records),
        "max_relative_l2": max(r["max_relative_l2"] for r in records),
    }


def build_analysis(comparison: dict, *, reference: CaptureReader, target: CaptureReader,
                   members: dict[str, CaptureReader] | None = None, envelope_prompts: list[str] | None = None,
                   replayer: Replayer | None = None) -> dict:
    config = json.loads((Path(reference.manifest["model"]["path"]) / "config.json").read_text())
    longest = max(len(r.forced_ids) for r in reference.prompts)
    analysis: dict = {
        "theory": theory_band([s["site"] for s in comparison["sites"]], **model_reductions(config), sequence_length=longest),
        "envelope": site_envelope(reference, members, comparison, envelope_prompts) if members and envelope_prompts else None,
        "determinism": determinism(target),
        "first_non_finite": first_non_finite(comparison),
    }
    reason = replayable(target) or replayable(reference) or (None if replayer is not None else "no replay was asked for")
    if reason is None and analysis["first_non_finite"] is not None:
        reason = "the captures hold non-finite values; see first_non_finite"
    if reason is None:
        log.info("replaying reference layers on the target's inputs")
        target_steps = replayer.replay(target, reference)
        member_steps = {name: replayer.replay(capture, reference) for name, capture in (members or {}).items()}
        analysis["local"] = {"available": True, "reason": None, "steps": local_envelope(target_steps, member_steps)}
    else:
        analysis["local"] = {"available": False, "reason": reason, "steps": []}
    return analysis
