"""Turns a comparison into findings: theory band, implementation envelope, local versus inherited error,
determinism and the first non-finite value. The result is the ``analysis`` section of comparison.json, typed as
precision.contract.analysis.Analysis.

The model directory recorded in the reference capture is needed only for the replay (and the theory band's
intermediate and head sizes): on a machine without it (a capture pair copied off the NPU box) the replay is
skipped with that reason, and the theory band uses the hidden size the manifest records.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from precision import names
from precision.analysis.envelope import local_envelope, site_envelope
from precision.analysis.replay import Replayer, replayable
from precision.analysis.theory import model_reductions, theory_band
from precision.capture.reader import CaptureReader

log = logging.getLogger(__name__)

TARGET = "\0target"
"""The target's key among the replayed captures (no envelope member's name can be it)."""


def first_non_finite(comparison: dict) -> dict | None:
    """The first prompt and site, in model order, where either side holds NaN or Inf."""
    for prompt in comparison["prompts"]:
        for entry in prompt["sites"]:
            nf = entry["metrics"][names.NON_FINITE]
            actual, expected = nf["actual_nan"] + nf["actual_inf"], nf["expected_nan"] + nf["expected_inf"]
            if actual or expected:
                index = nf["first_index"]
                return {"prompt": prompt["id"], "site": entry["site"], "index": index,
                        "position": None if not index else index[0], "side": "target" if actual and not expected else ("both" if actual else "reference")}
    return None


def _reductions(reference: CaptureReader, model_dir: Path) -> tuple[dict, str]:
    """The theory band's sizes from the model's config.json, or from the manifest when the model is elsewhere."""
    config_path = model_dir / "config.json"
    if config_path.is_file():
        try:
            return model_reductions(json.loads(config_path.read_text())), "model config.json"
        except (OSError, ValueError, KeyError) as exc:
            log.warning("%s is unreadable (%s); the theory band uses the capture manifest's sizes", config_path, exc)
    hidden = reference.manifest["model"]["hidden_size"]
    return ({"hidden_size": hidden, "intermediate_size": None, "head_dim": None},
            f"capture manifest (hidden size {hidden}; {model_dir} not found on this machine, so intermediate and head sizes "
            "count as the hidden size)")


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
    model_dir = Path(reference.manifest["model"]["path"])
    reductions, source = _reductions(reference, model_dir)
    longest = max(len(r.forced_ids) for r in reference.prompts)
    analysis: dict = {
        "theory": theory_band([s["site"] for s in comparison["sites"]], **reductions, sequence_length=longest,
                              num_layers=comparison.get("num_layers")),
        "theory_source": source,
        "envelope": site_envelope(reference, members, comparison, envelope_prompts) if members and envelope_prompts else None,
        "determinism": determinism(target),
        "first_non_finite": first_non_finite(comparison),
    }
    reason = replayable(target) or replayable(reference) or (None if replayer is not None else "no replay was asked for")
    if reason is None and not (model_dir / "config.json").is_file():
        reason = f"replay skipped: model directory {model_dir} not found on this machine"
    if reason is None and analysis["first_non_finite"] is not None:
        reason = "the captures hold non-finite values; see first_non_finite"
    if reason is None:
        log.info("replaying reference layers on the target's inputs")
        replayed = replayer.replay_all(reference, {TARGET: target, **(members or {})}, without_truth=tuple(members or {}))
        target_steps = replayed.pop(TARGET)
        member_steps = replayed
        analysis["local"] = {"available": True, "reason": None, "steps": local_envelope(target_steps, member_steps)}
    else:
        analysis["local"] = {"available": False, "reason": reason, "steps": []}
    return analysis
