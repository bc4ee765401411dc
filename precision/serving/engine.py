"""A vLLM engine in a serving configuration, captured on the same teacher-forced sequences as the eager baseline.

The capture backend (precision.backends.vllm) refuses every setting that breaks "one eager step holds exactly one
prompt". This backend accepts them, because they are what users deploy, and captures at the best level of detail
the configuration allows (see precision.serving.worker):

    layers   the decoder layers' Python hooks fire (eager: chunked prefill, prefix cache, co-batching, TP): every
             site, rows assembled by request and position over however many steps the engine took;
    logits   the model body runs as a compiled graph (enforce_eager=false: torch.compile; its layers' hooks never
             fire): the final-norm state of every position from the outer model's output and the full-vocabulary
             logits from compute_logits, which runs in Python after the graph.

A configuration without either raises NoHookLevelError, and precision.serving.logprob_level captures it at the
third level, the engine's own prompt_logprobs top-K (also what ``detail = "prompt-logprobs"`` asks for).

Workloads (how each teacher-forced sequence is served):
    alone       the sequence is the only request;
    cobatch     submitted in one call with ``companions`` other requests of varied lengths (other prompts of the
                plan, cut to different lengths, each decoding a few tokens), so the scheduler batches them into
                the same steps; only the sequence's own rows are kept;
    warm-prefix the sequence is served twice with the prefix cache on: the second time its full blocks come from
                the cache (the engine reports how many tokens hit), and only the rest is computed; the capture
                holds the computed rows of the warm request and, at the cached positions, the rows of the cold
                request that filled the cache (recorded per prompt as positions_from_earlier_requests);
    preempt     the sequence is submitted after one companion on a KV cache just large enough for both prompts; the
                companion's decode then needs one block more, the scheduler preempts the sequence (the last running
                request) mid-prefill and recomputes it from position 0 later (precision.serving.preemption: the
                plan, and why this is how vLLM 0.32 preempts); the capture keeps the last computation of every
                position and records the first one's bitwise equality, the restarts the worker saw and vLLM's own
                count of the sequence's preemptions.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Sequence

from precision.backends import vllm_compat
from precision.backends.base import Backend, BackendOptions, BackendSpec
from precision.backends.vllm import KV_CACHE_SPACE_VARIABLE, OWNED_SETTINGS, EngineShutdown, VllmBackend
from precision.backends.vllm_compat import device_type
from precision.backends.vllm_platform import CPU_ENV_DEFAULTS, platform_record
from precision.capture.sites import CaptureSelection
from precision.errors import BackendError, PrecisionError
from precision.model import ModelInfo
from precision.names import DETAIL_PROMPT_LOGPROBS
from precision.serving import preemption

log = logging.getLogger(__name__)

SERVING_WORKER_EXTENSION = "precision.serving.worker.ServingWorkerExtension"
WORKLOADS = ("alone", "cobatch", "warm-prefix", "preempt")
WORKLOAD_KEY = "workload"
"""A configuration's own key (not an engine argument) naming its workload; default "alone"."""
COMPANIONS_KEY = "companions"
"""A configuration's own key: how many other requests a co-batched sequence is served with (default 7)."""
DETAIL_KEY = "detail"
"""A configuration's own key: "auto" (the best level the engine allows: layers, else logits) or "prompt-logprobs"
(the engine's own prompt_logprobs top-K only, the level for engines whose model output cannot be reached)."""
DETAILS = ("auto", DETAIL_PROMPT_LOGPROBS)
COMPANION_NEW_TOKENS = 4
"""Tokens each co-batched companion generates: its decode steps share steps with the sequence under test."""
MULTIPROCESS_KEYS = ("tensor_parallel_size", "pipeline_parallel_size")
MULTIPROCESS_VARIABLE = "VLLM_ENABLE_V1_MULTIPROCESSING"


class NoHookLevelError(BackendError):
    """Neither the decoder layers' hooks nor the outer model's forward saw every position of the sequence: the
    configuration's model output is out of reach, and only the engine's own outputs (prompt_logprobs) remain."""


@dataclasses.dataclass(frozen=True)
class ServingConfig:
    """A named serving configuration: engine arguments applied over the eager baseline, and the workload."""

    name: str
    engine_args: dict[str, Any]
    workload: str = "alone"
    companions: int = 7
    detail: str = "auto"

    def __post_init__(self) -> None:
        if self.detail not in DETAILS:
            raise PrecisionError(f"serving configuration {self.name!r}: detail={self.detail!r} is not one of {', '.join(DETAILS)}")
        if self.workload not in WORKLOADS:
            raise PrecisionError(f"serving configuration {self.name!r}: workload={self.workload!r} is not one of {', '.join(WORKLOADS)}")
        if self.companions < 1:
            raise PrecisionError(f"serving configuration {self.name!r}: companions={self.companions} must be at least 1")

    @classmethod
    def from_mapping(cls, name: str, values: dict[str, Any]) -> "ServingConfig":
        values = dict(values)
        workload = values.pop(WORKLOAD_KEY, "alone")
        if workload == "preempt" and COMPANIONS_KEY in values:
            raise PrecisionError(f"serving configuration {name!r}: the preempt workload serves each sequence with one companion sized "
                                 "to the KV cache (precision/serving/preemption.py); remove companions, or use workload=cobatch")
        companions = values.pop(COMPANIONS_KEY, 7)
        detail = values.pop(DETAIL_KEY, "auto")
        if workload == "cobatch" and "max_num_seqs" not in values:
            values["max_num_seqs"] = companions + 1  # the baseline's max_num_seqs=1 would serve them one by one
        if workload == "warm-prefix" and "enable_prefix_caching" not in values:
            values["enable_prefix_caching"] = True
        if not isinstance(workload, str) or not isinstance(detail, str) or isinstance(companions, bool) or not isinstance(companions, int):
            raise PrecisionError(f"serving configuration {name!r}: workload and detail must be strings and companions an integer")
        return cls(name=name, engine_args=values, workload=workload, companions=companions, detail=detail)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "engine_args": self.engine_args, "workload": self.workload,
                **({"companions": self.companions} if self.workload == "cobatch" else {}),
                **({"detail": self.detail} if self.detail != "auto" else {})}

    @property
    def needs_multiprocess(self) -> bool:
        return any(int(self.engine_args.get(key, 1) or 1) > 1 for key in MULTIPROCESS_KEYS)


class ServingBackend(EngineShutdown, Backend):
    """vLLM with the capture-safe baseline settings, then a serving configuration's engine arguments over them.

    The baseline settings and the head padding come from the capture backend (precision.backends.vllm), used as
    a helper: the engine itself is started here, with this package's worker extension."""

    name = "vllm"
    REMOVE_HOOKS_RPC = "parity_remove_hooks"

    def __init__(self, model: ModelInfo, serving: ServingConfig, options: BackendOptions | None = None,
                 companions: Sequence[Sequence[int]] = ()) -> None:
        super().__init__(BackendSpec("vllm"), model, options or BackendOptions())
        self.serving = serving
        self.companions = [list(c) for c in companions]
        self.evidence: list[dict[str, Any]] = []
        self._baseline = VllmBackend(self.spec, model, self.options)
        self._env_set: dict[str, str] = {}
        self._preemption: preemption.PreemptionPlan | None = None

    def validate(self) -> None:
        self._baseline.validate()
        known = vllm_compat.engine_arg_names()
        unknown = sorted(set(self.serving.engine_args) - known) if known is not None else []
        if unknown:
            raise BackendError(f"serving configuration {self.serving.name!r}: unknown vLLM engine setting(s) {unknown}; "
                               "see vLLM's EngineArgs for the names")
        reserved = sorted(set(self.serving.engine_args) & set(OWNED_SETTINGS))
        if reserved:
            raise BackendError(f"serving configuration {self.serving.name!r}: {reserved} are set by precision-check itself "
                               "(the model under test and the capture worker); remove them from the configuration")

    def preemption_plan(self) -> preemption.PreemptionPlan:
        """The preempt workload's KV cache, step budget and companions, sized from the plan's sequences."""
        if self._preemption is None:
            max_len = self._baseline.engine_kwargs()["max_model_len"]
            lengths = [len(c) for c in self.companions] or [max_len - 1]
            settings = {**self._baseline.engine_kwargs(), **self.serving.engine_args}
            block_size = int(settings.get("block_size", preemption.DEFAULT_BLOCK_SIZE))
            self._preemption = preemption.plan_preemption(lengths, max_len, block_size, self.model.max_position_embeddings)
        return self._preemption

    def engine_kwargs(self) -> dict[str, Any]:
        workload = self.preemption_plan().engine_settings() if self.serving.workload == "preempt" else {}
        kwargs = {**self._baseline.engine_kwargs(), **workload, **self.serving.engine_args}
        if self.serving.workload == "cobatch" and "max_num_batched_tokens" not in self.serving.engine_args:
            # The baseline's budget (one sequence per step) would let the sequence share its step with a sliver of
            # one companion at most: room for all of them prefilling together.
            kwargs["max_num_batched_tokens"] = kwargs["max_model_len"] * (self.serving.companions + 1)
        return kwargs

    def _environment_defaults(self, kwargs: dict[str, Any]) -> dict[str, str]:
        if self._device != "cpu":
            return {}
        defaults = {**CPU_ENV_DEFAULTS, MULTIPROCESS_VARIABLE: "1" if self.serving.needs_multiprocess else "0"}
        if "kv_cache_memory_bytes" in kwargs:
            defaults.pop(KV_CACHE_SPACE_VARIABLE)
        if self.serving.needs_multiprocess and os.environ.get(MULTIPROCESS_VARIABLE) == "0":
            # Several workers are processes: the in-process engine cannot hold them.
            return {**{k: v for k, v in defaults.items() if k not in os.environ}, MULTIPROCESS_VARIABLE: "1"}
        return {k: v for k, v in defaults.items() if k not in os.environ}

    def _activate_impl(self) -> None:
        from precision.backends.head_padding import pad_heads
        from precision.default_model import cache_root

        vllm_compat.shield_llvmlite_from_kernel_scan()
        LLM = vllm_compat.llm_class()
        self._device = device_type()
        self._kwargs = self.engine_kwargs()
        head_dim, new_dim = self._baseline._head_dim_padding(self._device)
        self._model_path, self._transform = self.model.path, None
        if new_dim is not None:
            self._model_path = str(pad_heads(self.model, new_dim, cache_root() / "models"))
            self._transform = {"kind": "head-dim-padding", "from": head_dim, "to": new_dim, "path": self._model_path,
                               "why": f"vLLM CPU attention supports head sizes {list(vllm_compat.cpu_head_sizes())}"}
        self._saved_env = {key: os.environ.get(key) for key in self._environment_defaults(self._kwargs)}
        self._env_set = self._environment_defaults(self._kwargs)
        os.environ.update(self._env_set)
        # vLLM's compilation counters are process-wide: an in-process engine's own compilations are the difference
        # from before its start (a multiprocess engine's workers start at zero).
        self._counters_before = {} if self.serving.needs_multiprocess else vllm_compat.compilation_counters()
        log.info("starting vLLM (serving configuration %s) with %s", self.serving.name, self._kwargs)
        try:
            self._llm = LLM(model=self._model_path, tokenizer=self._model_path, worker_extension_cls=SERVING_WORKER_EXTENSION, **self._kwargs)
        except Exception as exc:  # vLLM raises ValueError, TypeError or RuntimeError for settings it refuses
            self._restore_environment()
            first = (str(exc).strip().splitlines() or ["(no message)"])[0][:300]
            raise BackendError(f"vLLM refused serving configuration {self.serving.name!r} ({self._kwargs}): "
                               f"{type(exc).__name__}: {first}") from exc
        vllm_compat.check_engine(self._llm)
        info = vllm_compat.rpc(self._llm, "parity_install_hooks")
        self._num_layers = info[0]["num_layers"]
        self._model_class = info[0]["model_class"]
        if self._num_layers != self.model.num_layers:
            raise BackendError(f"vLLM's model has {self._num_layers} decoder layers, config.json says {self.model.num_layers}")

    def _restore_environment(self) -> None:
        for key, value in getattr(self, "_saved_env", {}).items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env, self._env_set = {}, {}

    def _generate_impl(self, token_ids: list[int], max_new_tokens: int) -> Sequence[int]:
        params = vllm_compat.greedy_params(max_tokens=max_new_tokens, ignore_eos=True,
                                           stop_token_ids=list(self.model.stop_token_ids), seed=self.options.seed)
        return vllm_compat.generate_token_ids(self._llm, token_ids, params)

    def _companion_sequences(self, token_ids: list[int]) -> list[list[int]]:
        """``companions`` requests of varied lengths that are not prefixes of the sequence under test: the other
        sequences of the plan cut to 1/4 .. 4/4 of their length, in turn."""
        pool = [c for c in self.companions if c and c != token_ids[:len(c)]] or [[t for t in reversed(token_ids)]]
        chosen = []
        for index in range(self.serving.companions):
            base = pool[index % len(pool)]
            length = max(1, len(base) * (1 + index % 4) // 4)
            cut = base[:length]
            if cut == token_ids[:len(cut)]:
                cut = cut + [cut[-1]]
            chosen.append(cut)
        return chosen

    def _capture_impl(self, token_ids: list[int], selection: CaptureSelection, path: Path) -> None:
        keep = selection.position_indices(len(token_ids))
        layers = None if selection.layers is None else selection.layer_indices(self._num_layers)
        one = vllm_compat.greedy_params(max_tokens=1)
        served: dict[str, Any] = {}
        if self._kwargs.get("enable_prefix_caching"):
            # The free-running generate before this capture filled the cache with this very prompt: without a reset
            # its first blocks would be served from there and computed by no request the capture sees.
            served["prefix_cache_reset"] = vllm_compat.reset_prefix_cache(self._llm)
        vllm_compat.rpc(self._llm, "parity_arm", token_ids, str(path))
        try:
            if self.serving.workload == "cobatch":
                others = self._companion_sequences(token_ids)
                params = [one] + [vllm_compat.greedy_params(max_tokens=COMPANION_NEW_TOKENS)] * len(others)
                outputs = vllm_compat.generate_many(self._llm, [token_ids, *others], params)
                served["companion_lengths"] = [len(o) for o in others]
            elif self.serving.workload == "preempt":
                outputs = self._serve_preempted(token_ids, one, served)
            elif self.serving.workload == "warm-prefix":
                outputs = vllm_compat.generate_many(self._llm, [token_ids], [one])
                outputs += vllm_compat.generate_many(self._llm, [token_ids], [one])
            else:
                outputs = vllm_compat.generate_many(self._llm, [token_ids], [one])
            served["cached_tokens"] = outputs[-1][1]
        finally:
            results = vllm_compat.rpc(self._llm, "parity_collect", keep, layers)
        rank0 = next((r for r in results if r["rank"] == 0), results[0])
        errors = [f"rank {r['rank']}: {e}" if len(results) > 1 else e for r in results for e in r["errors"]]
        if errors:  # every rank's: a hook that failed on rank 1 alone still makes rank 0's rows suspect
            raise BackendError(" ".join(errors))
        if rank0["level"] is None or rank0["path"] is None:
            raise NoHookLevelError(f"serving configuration {self.serving.name!r}: neither the decoder layers' hooks nor the outer model's "
                               f"forward saw every position of the sequence (hook calls {rank0['calls']}, positions missing "
                               f"{rank0['missing_positions']}); nothing comparable was captured")
        now = rank0["compilation_counters"]["now"]
        served["engine_compilations"] = {k: v - self._counters_before.get(k, 0) for k, v in now.items()}
        self.evidence.append({**{k: rank0[k] for k in ("level", "calls", "requests", "steps", "positions_from_earlier_requests",
                                                       "recomputation", "compilation_counters")},
                              **served, "ranks": sorted(r["rank"] for r in results), "sequence_length": len(token_ids)})

    def _serve_preempted(self, token_ids: list[int], one: Any, served: dict[str, Any]) -> list[tuple[list[int], int | None, int | None]]:
        """The companion first, then the sequence (the scheduler preempts the last running request); what vLLM
        itself counted goes into ``served``."""
        plan = self.preemption_plan()
        companion = plan.companions.get(len(token_ids)) or preemption.companion_for(len(token_ids), plan)
        ids = preemption.companion_tokens(token_ids, self.companions, companion.prompt_length)
        params = [vllm_compat.greedy_params(max_tokens=companion.new_tokens), one]
        outputs = vllm_compat.generate_many(self._llm, [ids, token_ids], params)
        served["companion"] = {"prompt_length": companion.prompt_length, "new_tokens": companion.new_tokens,
                               "predicted_positions_before_preemption": companion.predicted_positions_before_preemption}
        served["engine_preemptions"] = outputs[-1][2]
        served["companion_preemptions"] = outputs[0][2]
        if not served["engine_preemptions"]:
            # Recorded as measured (a configuration may give the cache room on purpose); said, since the workload's
            # name promises a preemption.
            log.warning("serving configuration %s: vLLM reports %s preemption(s) of the %d-token sequence (its KV cache: %s)",
                        self.serving.name, served["engine_preemptions"], len(token_ids),
                        {k: self._kwargs.get(k) for k in ("num_gpu_blocks_override", "block_size", "max_num_batched_tokens")})
        return outputs

    def levels(self) -> set[str]:
        return {e["level"] for e in self.evidence}

    def _describe_impl(self) -> dict[str, Any]:
        return {
            "engine": "vllm",
            "dtype": str(self._kwargs.get("dtype", self.spec.torch_dtype_name)),  # a configuration may serve another dtype
            "settings": {**self._kwargs, "worker_extension_cls": SERVING_WORKER_EXTENSION},
            "model_transform": self._transform,
            "model_class": self._model_class,
            **platform_record(self._device),
            "serving": {**self.serving.to_json(), "evidence": self.evidence,
                        **({"preemption_plan": self.preemption_plan().to_json()} if self.serving.workload == "preempt" else {})},
        }
