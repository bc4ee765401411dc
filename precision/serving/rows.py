"""A serving configuration's row of the parity document: its level of detail, the evidence for it, and the figures
of its comparison with the eager baseline (precision.serving.parity builds the comparison; this module reads it)."""

from __future__ import annotations

from pathlib import Path

from precision.analysis.verdict import Status
from precision.capture.reader import CaptureReader
from precision.capture.sites import layer_index, site_order
from precision.io import write_json_atomic
from precision.names import DETAIL_LAYERS, DETAIL_LOGITS, DETAIL_PROMPT_LOGPROBS, FINAL_NORM, FIRST_DIVERGENCE, LOGITS, NEAR_TIE, RELATIVE_L2
from precision.outputs import claim_output_dir
from precision.serving import preemption
from precision.serving.engine import ServingConfig
from precision.serving.logprob_level import served_level
from precision.serving.worker import COMPILED_GRAPH

LOGITS_SITES = [FINAL_NORM, LOGITS]
"""What a configuration whose model body ran as a compiled graph is compared on."""


def level_of(comparison: dict) -> str:
    if comparison.get("level") == DETAIL_PROMPT_LOGPROBS:
        return DETAIL_PROMPT_LOGPROBS
    sites = {s["site"] for s in comparison["sites"]}
    return DETAIL_LOGITS if sites <= set(LOGITS_SITES) else DETAIL_LAYERS


def served_level_of(served: CaptureReader) -> str:
    if served_level(served) is not None:
        return DETAIL_PROMPT_LOGPROBS
    levels = {e["level"] for e in served.manifest["backend"]["serving"]["evidence"]}
    return DETAIL_LOGITS if DETAIL_LOGITS in levels else DETAIL_LAYERS


def write_comparison(destination: Path, comparison: dict, verdict) -> None:
    from precision.report import write_report

    with claim_output_dir(destination, "comparison", force=True, complete_marker="summary.json"):
        write_json_atomic(destination / "comparison.json", comparison)
        write_report(destination, comparison, verdict)


def first_site(comparison: dict, predicate) -> str | None:
    """The first site in model order (embed, layers, final norm, logits) whose pooled figures satisfy ``predicate``."""
    if "sites" not in comparison:
        return None  # the prompt-logprobs level sees no site
    by_site = {s["site"]: s for s in comparison["sites"]}
    return next((site for site in site_order(list(by_site)) if predicate(by_site[site])), None)


def evidence_summary(served: CaptureReader, level: str) -> dict:
    """How the level of detail was established, from the worker's own counts over every captured prompt."""
    evidence = served.manifest["backend"]["serving"]["evidence"]
    calls: dict[str, int] = {}
    for entry in evidence:
        for name, count in entry["calls"].items():
            calls[name] = calls.get(name, 0) + count
    layer_calls = sum(c for n, c in calls.items() if layer_index(n) is not None)
    # Counted from this configuration's engine start (precision.serving.engine), not the process's earlier engines.
    # vLLM 0.32 compiles ahead of time on CPU (num_aot_compiles) rather than through num_backend_compilations: every
    # counter that moved is reported.
    counters: dict[str, int] = {}
    for entry in evidence:
        for name, value in entry["engine_compilations"].items():
            if value:
                counters[name] = max(counters.get(name, 0), value)
    compiled = sum(v for k, v in counters.items() if "compile" in k or "artifacts_loaded" in k)
    counted = ", ".join(f"{k} {v}" for k, v in sorted(counters.items())) or "none moved"
    outer = calls.get("outer_model", 0)
    graph_calls = calls.get(COMPILED_GRAPH, 0)
    if level == DETAIL_LOGITS:
        why = (f"the model body ran as a compiled graph: the decoder layers' Python hooks fired {layer_calls} times while the outer "
               f"forward ran {outer} time(s) over the captures and entered the compiled graph {graph_calls} time(s), and vLLM's "
               f"compilation counters since this engine started read {counted}; final-norm states and full-vocabulary logits of "
               f"every position were taken outside the graph")
    else:
        steps = max((e["calls"].get("outer_model", 0) for e in evidence), default=0)
        why = (f"the decoder layers' Python hooks fired ({layer_calls} calls over {outer} forward steps, up to {steps} step(s) per "
               f"sequence), so every site of every position was captured; vLLM's compilation counters since this engine started: {counted}")
    preempted = preemption.summarize(evidence)
    if preempted is not None:
        why += "; " + preemption.sentence(preempted)
    cached = [len(e["positions_from_earlier_requests"]) for e in evidence]
    return {"why": why, "preemption": preempted, "hook_calls": calls, "compilations": compiled, "compilation_counters": counters,
            "compiled_graph_calls": graph_calls, "ranks": sorted({r for e in evidence for r in e.get("ranks", [])}),
            "positions_from_cache": sum(cached), "cached_tokens_reported": [e.get("cached_tokens") for e in evidence],
            "requests_per_sequence": [len(e["requests"]) for e in evidence],
            "steps_per_sequence": [len(e.get("steps", [])) for e in evidence],
            "largest_shared_step": max((step["requests"] for e in evidence for step in e.get("steps", [])), default=None),
            "companion_lengths": evidence[0].get("companion_lengths") if evidence else None}


def configuration_row(serving: ServingConfig, served: CaptureReader, comparison: dict, verdict, level: str) -> dict:
    sites = comparison["sites"]
    envelope = (comparison.get("analysis") or {}).get("envelope") or {}
    env_rows = envelope.get("sites") or []
    largest = max(sites, key=lambda s: s[RELATIVE_L2])
    # A site where the configuration equals the baseline has ratio 0/0 = 1 by compare.ratio's convention; it is not a
    # difference to size, so the largest ratio is taken over the sites that differ (0 when none does).
    differing = [r for r in env_rows if r["target"] > 0]
    worst_envelope = max(differing, key=lambda r: r["ratio"]) if differing else None
    logits = next((s for s in sites if s["site"] == LOGITS), None)
    flips = [f for p in comparison["prompts"] for f in (p.get(LOGITS) or {}).get("flips", [])]
    return {
        "name": serving.name, "settings": serving.to_json(), "verdict": verdict.status.value, "summary": verdict.summary,
        "findings": [f.message for p in verdict.prompts for f in p.findings if f.status is not Status.PASS][:5]
                    + [f.message for f in verdict.findings if f.status is not Status.PASS],
        "level": level, "evidence": evidence_summary(served, level),
        "bitwise_identical": all(s[RELATIVE_L2] == 0.0 for s in sites),
        "first_bitwise_site": first_site(comparison, lambda s: s[RELATIVE_L2] > 0),
        "largest": {"site": largest["site"], RELATIVE_L2: largest[RELATIVE_L2]},
        "logits_relative_l2": logits[RELATIVE_L2] if logits else None,
        "logits_R": logits.get("R") if logits else None,
        "envelope_ratio": ({"site": None, "ratio": 0.0, "configuration": 0.0, "envelope_max": None} if env_rows else None)
        if worst_envelope is None else {"site": worst_envelope["site"], "ratio": worst_envelope["ratio"],
                                                               "configuration": worst_envelope["target"], "envelope_max": worst_envelope["max"]},
        "first_site_beyond_envelope": next((r["site"] for r in sorted(env_rows, key=lambda r: site_order([x["site"] for x in env_rows]).index(r["site"]))
                                            if r["target"] > 0 and r["ratio"] > 1.0), None),
        "flips": {"total": len(flips), "real": sum(1 for f in flips if not f.get(NEAR_TIE, True))},
        "tokens": [{"id": p["id"], FIRST_DIVERGENCE: p["tokens"].get(FIRST_DIVERGENCE), "match_rate": p["tokens"].get("match_rate")}
                   for p in comparison["prompts"]],
        "comparison": f"configuration-{serving.name}/comparison.json",
    }
