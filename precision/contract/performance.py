"""The vLLM target's speed record (precision.backends.vllm_performance): part of a capture manifest's backend
description, under ``performance``. Performance, not precision: no verdict reads it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Sequence

from precision.contract.codec import described


def prompt_digest(token_ids: Sequence[int]) -> str:
    """sha256 of the JSON list of a prompt's token ids: the key that joins a timing (PromptTiming.prompt_sha256) with
    the manifest's prompt record, which holds the prompt's id and category."""
    return hashlib.sha256(json.dumps([int(t) for t in token_ids]).encode()).hexdigest()


@dataclass(frozen=True, kw_only=True)
class PromptTiming:
    prompt_sha256: str = described("sha256 of the JSON list of the prompt's token ids; joins the timing with the manifest's prompt record.")
    prompt_tokens: int = described("P, the prompt's token count.")
    source: str = described('"vllm request metrics" (vLLM\'s RequestOutput.metrics) or "wall clock" (see definitions).')
    new_tokens: int = described("n, the tokens generated in the timed greedy generate (EOS ignored).")
    ttft_s: float = described("Time to first token, seconds (definitions.ttft_s).")
    prefill_tokens_per_s: float | None = described("P / prefill seconds (definitions.prefill_tokens_per_s).")
    decode_tokens_per_s: float | None = described("(n - 1) / decode seconds (definitions.decode_tokens_per_s); null when n < 2.")


@dataclass(frozen=True, kw_only=True)
class PerformanceRecord:
    """Timings of a plain pass (capture hooks removed) over the capture's prompts, one request at a time."""

    method: str = described("How the pass ran: when, with which hooks, how many requests at a time, under which engine settings.")
    repeats: int = described("Timed runs per wall-clock measurement; the median is kept.")
    definitions: dict[str, str] = described("Each number's written definition, as the code computed it.")
    prompts: list[PromptTiming] = described("One timing per prompt, in the order the capture ran them.")


@dataclass(frozen=True, kw_only=True)
class CategoryPerformance:
    """One row of the report's "Performance (not precision)" table (precision.report.performance)."""

    category: str = described('The prompt category, or "all prompts" for the row over every timed prompt.')
    prompts: int = described("Timed prompts in the category.")
    prompt_tokens: int = described("Sum of P, the prompts' token counts.")
    new_tokens: int = described("Sum of n, the tokens each timed generate produced.")
    ttft_ms: float = described("Median over the category's prompts of the time to first token (definitions.ttft_s), milliseconds.")
    prefill_tokens_per_s: float | None = described(
        "Pooled: sum of P / sum of prefill seconds (each prompt's P / its prefill_tokens_per_s); null when no prompt has a prefill rate.")
    decode_tokens_per_s: float | None = described(
        "Pooled: sum of (n - 1) / sum of decode seconds over the prompts with a decode rate; null when none has one (n < 2).")
    sources: list[str] = described('Where the timings came from: "vllm request metrics" and/or "wall clock".')


@dataclass(frozen=True, kw_only=True)
class PerformanceSummary:
    """summary.json's performance section: the target's speed as its capture manifest recorded it (PerformanceRecord),
    per prompt category. Performance, not precision: no verdict reads it."""

    measured: bool = described("Whether the target's capture holds timings (vLLM targets only).")
    reason: str | None = described("Why not, when not measured; null otherwise.")
    label: str | None = described("The device and engine settings the timings were taken under.")
    method: str | None = described("PerformanceRecord.method: how the timed pass ran.")
    repeats: int | None = described("PerformanceRecord.repeats: timed runs per wall-clock measurement (median kept).")
    definitions: dict[str, str] = described("Each number's written definition (PerformanceRecord.definitions); empty when not measured.")
    categories: list[CategoryPerformance] = described("One row per prompt category, in the order the capture ran them.")
    all_prompts: CategoryPerformance | None = described("The row over every timed prompt; null when not measured.")
