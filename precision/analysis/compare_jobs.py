"""The per-site work of a comparison (precision.analysis.compare), as jobs for the metric worker threads.

A bf16 capture's tensors are compared as stored: their bits are mapped from the file and handed to the bf16
kernels (precision.metrics.fused.bf16_accumulate, precision.metrics.logits.logits_and_element_sums_bf16), with no float
copy of either side. Other dtypes, pairs holding NaN or Inf, and msprobe's convention take the general path
(values widened to float32 or float64). Both paths give the same numbers to float64 rounding (tests/metrics).
Jobs run on the metric workers (one per core; the kernels release the GIL, and so do file reads), a bounded
number at a time so that memory holds a few tensors, and their results are used in the order they were asked for.
"""

from __future__ import annotations

import math
import mmap
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from precision.capture.arrays import TensorFile
from precision.errors import CaptureFormatError
from precision.metrics import logits_stats, tensor_stats
from precision.metrics.logits import LogitsStats, logits_and_element_sums_bf16
from precision.metrics.tensor import TensorStats, _workers, bf16_stats, widen_bf16, worker_count

FAST_CONVENTION = "precision-check"
"""The convention the bf16 kernels compute (msprobe's relative errors need float32 values: general path)."""
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
"""Linux: map the pages in one call instead of one fault per 4 KiB page."""
IN_FLIGHT_PER_WORKER = 2
"""Jobs submitted ahead per worker: enough to keep every core busy while one job's results are used."""


def in_order(job: Callable, arguments: Iterable[tuple]) -> Iterator:
    """job(*args) for each args on the worker threads, yielded in the order given, with at most
    IN_FLIGHT_PER_WORKER jobs per worker submitted and not yet used."""
    pool = _workers()
    window = IN_FLIGHT_PER_WORKER * worker_count()
    pending: deque = deque()
    for args in arguments:
        pending.append(pool.submit(job, *args))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def stored_bf16(handles: Iterable[TensorFile | None], name: str) -> bool:
    """True when every given handle stores tensor ``name`` as bf16."""
    return all(h is None or h.dtype_name(name) == "BF16" for h in handles)


def bf16_bits(handle: TensorFile, name: str, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a bf16 tensor as its stored bits (uint16, flat), memory-mapped read-only: the
    kernels read the page cache in place (a plain read copies every byte once more, which costs as much as the
    kernels' pass). Only these rows are mapped, and only while the returned array lives, so a process's
    resident memory holds the tensors in flight, not the file. The header was checked when ``handle`` was
    opened (the byte range lies inside the file); the file's size is checked again here, because touching a
    mapped page past the end of a file that shrank since would kill the process (SIGBUS) instead of raising."""
    shape = handle.shape(name)
    offset, _ = handle.byte_range(name)
    row = math.prod(shape[1:]) if shape else 1
    stop = min(stop, shape[0]) if shape else 1
    first = offset + start * row * 2
    count = max(stop - start, 0) * row
    if count == 0:
        return np.zeros(0, dtype=np.uint16)
    aligned = first - first % mmap.ALLOCATIONGRANULARITY
    with open(handle.path, "rb") as file:
        if os.fstat(file.fileno()).st_size < first + 2 * count:
            raise CaptureFormatError(f"{handle.path}: tensor {name!r} is cut short (the file shrank while it was compared); capture again")
        mapped = mmap.mmap(file.fileno(), first - aligned + 2 * count, flags=mmap.MAP_SHARED | _POPULATE,
                           prot=mmap.PROT_READ, offset=aligned)
    return np.frombuffer(mapped, dtype=np.uint16, count=count, offset=first - aligned)


def site_job(eh: TensorFile, ah: TensorFile, th: TensorFile | None, site: str,
             convention: str) -> tuple[TensorStats, tuple[TensorStats, TensorStats] | None]:
    """The element-wise metrics of one site (target vs reference) and, with a truth, of both sides vs the truth."""
    shape = eh.shape(site)
    rows = shape[0] if shape else 1
    if convention == FAST_CONVENTION and stored_bf16((eh, ah), site):
        eb, ab = bf16_bits(eh, site, 0, rows), bf16_bits(ah, site, 0, rows)
        pair = bf16_stats(eb, ab, shape)
        e = a = None
        if th is not None:
            e, a = widen_bf16(eb).reshape(shape), widen_bf16(ab).reshape(shape)
    else:
        e, a = eh.array(site), ah.array(site)
        pair = tensor_stats(e, a, convention=convention)
    if th is None:
        return pair, None
    t = th.array(site)
    return pair, (tensor_stats(t, e), tensor_stats(t, a))


def logits_block_job(eh: TensorFile, ah: TensorFile, site: str, start: int, stop: int, convention: str,
                     values_wanted: bool) -> tuple[tuple | None, LogitsStats, np.ndarray | None, np.ndarray | None]:
    """One block of logits rows: (the bf16 kernel's element-wise sums, or None when the caller must add the
    values itself), the per-position metrics, and the values (float) when the sums are None or
    ``values_wanted`` (the truth needs them); None otherwise."""
    width = eh.shape(site)[1]
    if convention == FAST_CONVENTION and stored_bf16((eh, ah), site):
        eb, ab = bf16_bits(eh, site, start, stop), bf16_bits(ah, site, start, stop)
        part, sums = logits_and_element_sums_bf16(eb.reshape(-1, width), ab.reshape(-1, width))
        if sums is not None and not values_wanted:
            return sums, part, None, None
        return sums, part, widen_bf16(eb).reshape(-1, width), widen_bf16(ab).reshape(-1, width)
    e, a = eh.rows(site, start, stop), ah.rows(site, start, stop)
    return None, logits_stats(e, a), e, a
