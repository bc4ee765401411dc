"""Device selection without the hardware: what can be checked here of the CUDA and Ascend paths.

An NPU cannot run on this machine, so torch_npu is replaced by a fake module (the only mock in the suite); the
real Ascend path has not run on hardware (see README, 'what was verified where')."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from precision.backends.torch_device import describe_device, resolve_device
from precision.errors import BackendError


def test_cpu_is_the_default_and_described():
    device = resolve_device(None)
    assert device.type == "cpu"
    record = describe_device(device)
    assert record["device"] == "cpu" and record["torch_threads"] >= 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(BackendError, match="cuda.*not.*available|is_available"):
        resolve_device("cuda")


def test_npu_without_torch_npu_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # import torch_npu raises ImportError
    with pytest.raises(BackendError, match="torch_npu"):
        resolve_device("npu")


def test_npu_with_torch_npu_but_no_device(monkeypatch):
    fake = types.ModuleType("torch_npu")
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    monkeypatch.setattr(torch, "npu", types.SimpleNamespace(is_available=lambda: False), raising=False)
    with pytest.raises(BackendError, match="is_available"):
        resolve_device("npu:0")


def test_vllm_platform_detection_here_is_cpu():
    pytest.importorskip("vllm")
    from precision.backends.vllm_compat import cpu_head_sizes, device_type

    assert device_type() == "cpu"
    assert 32 in cpu_head_sizes() and 8 not in cpu_head_sizes()
