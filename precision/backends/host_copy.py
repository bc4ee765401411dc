"""Captured tensors leave the accelerator inside the forward hook; logits are computed in chunks of bounded size.

An engine on an accelerator (vllm-ascend, CUDA) gives most of the device memory to its KV cache, so a capture
must not keep its tensors there: each hook copies its rows to host memory at once (asynchronously, into pinned
memory where the platform allows it) and the worker waits for all copies once, after the forward. Logits need
the model's head on the device: the captured final-norm rows go back in chunks of at most ``LOGITS_CHUNK_BYTES``
of float32 logits, never rows x vocabulary at once.

Pure torch (no vLLM): the worker (precision.backends.vllm_worker) passes vLLM's ``compute_logits`` in.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

log = logging.getLogger(__name__)

LOGITS_CHUNK_BYTES = 256 * 2**20
"""Upper bound on one chunk's logits on the device, counted as rows x vocabulary x 4 bytes (float32, the widest
dtype logits come in). Read at every call, so a test can lower it to force chunks of a few rows."""


MIN_CHUNK_ROWS = 64
"""A chunk has at least this many rows (or the budget's rows, or all rows, when fewer): a short last chunk joins
the one before it. GEMM libraries take other kernels for a few rows, with other rounding: on vLLM's CPU build
with AMX, the lm_head GEMM of 4 rows or fewer gave 3-4 rows of 300 a value 1 bf16 ulp away from the same rows
in a GEMM of 5 rows or more (all of 5, 6, 7, 8, 16, 17, 64, 100, 299 rows were bitwise equal). So a chunk may
exceed LOGITS_CHUNK_BYTES by fewer than this many rows."""


def logits_chunk_rows(vocabulary: int, budget_bytes: int | None = None) -> int:
    """Rows per logits chunk: the most rows whose float32 logits fit the budget, at least one."""
    budget = LOGITS_CHUNK_BYTES if budget_bytes is None else budget_bytes
    return max(1, int(budget) // (4 * max(1, int(vocabulary))))


class HostCopies:
    """Host-memory copies of tensors, made inside forward hooks; ``synchronize`` once before reading them.

    On the CPU a captured tensor is already in host memory and is a new tensor (the hook selects rows with
    index_select), so it is kept as is: the bytes are those the hook selected, nothing is copied twice. On an
    accelerator the copy is enqueued on the current stream (non_blocking) into a pinned buffer, so the device
    copy can be freed as soon as the stream has run it; where pinned memory cannot be allocated, a pageable
    buffer is used (the copy then waits, which is correct, only slower)."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] = {}  # device type -> a device with copies in flight
        self._pin: bool | None = None  # None: not tried yet on this platform

    def keep(self, tensor: Any) -> Any:
        """A host tensor with ``tensor``'s values (valid after ``synchronize``); ``tensor`` must be a tensor the
        caller owns (a fresh selection), since on the CPU it is returned itself."""
        if on_host(tensor):
            return tensor
        host = self._host_buffer(tensor)
        host.copy_(tensor, non_blocking=True)
        self._pending[tensor.device.type] = tensor.device
        return host

    def _host_buffer(self, tensor: Any) -> Any:
        import torch

        if self._pin is not False:
            try:
                buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                self._pin = True
                return buffer
            except RuntimeError as exc:  # no pinned host allocator on this platform/build
                log.info("pinned host memory unavailable (%s): captured tensors are copied to pageable memory", exc)
                self._pin = False
        return torch.empty(tensor.shape, dtype=tensor.dtype)

    @property
    def pending_devices(self) -> list[str]:
        return sorted(self._pending)

    def synchronize(self) -> None:
        """Wait for every copy enqueued since the last call: one synchronisation per device type used."""
        pending, self._pending = self._pending, {}
        for device_type, device in pending.items():
            device_module(device_type).synchronize(device)


def on_host(tensor: Any) -> bool:
    """Whether ``tensor`` already lies in host memory."""
    return tensor.device.type == "cpu"


def device_module(device_type: str) -> Any:
    """torch's module for a device type (torch.cuda, torch.npu once torch_npu is imported, ...)."""
    import torch

    getter = getattr(torch, "get_device_module", None)
    module = getter(device_type) if getter is not None else getattr(torch, device_type, None)
    if module is None or not hasattr(module, "synchronize"):
        raise RuntimeError(f"torch has no device module with synchronize() for device type {device_type!r}")
    return module


def chunked_logits(compute: Callable[[Any], Any], rows: Any, device: Any, vocabulary: int) -> tuple[Any, int]:
    """Logits of the host tensor ``rows`` (final-norm rows) as a host tensor, computed ``logits_chunk_rows``
    rows at a time on ``device``; and the number of ``compute`` calls made.

    The number of calls depends only on the row count and the vocabulary, never on what ``compute`` returns:
    under tensor parallelism every rank calls it the same number of times (it gathers the vocabulary shards,
    a collective), and a rank that gets None (not the gathering rank) still makes every call. Returns (None,
    calls) on such a rank."""
    total = int(rows.shape[0])
    result, calls = None, 0
    for start, stop in chunk_bounds(total, logits_chunk_rows(vocabulary)):
        chunk = compute(rows[start:stop].to(device))
        calls += 1
        if chunk is None:
            continue
        if result is None:
            result = _host_like(chunk, total)
        result[start:stop].copy_(chunk)  # a device-to-host copy waits for the chunk: bounded memory
    return result, calls


def chunk_bounds(total: int, step: int) -> list[tuple[int, int]]:
    """[start, stop) of each chunk: ``step`` rows each, a last one shorter than min(MIN_CHUNK_ROWS, step) rows
    joined to the one before it; one (empty) chunk when there are no rows."""
    bounds = [(start, min(start + step, total)) for start in range(0, max(total, 1), step)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < min(MIN_CHUNK_ROWS, step):
        (start, _), (_, stop) = bounds[-2], bounds[-1]
        bounds[-2:] = [(start, stop)]
    return bounds


def _host_like(chunk: Any, total_rows: int) -> Any:
    import torch

    return torch.empty((total_rows, *chunk.shape[1:]), dtype=chunk.dtype)
