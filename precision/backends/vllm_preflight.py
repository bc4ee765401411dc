"""Preflight and fingerprint, read inside vLLM's worker: what really runs the model, and on what.

The driver process cannot see what matters on an Ascend host: vllm-ascend's batch-invariant mode sets
HCCL_DETERMINISTIC, LCCL_DETERMINISTIC, weight_nz_mode and deterministic algorithms in the worker, the worker and
model-runner classes are chosen there, and the graph mode is decided by the worker's copy of the configuration.
So the capture asks the worker (``precision_preflight``, an RPC of the worker extension) before it installs hooks,
refuses to start when any graph mode is active (hooks capture nothing under graph replay), and records the answer
in the capture manifest's backend description (``worker``).

Every read is guarded: an attribute or module that is missing (an older torch_npu, a CPU host, a renamed vLLM
field) yields None, never an exception; the preflight reports, it does not require. vLLM and vllm-ascend are
reached only through precision.backends.vllm_compat (its ``require`` and ``import_attr``, guarded here).

Verified on real hardware: vLLM's CPU build (0.32). The Ascend reads are written from vllm-ascend's and torch_npu's
sources (shared notes, vllm-ascend-facts) and tested with fake torch_npu / vllm_ascend modules only.
"""

from __future__ import annotations

import enum
import importlib
import json
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

from precision.backends import vllm_compat
from precision.backends.compat import distribution_version
from precision.backends.vllm_worker import CaptureWorkerExtension
from precision.errors import BackendError

WORKER_ENVIRONMENT = (
    "HCCL_DETERMINISTIC", "LCCL_DETERMINISTIC", "ATB_MATMUL_SHUFFLE_K_ENABLE", "ATB_LLM_LCOC_ENABLE",
    "VLLM_BATCH_INVARIANT", "VLLM_ASCEND_ENABLE_NZ", "VLLM_ASCEND_ENABLE_FLASHCOMM1", "VLLM_ASCEND_ENABLE_FLASHCOMM",
    "VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE", "VLLM_ASCEND_ENABLE_MATMUL_ALLREDUCE", "VLLM_USE_V2_MODEL_RUNNER",
    "INF_NAN_MODE_ENABLE", "TASK_QUEUE_ENABLE", "ASCEND_RT_VISIBLE_DEVICES", "ASCEND_LAUNCH_BLOCKING",
    "VLLM_ENABLE_V1_MULTIPROCESSING", "OMP_NUM_THREADS",
)
"""Variables that change numerics or determinism on an Ascend host (vllm-ascend faqs.md and source, per the shared
notes); recorded as the worker sees them, None when unset."""
WORKER_ENVIRONMENT_PREFIXES = ("PYTORCH_NPU_", "VLLM_CPU_")
"""Every variable under these prefixes is recorded too (torch_npu's allocator and op switches; vLLM CPU's threads)."""

SOC_FAMILIES: tuple[tuple[range, str], ...] = (
    (range(200, 206), "310P"),
    (range(220, 226), "A2"),
    (range(250, 256), "A3"),
    (range(260, 261), "A5"),
)
"""torch_npu.npu.get_soc_version() -> chip family. Source: vllm-ascend vllm_ascend/device/hardware.py (as read
for the shared notes): 220-225 A2 (Atlas 800I/900 A2), 250-255 A3, 200-205 310P, 260 A5."""

CANN_MODULES = ("CANN", "RUNTIME", "HCCL", "OPP_KERNEL", "DRIVER")
"""The components torch_npu.utils.get_cann_version(module=...) is asked for."""

TOOLKIT_INFO = "ascend_toolkit_install.info"
DRIVER_INFO = Path("/usr/local/Ascend/driver/version.info")
_MAX_ITEMS = 200


def soc_family(soc_version: Any) -> str | None:
    """The chip family of a SoC version number (None when unknown or not a number)."""
    try:
        number = int(soc_version)
    except (TypeError, ValueError):
        return None
    return next((family for numbers, family in SOC_FAMILIES if number in numbers), None)


# -- guarded reads --------------------------------------------------------------------------------------------------
def guarded(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``function(*args, **kwargs)``, or None when it raises: a fingerprint field the host cannot answer is null."""
    try:
        return function(*args, **kwargs)
    except Exception:  # any failure of an optional read: older torch_npu, no device, renamed attribute
        return None


def attr_path(obj: Any, dotted: str) -> Any:
    """``obj.a.b.c`` for ``dotted`` "a.b.c", None as soon as a link is missing."""
    for name in dotted.split("."):
        if obj is None:
            return None
        obj = guarded(getattr, obj, name)
    return obj


def engine_attr(module_name: str, dotted: str) -> Any:
    """An attribute of a vLLM / vllm-ascend module, imported through vllm_compat; None when absent."""
    head, _, rest = dotted.partition(".")
    found = guarded(vllm_compat.import_attr, module_name, head)
    return attr_path(found, rest) if rest and found is not None else found


def class_name(obj: Any) -> str | None:
    return None if obj is None else type(obj).__name__


def plain_data(value: Any, depth: int = 0) -> Any:
    """A JSON-able copy of a configuration object (vllm-ascend's AscendConfig and its sub-configs): public
    attributes, three levels deep; anything else by its repr, shortened."""
    if isinstance(value, enum.Enum):  # before int: vLLM's CompilationMode is an IntEnum, recorded by its name
        return value.name
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if depth >= 3:
        return repr(value)[:200]
    if isinstance(value, Mapping):
        return {str(k): plain_data(v, depth + 1) for k, v in list(value.items())[:_MAX_ITEMS]}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain_data(v, depth + 1) for v in list(value)[:_MAX_ITEMS]]
    attributes = guarded(vars, value)
    if isinstance(attributes, dict):
        # vllm_config is the whole engine configuration, recorded elsewhere; callables are not settings.
        return {k: plain_data(v, depth + 1) for k, v in list(attributes.items())[:_MAX_ITEMS]
                if not k.startswith("_") and k != "vllm_config" and not callable(v)}
    return repr(value)[:200]


# -- the fingerprint ------------------------------------------------------------------------------------------------


def read_key_values(path: Path) -> dict[str, str] | None:
    """``key=value`` lines of an Ascend install-info file; None when it cannot be read."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line)
    return {key.strip(): value.strip() for key, value in pairs}


def toolkit_install_info(environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """The CANN toolkit's install info (as vllm-ascend's collect_env.py reads it): the first readable
    ``<toolkit>/<arch>-linux/ascend_toolkit_install.info`` or ``<toolkit>/ascend_toolkit_install.info``."""
    environ = os.environ if environ is None else environ
    roots = [environ.get("ASCEND_TOOLKIT_HOME"), environ.get("ASCEND_HOME_PATH"), "/usr/local/Ascend/ascend-toolkit/latest"]
    for root in filter(None, roots):
        for path in (Path(root) / f"{platform.machine()}-linux" / TOOLKIT_INFO, Path(root) / TOOLKIT_INFO):
            values = read_key_values(path)
            if values is not None:
                return {"path": str(path), **values}
    return None


def cann_versions(torch_npu: Any, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """CANN component versions from torch_npu.utils.get_cann_version; where it cannot answer (older torch_npu),
    the toolkit's install info for CANN and the driver's version.info for DRIVER, with the source named."""
    get_version = attr_path(torch_npu, "utils.get_cann_version")
    versions: dict[str, Any] = {m: guarded(get_version, module=m) if callable(get_version) else None for m in CANN_MODULES}
    sources = {m: "torch_npu.utils.get_cann_version" for m, v in versions.items() if v}
    if not versions["CANN"]:
        info = toolkit_install_info(environ)
        if info is not None and info.get("version"):
            versions["CANN"], sources["CANN"] = info["version"], info["path"]
    if not versions["DRIVER"]:
        driver = read_key_values(DRIVER_INFO)
        if driver and (driver.get("Version") or driver.get("version")):
            versions["DRIVER"], sources["DRIVER"] = driver.get("Version") or driver.get("version"), str(DRIVER_INFO)
    return {"versions": versions, "sources": sources}


def _import_torch_npu() -> Any:
    try:
        return importlib.import_module("torch_npu")
    except Exception:  # not installed (CPU/CUDA host), or installed without a usable CANN
        return None


def fingerprint(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """What the worker runs on: vllm_ascend, torch_npu, CANN, the SoC and its family, device name, HF32 switches,
    deterministic algorithms and vllm-ascend's custom ops. Fields a host cannot answer are None."""
    import torch

    torch_npu = _import_torch_npu()
    npu = getattr(torch, "npu", None) if torch_npu is not None else None
    soc = guarded(attr_path(torch_npu, "npu.get_soc_version")) if torch_npu is not None else None
    custom_ops = engine_attr("vllm_ascend.utils", "enable_custom_op")
    return {
        "vllm_ascend": distribution_version("vllm-ascend", "vllm_ascend") or engine_attr("vllm_ascend", "__version__"),
        "vllm_ascend_build_device_type": engine_attr("vllm_ascend._build_info", "__device_type__"),
        "torch": torch.__version__,
        "torch_npu": attr_path(torch_npu, "__version__"),
        "torch_npu_git": attr_path(torch_npu, "version.git_version"),
        "cann": cann_versions(torch_npu, environ) if torch_npu is not None else None,
        "soc_version": soc,
        "chip_family": soc_family(soc),
        "device_name": guarded(attr_path(npu, "get_device_name")) if npu is not None else None,
        "allow_hf32_matmul": attr_path(npu, "matmul.allow_hf32"),
        "allow_hf32_conv": attr_path(npu, "conv.allow_hf32"),
        "deterministic_algorithms": guarded(torch.are_deterministic_algorithms_enabled),
        "custom_ops_available": guarded(custom_ops) if callable(custom_ops) else None,
    }


def worker_environment(environ: Mapping[str, str] | None = None) -> dict[str, str | None]:
    environ = os.environ if environ is None else environ
    record: dict[str, str | None] = {name: environ.get(name) for name in WORKER_ENVIRONMENT}
    record.update({k: v for k, v in sorted(environ.items()) if k.startswith(WORKER_ENVIRONMENT_PREFIXES)
                   or (k.startswith("VLLM_ASCEND_") and "FLASHCOMM" in k)})
    return record


# -- the engine as the worker runs it ---------------------------------------------------------------------------------
def engine_state(worker: Any) -> dict[str, Any]:
    """Worker and model-runner classes and every switch that decides whether a graph runs instead of Python."""
    runner = guarded(vllm_compat.require, "Worker.model_runner", worker, "model_runner")
    compilation = attr_path(worker, "vllm_config.compilation_config")
    ascend = ascend_config(worker)
    return {
        "worker_class": class_name(worker),
        "model_runner_class": class_name(runner),
        "runner_model_class": class_name(guarded(getattr, runner, "model")),  # ACLGraphWrapper when a graph wraps it
        "compilation_mode": plain_data(attr_path(compilation, "mode")),
        "compilation_level": plain_data(attr_path(compilation, "level")),  # the name before vLLM 0.11
        "cudagraph_mode": plain_data(attr_path(compilation, "cudagraph_mode")),
        "enforce_eager": attr_path(worker, "vllm_config.model_config.enforce_eager"),
        "use_aclgraph": attr_path(runner, "use_aclgraph"),
        "torchair_graph_enabled": attr_path(ascend, "torchair_graph_config.enabled"),
        "xlite_graph_enabled": attr_path(ascend, "xlite_graph_config.enabled"),
    }


def ascend_config(worker: Any = None) -> Any:
    """vllm-ascend's effective configuration object (get_ascend_config()), None without vllm-ascend."""
    get = engine_attr("vllm_ascend.ascend_config", "get_ascend_config")
    return guarded(get) if callable(get) else None


def module_classes(model: Any) -> dict[str, str | None]:
    """Class names of the modules that compute what is captured (vllm-ascend swaps in Ascend* subclasses)."""
    decoder = attr_path(model, "model")
    layers = attr_path(decoder, "layers")
    first = guarded(lambda: layers[0]) if layers is not None else None
    attention = attr_path(first, "self_attn.attn")
    return {
        "model": class_name(model),
        "embedding": class_name(attr_path(decoder, "embed_tokens")),
        "decoder_layer": class_name(first),
        "input_norm": class_name(attr_path(first, "input_layernorm")),
        "output_norm": class_name(attr_path(decoder, "norm")),
        "attention": class_name(attention),
        "attention_impl": class_name(attr_path(attention, "impl")),
        "rotary_embedding": class_name(attr_path(first, "self_attn.rotary_emb")),
        "mlp_activation": class_name(attr_path(first, "mlp.act_fn")),
        "logits_processor": class_name(attr_path(model, "logits_processor")),
        "lm_head": class_name(attr_path(model, "lm_head")),
    }


def preflight_record(worker: Any, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Everything the driver records about a worker (one rank), as plain JSON types: vLLM's multiprocess engine
    serialises RPC results with msgspec, which refuses str subclasses such as torch's TorchVersion."""
    model = guarded(vllm_compat.worker_model, worker)
    config = ascend_config(worker)
    return json.loads(json.dumps({
        "rank": guarded(vllm_compat.worker_rank, worker),
        "engine": engine_state(worker),
        "modules": module_classes(model) if model is not None else None,
        "ascend_config": plain_data(config) if config is not None else None,
        "environment": worker_environment(environ),
        "fingerprint": fingerprint(environ),
    }, default=repr))


def graph_mode_reasons(record: Mapping[str, Any]) -> list[str]:
    """Why a worker's model runs as a compiled or captured graph (empty: it runs eagerly, hooks fire)."""
    state = record.get("engine") or {}
    reasons = []
    for key in ("compilation_mode", "compilation_level", "cudagraph_mode"):
        value = state.get(key)
        if value is not None and str(value).upper() not in ("NONE", "0", "NO_COMPILATION"):
            reasons.append(f"{key}={value}")
    if state.get("enforce_eager") is False:
        reasons.append("enforce_eager=False")
    for key in ("use_aclgraph", "torchair_graph_enabled", "xlite_graph_enabled"):
        if state.get(key) is True:
            reasons.append(f"{key}=True")
    if str(state.get("worker_class") or "").startswith("Xlite"):
        reasons.append(f"worker {state['worker_class']}")
    if str(state.get("runner_model_class") or "").endswith("GraphWrapper"):
        reasons.append(f"the model runner holds a {state['runner_model_class']}")
    return reasons


def refuse_graph_modes(records: list[Mapping[str, Any]]) -> None:
    """Raise when any rank's worker would run a graph; the message names the rank and the switches."""
    for record in records:
        reasons = graph_mode_reasons(record)
        if reasons:
            raise BackendError(
                f"the vLLM worker (rank {record.get('rank')}) runs the model as a compiled or captured graph ({', '.join(reasons)}): "
                "forward hooks do not fire under graph replay, so nothing would be captured; remove the compilation_config / "
                "additional_config graph settings (precision-check already sets enforce_eager=True); see docs/ascend.md")


# -- the worker extension ------------------------------------------------------------------------------------------
class PreflightWorkerExtension:
    """Mixed into vLLM's worker: ``self`` is the worker."""

    def precision_preflight(self) -> dict[str, Any]:
        return preflight_record(self)


class PrecisionWorkerExtension(PreflightWorkerExtension, CaptureWorkerExtension):
    """The worker extension the vLLM backend installs: the capture hooks plus the preflight. Composed here so the
    capture module stays about hooks only."""


# -- teardown between engines in one process --------------------------------------------------------------------------
def clear_ascend_config() -> bool:
    """vllm-ascend's clear_ascend_config(), where it exists (True when called): v0.11's init_ascend_config otherwise
    returns the previous engine's global configuration. vllm-ascend's own tests call it between engines."""
    clear = engine_attr("vllm_ascend.ascend_config", "clear_ascend_config")
    return callable(clear) and guarded(lambda: (clear(), True)[1]) is True


def cleanup_distributed() -> bool:
    """vLLM's cleanup_dist_env_and_memory(), where it exists (True when called): destroys the model-parallel groups
    and the distributed environment and drops vLLM's environment-variable cache, so the next engine in this process
    starts from the current environment (vLLM's and vllm-ascend's tests call it between engines)."""
    cleanup = engine_attr("vllm.distributed.parallel_state", "cleanup_dist_env_and_memory")
    return callable(cleanup) and guarded(lambda: (cleanup(), True)[1]) is True


def tear_down_globals(device: str) -> dict[str, bool]:
    """What a stopped engine leaves in this process, cleared so the next engine starts clean: vLLM's distributed
    state, and on Ascend vllm-ascend's global configuration. Returns which of them were called."""
    done = {"cleanup_dist_env_and_memory": cleanup_distributed()}
    if device == "npu":
        done["clear_ascend_config"] = clear_ascend_config()
    return done


SHARED_MEMORY_DIRECTORY = Path("/dev/shm")
def remove_shared_memory(identities: list[Any], directory: Path = SHARED_MEMORY_DIRECTORY) -> list[str]:
    """vLLM CPU's tensor-parallel ranks exchange tensors through shared-memory files named
    ``<engine identity>-<group>-cpushm_<rank>`` (vllm/distributed/device_communicators/cpu_communicator.py, 0.32),
    which vLLM never unlinks: 16 MiB left per TP 2 engine. After a shutdown, the files of the stopped engine's own
    identities (read from its workers) are removed, nothing else; returns their names."""
    removed = []
    for identity in {i for i in identities if isinstance(i, str) and i and "/" not in i}:
        try:
            entries = list(os.scandir(directory))
        except OSError:
            return removed
        for entry in entries:
            if entry.name.startswith(f"{identity}-") and "-cpushm" in entry.name:
                try:
                    os.unlink(entry.path)
                    removed.append(entry.name)
                except FileNotFoundError:
                    pass
    return sorted(removed)
