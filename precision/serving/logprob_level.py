"""The third level of detail: the engine's own ``prompt_logprobs`` top-K of every teacher-forced position.

Where the decoder layers' hooks fire, parity gets every layer; where only the outer model's forward runs in Python
(compiled graphs), the final-norm states and full logits. An engine whose model output no hook reaches (a future
graph mode that captures the outer forward too) leaves one thing: what the engine itself returns. This backend
serves the teacher-forced sequence with ``SamplingParams(prompt_logprobs=K, max_tokens=1)`` and keeps, per
position, the K tokens the engine ranks highest with their logprobs and the logprob of the sequence's own next
token. It is reached two ways:

- ``detail = "prompt-logprobs"`` in the configuration (ServingConfig.detail): forced, whatever hooks could see
  (how this level is tested on vLLM CPU, where the logits level always applies);
- ``detail = "auto"``: the hook capture first (precision.serving.engine.ServingBackend); when it raises
  NoHookLevelError, this level, with the error as the recorded reason. A configuration is captured at one level:
  once a sequence has fallen back, the rest are served at this level too, and a fallback after a sequence was
  captured at a hook level is refused (the prompts could not be compared alike).

Where the data lives (the capture format has no site of this shape: a capture's reader checks every tensor against
[positions, hidden or vocabulary]): each prompt's tensor file holds only ``positions`` (the rows that have a
distribution, r = 0 .. n-2 of the selection: vLLM's prompt position r+1 is predicted from logits row r; the
last position predicts a token the sequence does not hold, and prompt_logprobs has no entry for it); the top-K
itself is the prompt's evidence entry in the manifest's backend record (``serving.evidence[i].prompt_logprobs``:
``top_k``, ``rows``, ``top_ids`` and ``top_logprobs`` [rows][K] by rank, ``actual_logprobs`` [rows]), covered by the
manifest's hash. The comparison is precision.serving.logprob_compare.

vLLM facts this relies on (vLLM 0.32): prompt_logprobs are computed from the same logits the sampler sees (float32
log_softmax); ``max_logprobs`` (default 20) caps K; a request that asks for prompt_logprobs is not served from the
prefix cache (``SamplingParams.skip_reading_prefix_cache`` defaults to True for it: cached positions would have no
prompt logprobs), so a warm-prefix workload at this level recomputes its cached blocks, which the evidence shows
(the cached tokens vLLM reports).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from precision.backends import vllm_compat
from precision.capture.reader import CaptureReader
from precision.capture.sites import CaptureSelection
from precision.errors import BackendError
from precision.names import DETAIL_PROMPT_LOGPROBS, POSITIONS
from precision.serving.engine import COMPANION_NEW_TOKENS, NoHookLevelError, ServingBackend
from precision.serving.logprob_compare import ServedLogprobs

"""The level's name, as ServingConfig.detail spells it ("prompt-logprobs")."""
DEFAULT_TOP_K = 20
"""K when the configuration does not set ``max_logprobs``: vLLM's default max_logprobs, the most it returns."""
LOGPROB_WORKLOADS = ("alone", "cobatch", "warm-prefix")
"""The workloads served at this level (another workload's schedule is not reproduced here: refused, not served alone)."""
FORCED = "forced by the configuration (detail = prompt-logprobs)"
FALLBACK = "fallback: no hook saw every position"


def top_k_for(engine_args: dict[str, Any], vocab_size: int) -> int:
    """The configuration's own ``max_logprobs`` when it sets a positive one (vLLM refuses more), else DEFAULT_TOP_K;
    at most the vocabulary."""
    cap = engine_args.get("max_logprobs")
    wanted = cap if isinstance(cap, int) and not isinstance(cap, bool) and cap > 0 else DEFAULT_TOP_K
    return max(1, min(wanted, vocab_size))


def _entry_lists(entries: dict, top_k: int, actual: int) -> tuple[list[int], list[float], float]:
    """One position's {token: Logprob} as vLLM returns it: the top ``top_k`` by logprob (rank order), the
    teacher-forced token's logprob (vLLM always includes it)."""
    ranked = sorted(((int(t), float(v.logprob), int(v.rank)) for t, v in entries.items()), key=lambda x: (-x[1], x[2]))[:top_k]
    if len(ranked) < top_k:
        raise BackendError(f"vLLM returned {len(ranked)} prompt logprobs at a position, {top_k} were asked for")
    if actual not in entries:
        raise BackendError(f"vLLM's prompt logprobs lack the prompt's own token {actual} at a position")
    return [t for t, _, _ in ranked], [v for _, v, _ in ranked], float(entries[actual].logprob)


class LogprobLevelBackend(ServingBackend):
    """ServingBackend that captures at the prompt-logprobs level when forced or when no hook sees the positions."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.top_k = top_k_for(self.serving.engine_args, self.model.vocab_size)
        self.fallback_reason: str | None = None

    def validate(self) -> None:
        super().validate()
        if self.serving.detail == DETAIL_PROMPT_LOGPROBS:
            self._check_workload()

    def _check_workload(self) -> None:
        if self.serving.workload not in LOGPROB_WORKLOADS:
            raise BackendError(f"serving configuration {self.serving.name!r}: workload {self.serving.workload!r} is not served at the "
                               f"prompt-logprobs level (only {', '.join(LOGPROB_WORKLOADS)}); drop detail = \"prompt-logprobs\" "
                               "or choose one of those workloads")

    def _capture_impl(self, token_ids: list[int], selection: CaptureSelection, path: Path) -> None:
        if self.serving.detail == DETAIL_PROMPT_LOGPROBS:
            return self._capture_logprobs(token_ids, selection, path, FORCED)
        if self.fallback_reason is not None:
            return self._capture_logprobs(token_ids, selection, path, self.fallback_reason)
        try:
            super()._capture_impl(token_ids, selection, path)
        except NoHookLevelError as exc:
            if self.evidence:
                raise BackendError(f"serving configuration {self.serving.name!r}: earlier sequences were captured at the "
                                   f"{self.evidence[0]['level']} level, this one reached no hook ({exc}); the prompts cannot be "
                                   "compared alike: set detail = \"prompt-logprobs\" to capture every sequence at that level") from exc
            self.fallback_reason = f"{FALLBACK} ({exc})"
            self._capture_logprobs(token_ids, selection, path, self.fallback_reason)

    def _serve(self, token_ids: list[int], params: Any) -> tuple[Any, dict[str, Any]]:
        """The sequence served by the configuration's workload with ``params``; its RequestOutput and what the
        serving recorded (companion lengths, cached tokens)."""
        self._check_workload()
        served: dict[str, Any] = {}
        if self._kwargs.get("enable_prefix_caching"):
            served["prefix_cache_reset"] = vllm_compat.reset_prefix_cache(self._llm)
        requests, all_params = [token_ids], [params]
        if self.serving.workload == "cobatch":
            others = self._companion_sequences(token_ids)
            requests += others
            all_params += [vllm_compat.greedy_params(max_tokens=COMPANION_NEW_TOKENS)] * len(others)
            served["companion_lengths"] = [len(o) for o in others]
        prompts = [{"prompt_token_ids": list(ids)} for ids in requests]
        if self.serving.workload == "warm-prefix":
            self._llm.generate(prompts, all_params, use_tqdm=False)
        output = self._llm.generate(prompts, all_params, use_tqdm=False)[0]
        served["cached_tokens"] = getattr(output, "num_cached_tokens", None)
        return output, served

    def _capture_logprobs(self, token_ids: list[int], selection: CaptureSelection, path: Path, reason: str) -> None:
        import torch

        from precision.safetensors_io import write_tensors

        rows = [p for p in selection.position_indices(len(token_ids)) if p < len(token_ids) - 1]
        output, served = self._serve(token_ids, vllm_compat.greedy_params(max_tokens=1, prompt_logprobs=self.top_k))
        entries = getattr(output, "prompt_logprobs", None)
        if entries is None or len(entries) != len(token_ids):
            raise BackendError(f"serving configuration {self.serving.name!r}: vLLM returned prompt logprobs for "
                               f"{None if entries is None else len(entries)} of {len(token_ids)} positions")
        top_ids, top_logprobs, actual = [], [], []
        for r in rows:
            ids, values, own = _entry_lists(entries[r + 1] or {}, self.top_k, token_ids[r + 1])
            top_ids.append(ids)
            top_logprobs.append(values)
            actual.append(own)
        write_tensors(path, {POSITIONS: torch.tensor(rows, dtype=torch.int64)})
        counters = vllm_compat.rpc(self._llm, "parity_counters")[0]
        self.evidence.append({
            "level": DETAIL_PROMPT_LOGPROBS, "why": reason, "calls": {}, "requests": [output.request_id], "steps": [],
            "positions_from_earlier_requests": [], "compilation_counters": {"now": counters},
            "engine_compilations": {k: v - self._counters_before.get(k, 0) for k, v in counters.items()},
            **served, "sequence_length": len(token_ids),
            "prompt_logprobs": {"top_k": self.top_k, "rows": rows, "top_ids": top_ids, "top_logprobs": top_logprobs,
                                "actual_logprobs": actual},
        })

    def _describe_impl(self) -> dict[str, Any]:
        description = super()._describe_impl()
        description["serving"]["prompt_logprobs_top_k"] = self.top_k
        return description


def served_level(served: CaptureReader) -> str | None:
    """DETAIL_PROMPT_LOGPROBS when ``served`` was captured at this level, else None (a hook level)."""
    levels = {e["level"] for e in served.manifest["backend"].get("serving", {}).get("evidence", [])}
    return DETAIL_PROMPT_LOGPROBS if DETAIL_PROMPT_LOGPROBS in levels else None


def served_logprobs(served: CaptureReader) -> list[tuple[str, ServedLogprobs]]:
    """Each prompt's logprobs as this backend recorded them, in the capture's prompt order."""
    evidence = served.manifest["backend"]["serving"]["evidence"]
    if len(evidence) != len(served.prompts):
        raise BackendError(f"{served.path}: {len(evidence)} evidence entries for {len(served.prompts)} prompts; capture again")
    return [(record.id, ServedLogprobs.from_record(entry["prompt_logprobs"], list(record.forced_ids)))
            for record, entry in zip(served.prompts, evidence)]


def level_reason(served: CaptureReader) -> str:
    """Why the capture is at this level, from its first prompt's evidence (one level per configuration)."""
    return served.manifest["backend"]["serving"]["evidence"][0]["why"]


def evidence_summary(served: CaptureReader) -> dict:
    """How this level was established, in the keys the hook levels' summaries use (precision.serving.parity)."""
    evidence = served.manifest["backend"]["serving"]["evidence"]
    counters: dict[str, int] = {}
    for entry in evidence:
        for name, value in entry["engine_compilations"].items():
            if value:
                counters[name] = max(counters.get(name, 0), value)
    counted = ", ".join(f"{k} {v}" for k, v in sorted(counters.items())) or "none moved"
    top_k = served.manifest["backend"]["serving"].get("prompt_logprobs_top_k")
    why = (f"{level_reason(served)}; the engine's own prompt_logprobs, top {top_k} per position and the teacher-forced token's, "
           f"were compared with the baseline's full logits; no layer is visible at this level; vLLM's compilation counters since "
           f"this engine started: {counted}")
    if served.manifest["backend"]["serving"].get("workload") == "warm-prefix":
        why += (f"; vLLM reads no prefix cache for a request that asks for prompt_logprobs (SamplingParams.skip_reading_prefix_cache), "
                f"so the warm request computed every position (cached tokens reported: {[e.get('cached_tokens') for e in evidence]})")
    return {"why": why, "hook_calls": {}, "compilations": sum(v for k, v in counters.items() if "compile" in k or "artifacts_loaded" in k),
            "compilation_counters": counters, "positions_from_cache": 0,
            "cached_tokens_reported": [e.get("cached_tokens") for e in evidence], "requests_per_sequence": [1 for _ in evidence],
            "steps_per_sequence": [], "largest_shared_step": None,
            "companion_lengths": evidence[0].get("companion_lengths") if evidence else None, "top_k": top_k}


def logprob_row(serving, served: CaptureReader, document: dict, verdict) -> dict:
    """The parity row of a configuration captured at this level (the keys of precision.serving.parity's rows; the
    per-position figures under ``logprob_level``)."""
    from precision.analysis.verdict import Status
    from precision.names import NEAR_TIE
    from precision.serving.logprob_compare import ENVELOPE_TOPK_MAX, LEVEL_SITE, R_TOPK, TOPK_DELTA

    envelope = document.get("envelope")
    flips = [f for p in document["prompts"] for f in p["flips"]]
    worst = max(document["prompts"], key=lambda p: p["topk_max"], default=None)
    r_values = [p[R_TOPK] for p in document["prompts"] if p.get(R_TOPK) is not None]
    return {
        "name": serving.name, "settings": serving.to_json(), "verdict": verdict.status.value, "summary": verdict.summary,
        "findings": [f.message for p in verdict.prompts for f in p.findings if f.status is not Status.PASS][:5]
                    + [f.message for f in verdict.findings if f.status is not Status.PASS],
        "level": DETAIL_PROMPT_LOGPROBS, "level_reason": level_reason(served), "evidence": evidence_summary(served),
        "bitwise_identical": None, "first_bitwise_site": None,
        "largest": {"site": LEVEL_SITE, TOPK_DELTA: document["topk_max"],
                    "prompt": worst["id"] if worst else None, "position": worst["worst_position"] if worst else None},
        "logits_relative_l2": None, "logits_R": None, R_TOPK: max(r_values) if r_values else None,
        "envelope_ratio": None if envelope is None else {"site": LEVEL_SITE, "ratio": envelope["ratio"], "configuration": envelope["configuration"],
                                                          "envelope_max": envelope[ENVELOPE_TOPK_MAX]},
        "first_site_beyond_envelope": None,
        "flips": {"total": len(flips), "real": sum(1 for f in flips if not f[NEAR_TIE])},
        "tokens": [], "comparison": None, "logprob_level": document,
    }
