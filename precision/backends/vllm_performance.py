"""Speed of the vLLM target, measured apart from precision: time to first token, prefill and decode tokens per
second per prompt, on a plain pass over the capture's own prompts with the capture hooks removed.

The pass runs when a capture prepares its prompts (before the hooked forward passes), one request at a time,
under the capture's engine settings (eager, no prefix caching, one sequence per step): a measurement of this
engine, build and device on these prompts, not of a production serving configuration with batching and graphs.

Two sources, chosen per request, recorded as ``source``:

- ``vllm request metrics``: vLLM's own per-request timestamps (RequestOutput.metrics, a RequestStateStats),
  present when the engine keeps statistics (``--engine-arg disable_log_stats=false``; vLLM's offline LLM turns
  them off by default, so RequestOutput.metrics is None there). One greedy generate of the prompt's n new tokens:
      TTFT = first_token_latency (request arrival to first token, vLLM's own time-to-first-token)
      prefill tokens/s = P / (first_token_ts - scheduled_ts)
      decode tokens/s = (n - 1) / (last_token_ts - first_token_ts)
- ``wall clock`` otherwise: t_1 the wall time of a greedy LLM.generate with max_tokens=1, t_n that of one with
  max_tokens=n (EOS ignored, so exactly n tokens), each the median of REPEATS runs:
      TTFT = t_1
      prefill tokens/s = P / t_1
      decode tokens/s = (n - 1) / (t_n - t_1)
  Wall times include the offline engine's per-request overhead (adding the request, detokenization is off).

P is the prompt's token count, n its new tokens (the prompt's max_new_tokens). A prompt with n < 2 has no decode
rate (null). Per category (as the report shows them): TTFT is the median over the category's prompts, and the
rates are pooled: sum of tokens over sum of seconds.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any, Sequence

from precision.backends import vllm_compat
from precision.contract.performance import prompt_digest

log = logging.getLogger(__name__)

REPEATS = 3
"""Timed runs per measurement in the wall-clock source; the median is kept (a shared host's outliers)."""

SOURCE_METRICS, SOURCE_WALL_CLOCK = "vllm request metrics", "wall clock"

DEFINITIONS: dict[str, str] = {
    "ttft_s": "time to first token, seconds: vLLM's first_token_latency (request arrival to first token) where the engine keeps request "
              "metrics, else the median wall time of a greedy LLM.generate with max_tokens=1",
    "prefill_tokens_per_s": "prompt tokens P divided by the prefill time: first_token_ts - scheduled_ts from vLLM's request metrics, "
                            "else the wall-clock TTFT",
    "decode_tokens_per_s": "(n - 1) / (t_n - t_1) with n the new tokens: from vLLM's request metrics last_token_ts - first_token_ts, "
                           "else the median wall times of a max_tokens=n and a max_tokens=1 generate (EOS ignored); null when n < 2",
    "category": "per prompt category: TTFT the median over its prompts; prefill and decode rates pooled (sum of tokens / sum of seconds)",
}

PASS_DESCRIPTION = ("plain pass before the hooked capture, capture hooks removed, one request at a time, under the capture's engine "
                    "settings (eager, no prefix caching, one sequence per step)")


def _generate(llm: Any, token_ids: list[int], max_tokens: int, seed: int) -> tuple[float, Any]:
    params = vllm_compat.greedy_params(max_tokens=max_tokens, ignore_eos=True, seed=seed)
    started = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": token_ids}], params, use_tqdm=False)
    return time.perf_counter() - started, outputs[0]


def _from_metrics(output: Any, prompt_tokens: int) -> dict | None:
    """The timings from vLLM's own request metrics, or None where the engine kept none."""
    stats = getattr(output, "metrics", None)
    needed = ("first_token_latency", "scheduled_ts", "first_token_ts", "last_token_ts", "num_generation_tokens")
    if stats is None or not all(hasattr(stats, name) for name in needed) or stats.first_token_ts <= 0 or stats.scheduled_ts <= 0:
        return None
    new = int(stats.num_generation_tokens)
    prefill = stats.first_token_ts - stats.scheduled_ts
    decode = stats.last_token_ts - stats.first_token_ts
    return {"source": SOURCE_METRICS, "new_tokens": new, "ttft_s": float(stats.first_token_latency),
            "prefill_tokens_per_s": prompt_tokens / prefill if prefill > 0 else None,
            "decode_tokens_per_s": (new - 1) / decode if new >= 2 and decode > 0 else None}


def _measure_prompt(llm: Any, token_ids: list[int], new_tokens: int, seed: int) -> dict:
    prompt_tokens = len(token_ids)
    seconds, output = _generate(llm, token_ids, new_tokens, seed)
    timing = _from_metrics(output, prompt_tokens)
    if timing is None:
        first = statistics.median(_generate(llm, token_ids, 1, seed)[0] for _ in range(REPEATS))
        whole = statistics.median([seconds] + [_generate(llm, token_ids, new_tokens, seed)[0] for _ in range(REPEATS - 1)])
        new = len(output.outputs[0].token_ids)
        timing = {"source": SOURCE_WALL_CLOCK, "new_tokens": new, "ttft_s": first, "prefill_tokens_per_s": prompt_tokens / first,
                  "decode_tokens_per_s": (new - 1) / (whole - first) if new >= 2 and whole > first else None}
    return {"prompt_sha256": prompt_digest(token_ids), "prompt_tokens": prompt_tokens, **timing}


def measure_plain_pass(llm: Any, prompts: Sequence[tuple[Sequence[int], int]], *, seed: int = 0) -> dict:
    """Time every (prompt token ids, new tokens) on ``llm`` with the capture hooks removed, reinstalling them
    after; the record written under the backend description's ``performance`` (contract: PerformanceRecord)."""
    vllm_compat.rpc(llm, "precision_remove_hooks")
    try:
        _generate(llm, list(prompts[0][0]), 1, seed)  # warm-up, untimed: the first request pays one-time allocations
        timings = [_measure_prompt(llm, list(ids), max(int(new), 1), seed) for ids, new in prompts]
    finally:
        vllm_compat.rpc(llm, "precision_install_hooks")
    return {"method": PASS_DESCRIPTION, "repeats": REPEATS, "definitions": dict(DEFINITIONS), "prompts": timings}


class PlainPassPerformance:
    """Mixed into the vLLM backend (before Backend): ``prepare`` (called by the capture writer with every prompt the
    capture will run) measures the plain pass, and ``describe`` adds it to the backend description as
    ``performance``. A capture with nothing left to run (a finished resume) measures nothing and records none."""

    _performance: dict | None = None

    def prepare(self, planned, selection) -> None:
        super().prepare(planned, selection)
        prompts = [(ids, new) for ids, _continuation, new in planned]
        if prompts:
            log.info("timing a plain pass over %d prompts (capture hooks removed)", len(prompts))
            self._performance = measure_plain_pass(self._llm, prompts, seed=self.options.seed)

    def describe(self) -> dict[str, Any]:
        description = super().describe()
        if self._performance is not None:
            description["performance"] = self._performance
        return description
