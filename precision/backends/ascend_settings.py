"""Engine settings and environment variables that silently break a capture, refused before the engine starts.

Each refusal names the setting, the vllm-ascend (or vLLM) versions it applies to, why the capture would be wrong,
and what to use instead. The rules come from a source reading of vllm-ascend main and tags v0.9.1, v0.11.0,
v0.13.0, v0.18.0 and v0.23.0 (the project's shared notes, vllm-ascend-facts); none was run on an NPU here. A rule
that names an Ascend-only key also fires on a CPU or CUDA build: there the key does nothing, and refusing it keeps
a command line that would break on the NPU box from passing on the CPU box.

Nothing here imports vLLM or vllm-ascend: ``refuse_capture_breaking_settings`` runs from ``VllmBackend.validate``,
before any model loads.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

from precision.errors import BackendError

log = logging.getLogger(__name__)

_FALSE_WORDS = ("", "0", "false", "no", "off", "none")
GRAPH_MODE_NONE = ("NONE", "0", "NO_COMPILATION")
"""Names (and the integer level) under which vLLM's compilation_config means no compilation and no graph capture."""


@dataclass(frozen=True)
class Refusal:
    """One setting that breaks a capture: where it lives, which versions have it, why it breaks, what to do."""

    setting: str
    versions: str
    why: str
    instead: str

    def message(self, value: Any) -> str:
        return f"{self.setting}={value!r} cannot be captured ({self.versions}): {self.why}; {self.instead}"


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in _FALSE_WORDS
    return bool(value)


def _nested(config: Mapping, dotted: str) -> tuple[bool, Any]:
    """(present, value) of ``a.b`` in a nested mapping."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


# -- additional_config (vllm-ascend) ----------------------------------------------------------------------------
ADDITIONAL_CONFIG_REFUSALS: tuple[tuple[str, Callable[[Any], bool], Refusal], ...] = (
    ("xlite_graph_config.enabled", _truthy, Refusal(
        "additional_config.xlite_graph_config.enabled", "vllm-ascend releases with the xlite runner (XliteWorker)",
        "the forward runs inside xlite's own graph, so the Python hooks never fire",
        "remove it (leave xlite off) for the capture")),
    ("torchair_graph_config.enabled", _truthy, Refusal(
        "additional_config.torchair_graph_config.enabled", "vllm-ascend v0.11 and earlier; removed by v0.13",
        "the model runs as a compiled torchair graph built before the hooks exist, and graph replay runs no Python",
        "remove it: the capture runs eagerly (enforce_eager=True, set by precision-check)")),
    ("enable_flashcomm1", _truthy, Refusal(
        "additional_config.enable_flashcomm1", "vllm-ascend v0.23 and later (dense models above 1000 tokens)",
        "FlashComm shards the token rows across tensor-parallel ranks, so rank 0 holds about N/tp padded rows",
        "remove it, or set it to false")),
    ("finegrained_tp_config.lmhead_tensor_parallel_size", lambda v: _truthy(v) and v != 1, Refusal(
        "additional_config.finegrained_tp_config.lmhead_tensor_parallel_size", "vllm-ascend releases with finegrained_tp_config",
        "lmhead_all_to_all raises unless the number of rows is a multiple of it, and the captured logits are sharded",
        "remove it (the lm_head then follows tensor_parallel_size)")),
    ("enable_reduce_sample", _truthy, Refusal(
        "additional_config.enable_reduce_sample", "vllm-ascend releases with reduce-sample",
        "each rank keeps only its vocabulary shard of the logits, so rank 0's full-vocabulary logits are missing",
        "remove it, or set it to false")),
    ("dump_config", _truthy, Refusal(
        "additional_config.dump_config", "vllm-ascend releases with msprobe integration",
        "msprobe's PrecisionDebugger runs every step and at level L1 dumps the capture hooks' own operations",
        "capture without it; compare an msprobe dump in a separate run")),
    ("dump_config_path", _truthy, Refusal(
        "additional_config.dump_config_path", "vllm-ascend releases with msprobe integration",
        "msprobe's PrecisionDebugger runs every step and at level L1 dumps the capture hooks' own operations",
        "capture without it; compare an msprobe dump in a separate run")),
    ("profiling_chunk_config.enabled", _truthy, Refusal(
        "additional_config.profiling_chunk_config.enabled", "vllm-ascend main",
        "the prompt is profiled and scheduled in chunks, so one step no longer sees all of its tokens",
        "remove it for the capture")),
)

# -- environment variables -------------------------------------------------------------------------------------
ENVIRONMENT_REFUSALS: tuple[tuple[str, Refusal], ...] = (
    ("VLLM_USE_V2_MODEL_RUNNER", Refusal(
        "environment VLLM_USE_V2_MODEL_RUNNER", "vLLM and vllm-ascend releases with the V2 model runner",
        "the V2 runner is another class whose model access and step layout the capture hooks were not written for",
        "unset it (or set it to 0)")),
    ("VLLM_ASCEND_ENABLE_FLASHCOMM1", Refusal(
        "environment VLLM_ASCEND_ENABLE_FLASHCOMM1", "vllm-ascend v0.11 to v0.23 and later",
        "FlashComm1 shards the token rows across tensor-parallel ranks, so rank 0 holds about N/tp padded rows",
        "unset it (or set it to 0)")),
    ("VLLM_ASCEND_ENABLE_FLASHCOMM", Refusal(
        "environment VLLM_ASCEND_ENABLE_FLASHCOMM", "vllm-ascend v0.9.1 (renamed FLASHCOMM1 later)",
        "FlashComm shards the token rows across tensor-parallel ranks, so rank 0 holds about N/tp padded rows",
        "unset it (or set it to 0)")),
    # FlashComm2's switch: a parallel size above 0 turns it on. The name is from vllm-ascend's envs.py as read for
    # this project, not from the shared notes (which name FlashComm2 without its variable); the generic rule below
    # catches any other FlashComm variable.
    ("VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE", Refusal(
        "environment VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE (FlashComm2)", "vllm-ascend releases with FlashComm2",
        "FlashComm2 shards the token rows across ranks, so rank 0 holds only its part of each step's rows",
        "unset it (or set it to 0)")),
)
FLASHCOMM_MARK = "FLASHCOMM"
"""Any other VLLM_ASCEND_* variable naming FlashComm, set to a true value, is refused too (a later release's name)."""


def additional_config_of(engine_args: Mapping[str, Any]) -> dict[str, Any]:
    """The additional_config mapping of the engine arguments ({} when absent); a JSON string is parsed."""
    config = engine_args.get("additional_config")
    if config is None:
        return {}
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except json.JSONDecodeError as exc:
            raise BackendError(f"additional_config is not valid JSON ({exc}); pass a JSON object with --additional-config") from exc
    if not isinstance(config, Mapping):
        raise BackendError(f"additional_config must be a JSON object, not {type(config).__name__}; pass one with --additional-config")
    return dict(config)


def refuse_additional_config(engine_args: Mapping[str, Any]) -> None:
    config = additional_config_of(engine_args)
    for dotted, breaks, refusal in ADDITIONAL_CONFIG_REFUSALS:
        present, value = _nested(config, dotted)
        if present and breaks(value):
            raise BackendError(refusal.message(value))
    if "ascend_scheduler_config" in config:
        # Not a capture breaker: ignored silently from v0.13 on, so the user may believe it took effect.
        log.warning("additional_config.ascend_scheduler_config is ignored by vllm-ascend v0.13 and later (it was removed); "
                    "it only takes effect on v0.12 and earlier")


def refuse_environment(environ: Mapping[str, str]) -> None:
    for name, refusal in ENVIRONMENT_REFUSALS:
        if _truthy(environ.get(name, "")):
            raise BackendError(refusal.message(environ[name]))
    for name, value in sorted(environ.items()):
        if name.startswith("VLLM_ASCEND_") and FLASHCOMM_MARK in name and _truthy(value):
            raise BackendError(Refusal(f"environment {name}", "vllm-ascend releases with FlashComm",
                                       "FlashComm shards the token rows across ranks, so rank 0 holds only its part of each step's rows",
                                       "unset it (or set it to 0)").message(value))


# -- parallelism and graph modes (vLLM's own engine arguments) --------------------------------------------------
PARALLEL_REFUSALS = {
    "pipeline_parallel_size": Refusal(
        "pipeline_parallel_size", "all vLLM and vllm-ascend versions",
        "each pipeline stage holds only its own decoder layers, and rank 0 sees neither the later layers nor the logits",
        "use tensor_parallel_size for a model that does not fit one device"),
    "data_parallel_size": Refusal(
        "data_parallel_size", "all vLLM and vllm-ascend versions",
        "each data-parallel engine runs other prompts, padded and scheduled together, outside the hooked worker's view",
        "run one engine (data_parallel_size=1); shard the prompts with 'capture --shard I/N' instead"),
}
COMPILATION_REFUSAL = Refusal(
    "compilation_config", "all vLLM versions; vllm-ascend ACL graphs (PIECEWISE/FULL) in every release",
    "a compiled or graph-captured forward is traced before the hooks exist and graph replay runs no Python, so the hooks "
    "capture nothing", "remove it: precision-check runs the engine eagerly (enforce_eager=True, compilation mode NONE, cudagraph_mode NONE)")


def _graph_setting(value: Any) -> bool:
    """Whether a compilation mode / level / cudagraph mode value asks for compilation or graph capture."""
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    name = getattr(value, "name", value)  # an enum member (CompilationMode.NONE) reads by its name
    return str(name).strip().upper() not in GRAPH_MODE_NONE


def refuse_parallel_and_graph_settings(engine_args: Mapping[str, Any]) -> None:
    for key, refusal in PARALLEL_REFUSALS.items():
        value = engine_args.get(key)
        if value is not None and not isinstance(value, bool) and isinstance(value, int) and value > 1:
            raise BackendError(refusal.message(value))
    compilation = engine_args.get("compilation_config")
    if compilation is None:
        return
    if isinstance(compilation, str):
        try:
            compilation = json.loads(compilation)
        except json.JSONDecodeError:
            pass  # a bare name such as "VLLM_COMPILE" is judged as a mode below
    if isinstance(compilation, Mapping):
        graph = {k: compilation[k] for k in ("mode", "level", "cudagraph_mode") if _graph_setting(compilation.get(k))}
        graph.update({k: compilation[k] for k in ("full_cuda_graph", "use_cudagraph", "cudagraph_capture_sizes")
                      if _truthy(compilation.get(k))})
        if graph:
            raise BackendError(COMPILATION_REFUSAL.message(graph))
    elif _graph_setting(compilation):
        raise BackendError(COMPILATION_REFUSAL.message(compilation))


def refuse_capture_breaking_settings(engine_args: Mapping[str, Any], environ: Mapping[str, str]) -> None:
    """Raise BackendError naming the first setting (engine argument, additional_config key or environment
    variable) under which a capture would be silently wrong or fail late."""
    refuse_environment(environ)
    refuse_parallel_and_graph_settings(engine_args)
    refuse_additional_config(engine_args)
