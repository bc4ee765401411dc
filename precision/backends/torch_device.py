"""Torch device helpers shared by backends: resolving cpu / cuda / npu, and what to record about each.

torch_npu is imported only when an NPU is asked for (it cannot run on machines without Ascend hardware).
"""

from __future__ import annotations

from typing import Any

from precision.errors import BackendError


def resolve_device(requested: str | None):
    import torch

    name = requested or "cpu"
    if name.startswith("npu"):
        try:
            import torch_npu  # noqa: F401  (registers the "npu" device with torch)
        except ImportError as exc:
            raise BackendError("device 'npu' needs torch_npu; install the torch_npu wheel matching your torch and CANN") from exc
        if not torch.npu.is_available():
            raise BackendError("torch_npu is installed but torch.npu.is_available() is False; check the driver and ASCEND_RT_VISIBLE_DEVICES")
    elif name.startswith("cuda") and not torch.cuda.is_available():
        raise BackendError("device 'cuda' asked for, but torch.cuda.is_available() is False on this machine; use 'cpu'")
    return torch.device(name)


def describe_device(device) -> dict[str, Any]:
    import torch

    record: dict[str, Any] = {
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }
    if device.type == "cuda":
        record["device_name"] = torch.cuda.get_device_name(device)
        record["cuda"] = torch.version.cuda
        record["allow_tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        record["allow_bf16_reduced_precision_reduction"] = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    elif device.type == "npu":  # pragma: no cover - needs Ascend hardware
        import torch_npu

        record["soc_version"] = torch_npu.npu.get_soc_version()
        record["torch_npu_git"] = getattr(torch_npu.version, "git_version", None)
        record["cann"] = getattr(torch.version, "cann", None)
        record["allow_hf32_matmul"] = getattr(torch.npu.matmul, "allow_hf32", None)
    return record
