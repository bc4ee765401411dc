"""The ``preempt`` workload: the sequence under test is preempted by the engine and recomputed from scratch.

How vLLM V1 (0.32) preempts (vllm/v1/core/sched/scheduler.py, ``Scheduler.schedule``): running requests are scheduled
first, in admission order; when one of them needs a new KV block and none is free, the scheduler preempts the last
running request (FCFS policy: ``self.running[-1]``; it may be the request asking), frees its blocks, sets its
``num_computed_tokens`` to 0 and puts it back at the head of the waiting queue; with the prefix cache off every
position it had computed is computed again when it is readmitted. A waiting request is admitted only when its whole
prompt fits in the free blocks (``scheduler_reserve_full_isl``, on by default): a request is never preempted by its
own admission, only by the growth of the requests ahead of it.

The KV cache's size: on the CPU build it comes from ``VLLM_CPU_KVCACHE_SPACE`` (GiB) or ``kv_cache_memory_bytes``;
``num_gpu_blocks_override`` (vllm/v1/core/kv_cache_utils.py, ``may_override_num_blocks``) caps the number of blocks
below either, on every platform, and vLLM refuses fewer blocks than one ``max_model_len`` request needs plus its null
block. So the workload serves each sequence with one companion submitted before it, on a KV cache of ``pool`` usable
blocks (``num_gpu_blocks_override = pool + 1``), with a token budget per step of ``budget`` (chunked prefill):

- the companion's prompt takes ``pool - blocks(sequence)`` blocks, so the sequence, admitted in the step the
  companion's prefill ends, fits exactly;
- the companion then decodes ``block_size`` tokens and crosses into one more block while the sequence is still being
  prefilled in chunks: no block is free, the sequence (last running) is preempted, waits until the companion is
  done and is prefilled again from position 0.

Where in its last block the companion's prompt ends (``gap``) decides when it crosses, so how far the sequence got
before it was preempted: ``simulate`` replays the scheduler's rules above for each choice and the plan keeps the one
that lets the sequence compute the most positions before it is preempted. The engine's own counters and the
worker's rows say whether it really happened (``summarize``); nothing here is assumed to have.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

DEFAULT_BLOCK_SIZE = 32
"""vLLM's CPU attention takes blocks of a multiple of 32 (``CPUAttentionBackend.get_supported_kernel_block_sizes``);
a block of 16 would run another kernel (vec16), so another computation than the baseline's blocks of 128."""
BUDGET_CANDIDATES = (17, 33, 65)
"""Tokens per step (``max_num_batched_tokens``) the plan chooses from: odd, so no prompt of whole blocks ends a step
exactly (the sequence is admitted in the step the companion's prefill ends, with the rest of that step's budget)."""


@dataclasses.dataclass(frozen=True)
class Companion:
    """How one sequence is served: the companion's prompt length and the tokens it decodes, and what the scheduler
    model predicts (positions of the sequence computed before its first preemption; None: never preempted)."""

    prompt_length: int
    new_tokens: int
    predicted_positions_before_preemption: int | None


@dataclasses.dataclass(frozen=True)
class PreemptionPlan:
    block_size: int
    pool: int
    budget: int
    max_model_len: int
    companions: dict[int, Companion]
    """By sequence length."""

    def engine_settings(self) -> dict[str, Any]:
        """Engine arguments of the workload (a configuration's own settings override them)."""
        return {"block_size": self.block_size, "num_gpu_blocks_override": self.pool + 1, "max_model_len": self.max_model_len,
                "max_num_batched_tokens": self.budget, "enable_chunked_prefill": True, "max_num_seqs": 2,
                # vLLM counts preemptions per request (RequestOutput.metrics.num_preemptions) only with its statistics on.
                "disable_log_stats": False}

    def to_json(self) -> dict[str, Any]:
        return {"block_size": self.block_size, "pool_blocks": self.pool, "budget": self.budget, "max_model_len": self.max_model_len}


def _blocks(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def simulate(companion_prompt: int, companion_tokens: int, length: int, pool: int, budget: int, block_size: int) -> int | None:
    """Positions of the sequence computed before its first preemption under vLLM 0.32's FCFS scheduler (see the module
    docstring): the companion admitted first, the sequence (``length`` prompt tokens, one new token) after it;
    None when the sequence finishes without being preempted."""
    computed = {"companion": 0, "sequence": 0}
    held = {"companion": 0, "sequence": 0}
    sampled = 0
    running = ["companion"]
    waiting = ["sequence"]
    for _ in range(10 * (companion_prompt + companion_tokens + length) + 10):
        left = budget
        for name in list(running):
            if name not in running:
                continue
            target = companion_prompt + sampled if name == "companion" else length
            new = min(target - computed[name], left)
            if new <= 0:
                continue
            need = _blocks(computed[name] + new, block_size) - held[name]
            if need > pool - sum(held.values()):
                # The last running request is preempted; the companion alone always fits, so it is the sequence.
                return computed["sequence"] if "sequence" in running else None
            held[name] += need
            left -= new
            computed[name] += new
            if name == "sequence" and computed[name] == length:
                return None
            if name == "companion" and computed[name] >= companion_prompt:
                sampled += 1
                if sampled == companion_tokens:
                    running.remove(name)
                    held[name] = 0
        if waiting and left > 0:
            if _blocks(length, block_size) <= pool - sum(held.values()):
                waiting.pop(0)
                running.append("sequence")
                new = min(length, left)
                held["sequence"] = _blocks(new, block_size)
                computed["sequence"] = new
                if new == length:
                    return None
    return None


def plan_preemption(lengths: Sequence[int], max_model_len: int, block_size: int = DEFAULT_BLOCK_SIZE,
                    max_position: int | None = None) -> PreemptionPlan:
    """The KV cache, step budget and per-sequence companion that make each of ``lengths`` be preempted (predicted by
    ``simulate``; the capture's evidence says what happened). ``max_model_len`` is the baseline's (longest sequence
    + 1); the workload's is a whole number of blocks above it, within ``max_position`` (the model's)."""
    pool = _blocks(max_model_len, block_size) + 1  # room for the longest sequence and at least one companion block
    model_len = pool * block_size
    if max_position is not None and model_len > max_position:
        model_len = max_position
    best: tuple[int, int, dict[int, Companion]] | None = None
    for budget in BUDGET_CANDIDATES:
        companions = {length: _companion(length, pool, budget, block_size, model_len) for length in sorted(set(lengths))}
        predicted = [c.predicted_positions_before_preemption for c in companions.values()]
        score = (sum(p is not None for p in predicted), min((p or 0) for p in predicted) if predicted else 0)
        if best is None or score > best[:2]:
            best = (*score, companions)
            chosen = budget
    return PreemptionPlan(block_size=block_size, pool=pool, budget=chosen, max_model_len=model_len, companions=best[2])


def companion_for(length: int, plan: PreemptionPlan) -> Companion:
    """The companion of a sequence length the plan was not made for (a bisection trial serves the same sequences,
    so this is the exception)."""
    return _companion(length, plan.pool, plan.budget, plan.block_size, plan.max_model_len)


def _companion(length: int, pool: int, budget: int, block_size: int, model_len: int) -> Companion:
    blocks = pool - _blocks(length, block_size)
    options = []
    for gap in range(block_size - 1):
        prompt = blocks * block_size - gap
        new_tokens = min(block_size, model_len - prompt)
        if prompt < 1 or new_tokens < 1:
            continue
        options.append(Companion(prompt, new_tokens, simulate(prompt, new_tokens, length, pool, budget, block_size)))
    preempting = [c for c in options if c.predicted_positions_before_preemption is not None]
    if preempting:
        return max(preempting, key=lambda c: (c.predicted_positions_before_preemption, c.prompt_length))
    return options[0] if options else Companion(max(1, blocks * block_size), 1, None)


def companion_tokens(sequence: Sequence[int], others: Sequence[Sequence[int]], length: int) -> list[int]:
    """A companion prompt of ``length`` tokens that is not a prefix of ``sequence`` (the worker keeps the rows of
    requests whose prompt is a prefix of the sequence): the plan's other sequences, repeated, else the sequence
    reversed."""
    pool = [t for other in others if list(other) != list(sequence) for t in other] or list(reversed(sequence))
    tokens = [pool[i % len(pool)] for i in range(length)]
    if tokens == list(sequence[:length]):
        tokens[-1] = sequence[length - 1] + 1 if length <= len(sequence) and sequence[length - 1] + 1 != tokens[-1] else tokens[-1] ^ 1
    return tokens


def summarize(evidence: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The preemption evidence of a capture's prompts (None unless the preempt workload served them): vLLM's own count of the
    sequence's preemptions (RequestOutput.metrics.num_preemptions), the restarts the worker saw (the same request's
    rows starting again at an earlier position), the positions computed more than once and, per site, whether the
    recomputation was bitwise the first computation. The rows kept are the last computation's (the one the
    request's output derives from)."""
    entries = [e for e in evidence if "engine_preemptions" in e and "recomputation" in e]
    if not entries:
        return None
    sites: dict[str, bool] = {}
    for entry in entries:
        for site, equal in entry["recomputation"]["bitwise_equal"].items():
            sites[site] = sites.get(site, True) and equal
    return {
        "engine_preemptions": [e.get("engine_preemptions") for e in entries],
        "restarts": [e["recomputation"]["restarts"] for e in entries],
        "positions_computed_again": [e["recomputation"]["positions"] for e in entries],
        "recomputation_bitwise_equal": all(sites.values()) if sites else None,
        "sites_recomputed_differently": [s for s, equal in sites.items() if not equal],
    }


def sentence(summary: dict[str, Any] | None) -> str | None:
    """One line for the report from ``summarize``'s figures."""
    if summary is None:
        return None
    counted = [n for n in summary["engine_preemptions"] if n is not None]
    engine = f"vLLM counted {sum(counted)} preemption(s) of the sequences under test" if counted else "vLLM's preemption counts were not available"
    equal = ("bitwise equal to the first computation at every site" if summary["recomputation_bitwise_equal"]
             else f"different from the first computation at {', '.join(summary['sites_recomputed_differently']) or 'some site'}")
    return (f"{engine}; the worker saw {sum(summary['restarts'])} restart(s) and {sum(summary['positions_computed_again'])} position(s) "
            f"computed twice or more, the recomputation {equal}; the rows compared are the last computation's")
