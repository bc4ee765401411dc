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
