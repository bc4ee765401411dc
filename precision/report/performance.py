"""The report's "Performance (not precision)" section: the vLLM target's timings, as its capture manifest recorded
them (precision.backends.vllm_performance), per prompt category. No verdict reads these numbers.

Per category: the prompts' median time to first token; prefill and decode rates pooled over the category's prompts
(sum of tokens / sum of seconds, so a long prompt weighs as much as the time it took); the sources of the timings.
"""

from __future__ import annotations

import statistics
from typing import Any

from precision.contract.performance import prompt_digest

NOT_MEASURED = "not measured for this target"


def _settings_label(backend: dict) -> str:
    """The device and the engine settings the timings were taken under, in one line."""
    settings = backend.get("settings") or {}
    shown = ("dtype", "enforce_eager", "enable_prefix_caching", "max_num_seqs", "max_num_batched_tokens", "tensor_parallel_size")
    parts = [f"{key}={settings[key]}" for key in shown if key in settings]
    device = backend.get("device_name") or backend.get("device") or "unknown device"
    threads = backend.get("torch_threads")
    return f"{device}{f' ({threads} torch threads)' if threads else ''}; {backend.get('spec', 'vllm')}: {', '.join(parts) or 'engine defaults'}"


def _category_row(category: str, timings: list[dict]) -> dict[str, Any]:
    prompt_tokens = sum(t["prompt_tokens"] for t in timings)
    prefill_seconds = sum(t["prompt_tokens"] / t["prefill_tokens_per_s"] for t in timings if t.get("prefill_tokens_per_s"))
    decoded = [t for t in timings if t.get("decode_tokens_per_s")]
    decode_tokens = sum(t["new_tokens"] - 1 for t in decoded)
    decode_seconds = sum((t["new_tokens"] - 1) / t["decode_tokens_per_s"] for t in decoded)
    return {
        "category": category,
        "prompts": len(timings),
        "prompt_tokens": prompt_tokens,
        "new_tokens": sum(t["new_tokens"] for t in timings),
        "ttft_ms": 1000.0 * statistics.median(t["ttft_s"] for t in timings),
        "prefill_tokens_per_s": prompt_tokens / prefill_seconds if prefill_seconds > 0 else None,
        "decode_tokens_per_s": decode_tokens / decode_seconds if decode_seconds > 0 else None,
        "sources": sorted({t["source"] for t in timings}),
    }


def performance_view(manifests: dict[str, dict]) -> dict[str, Any]:
    """{"measured": False, "reason"} or {"measured": True, "label", "method", "definitions", "rows", "all"}."""
    target = manifests.get("actual")
    if target is None:
        return {"measured": False, "reason": f"{NOT_MEASURED}: its capture manifest is not where the comparison says"}
    backend = target.get("backend") or {}
    record = backend.get("performance")
    if not record or not record.get("prompts"):
        return {"measured": False, "reason": f"{NOT_MEASURED} ({backend.get('spec', 'unknown backend')}): timings are taken for vLLM targets only"}
    categories = {}
    for prompt in target.get("prompts", []):
        categories.setdefault(prompt_digest(prompt["prompt_ids"]), prompt["category"])
    grouped: dict[str, list[dict]] = {}
    for timing in record["prompts"]:
        grouped.setdefault(categories.get(timing["prompt_sha256"], "(prompt not in this capture)"), []).append(timing)
    rows = [_category_row(category, timings) for category, timings in grouped.items()]
    return {
        "measured": True,
        "label": _settings_label(backend),
        "method": record["method"],
        "repeats": record["repeats"],
        "definitions": record["definitions"],
        "rows": rows,
        "all": _category_row("all prompts", list(record["prompts"])),
    }


def performance_summary(manifests: dict[str, dict]) -> dict[str, Any]:
    """summary.json's performance section (precision.contract.performance.PerformanceSummary): performance_view's
    numbers and definitions, with every key present (null or empty when not measured)."""
    view = performance_view(manifests)
    if not view["measured"]:
        return {"measured": False, "reason": view["reason"], "label": None, "method": None, "repeats": None, "definitions": {},
                "categories": [], "all_prompts": None}
    return {"measured": True, "reason": None, "label": view["label"], "method": view["method"], "repeats": view["repeats"],
            "definitions": dict(view["definitions"]), "categories": view["rows"], "all_prompts": view["all"]}
