"""The per-site work of a comparison (precision.analysis.compare), as jobs for the metric worker threads.

A bf16 capture's tensors are compared as stored: their bits are read from the file and handed to the bf16
kernels (precision.metrics.fused.bf16_accumulate, precision.metrics.logits.logits_stats_bf16), with no float
copy of either side. Other dtypes, pairs holding NaN or Inf, and msprobe's convention take the general path
(values widened to float32 or float64). Both paths give the same numbers to float64 rounding (tests/metrics).
Jobs run on the metric workers (one per core; the kernels release the GIL, and so do file reads), a bounded
number at a time so that memory holds a few tensors, and their results are used in the order they were asked for.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from precision.capture.arrays import TensorFile
from precision.metrics import logits_stats, tensor_stats
from precision.metrics.logits import LogitsStats, logits_stats_bf16
from precision.metrics.tensor import TensorStats, _workers, bf16_stats, widen_bf16

FAST_CONVENTION = "precision-check"
"""The convention the bf16 kernels compute (msprobe's relative errors need float32 values: general path)."""
IN_FLIGHT_PER_WORKER = 2
"""Jobs submitted ahead per worker: enough to keep every core busy while one job's results are used."""


def in_order(job: Callable, arguments: Iterable[tuple]) -> Iterator:
    """job(*args) for each args on the worker threads, yielded in the order given, with at most
    IN_FLIGHT_PER_WORKER jobs per worker submitted and not yet used."""
    pool = _workers()
    window = IN_FLIGHT_PER_WORKER * pool._max_workers
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
    """Rows [start, stop) of a bf16 tensor as its stored bits (uint16, flat), with one plain file read."""
    return handle._raw(name, start, stop)  # the reader's own checked read, without the float32 widening of rows()


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
    from precision.metrics import fused
    from precision.names import RELATIVE_ERROR_FLOOR

    width = eh.shape(site)[1]
    if convention == FAST_CONVENTION and stored_bf16((eh, ah), site):
        eb, ab = bf16_bits(eh, site, start, stop), bf16_bits(ah, site, start, stop)
        sums = fused.bf16_accumulate(eb, ab, RELATIVE_ERROR_FLOOR)
        part = logits_stats_bf16(eb.reshape(-1, width), ab.reshape(-1, width))
        if sums is not None and not values_wanted:
            return sums, part, None, None
        return sums, part, widen_bf16(eb).reshape(-1, width), widen_bf16(ab).reshape(-1, width)
    e, a = eh.rows(site, start, stop), ah.rows(site, start, stop)
    return None, logits_stats(e, a), e, a
