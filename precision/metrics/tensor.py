"""All element-wise metrics of a tensor pair in one streamed pass (TensorStats), in float64.

The definitions are the single-metric functions in precision.metrics.elementwise (re-exported here); the tests
hold this module's results against them. NaN and Inf are never dropped silently: the error metrics are computed
over the elements that are finite on both sides, and ``non_finite`` counts and locates the rest per element.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np

from precision.metrics import fused
from precision.metrics.arrays import as_numpy
from precision.metrics.elementwise import (  # noqa: F401  (re-exported: callers import them from here)
    _SAFE_RANGE,
    BF16_INF_MAGNITUDE,
    BF16_UNIT_ROUNDOFF,
    RELATIVE_ERROR_FLOOR,
    ULP_BUCKETS,
    _bf16_ordered_bits,
    _cosine,
    _dot,
    _elementwise_relative,
    _finite_pair,
    _norm,
    _relative_l2,
    bf16_ulp_distance,
    cosine_similarity,
    err_ratio_below,
    euclidean_distance,
    five_thousandths_err_ratio,
    max_abs_error,
    max_relative_error,
    mean_abs_error,
    one_thousandth_err_ratio,
    relative_l2_error,
    ulp_histogram,
)
from precision.metrics.msprobe import MsprobeAccumulator, check_convention
from precision.metrics.nonfinite import NonFinite, NonFiniteCounter, non_finite  # noqa: F401


@dataclass(frozen=True)
class TensorStats:
    """Every element-wise metric of one tensor pair (see each function in precision.metrics.elementwise for its
    definition). ``convention`` says whose definitions cosine, euclidean_distance, max_abs, max_relative and the two
    err ratios follow: "precision-check" (this tool's: float64, elements finite on both sides, the 1e-6 relative-error
    floor) or "msprobe" (msprobe's compare, exactly; see precision.metrics.msprobe). relative_l2, mean_abs,
    ulp_shares, expected_l2 and non_finite are this tool's in both."""

    relative_l2: float
    max_abs: float
    max_relative: float
    mean_abs: float
    cosine: float
    one_thousandth_err_ratio: float
    five_thousandths_err_ratio: float
    ulp_shares: dict[str, float]
    expected_l2: float
    elements: int
    non_finite: NonFinite
    euclidean_distance: float
    convention: str


_CHUNK = 1 << 20
"""Elements per chunk: large enough to amortize a thread hand-off, small enough to stay near the cache."""
_pool: ThreadPoolExecutor | None = None


def _workers() -> ThreadPoolExecutor:
    """Threads for the chunk kernels (numba's releases the GIL, numpy's mostly does): one per core, at most four."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="precision-metrics")
    return _pool


def _numpy_accumulate(e_part: np.ndarray, a_part: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fused kernel's accumulators (see precision.metrics.fused) computed with numpy, for machines without numba."""
    out = np.zeros(fused.N_ACCUMULATORS)
    e, a = e_part.astype(np.float64), a_part.astype(np.float64)
    d = a - e
    out[0], out[1], out[2], out[3] = _dot(e, e), _dot(a, a), _dot(d, d), _dot(e, a)
    np.abs(d, out=d)
    out[4], out[5] = float(d.sum()), float(d.max())
    np.abs(e, out=e)
    np.maximum(e, RELATIVE_ERROR_FLOOR, out=e)
    np.divide(d, e, out=d)
    out[6], out[7], out[8] = float(d.max()), np.count_nonzero(d < 1e-3), np.count_nonzero(d < 5e-3)
    bits_e, bits_a = _bf16_ordered_bits(e_part), _bf16_ordered_bits(a_part)
    bucket = np.minimum(np.abs(bits_a - bits_e), 3)
    bucket[(np.abs(bits_e) >= BF16_INF_MAGNITUDE) & (np.abs(bits_a) >= BF16_INF_MAGNITUDE)] = 4
    return out, np.bincount(bucket, minlength=fused.N_ULP_BUCKETS)[:fused.N_ULP_BUCKETS].astype(np.int64)


def _chunk(e: np.ndarray, a: np.ndarray, filter_non_finite: bool):
    if filter_non_finite:
        keep = np.isfinite(e) & np.isfinite(a)
        e, a = e[keep], a[keep]
    if e.size == 0:
        return np.zeros(fused.N_ACCUMULATORS), np.zeros(fused.N_ULP_BUCKETS, dtype=np.int64), 0
    if fused.available() and e.dtype == np.float32 and a.dtype == np.float32:
        out, ulp = fused.fused_accumulate(e, a, RELATIVE_ERROR_FLOOR)
    else:
        out, ulp = _numpy_accumulate(e, a)
    return out, ulp, e.size


class StreamingStats:
    """tensor_stats over a tensor that arrives in blocks (rows of a logits matrix read from disk, say), so that
    memory holds one block pair rather than the whole tensor. Blocks must come in row-major order. ``convention``:
    "precision-check" (default) or "msprobe" (see TensorStats; msprobe's numbers come from a numpy pass of their own
    beside the fused kernel, so that convention costs a few more passes over each block)."""

    def __init__(self, shape: tuple[int, ...], convention: str = "precision-check") -> None:
        self.shape = tuple(shape)
        self.convention = check_convention(convention)
        self._msprobe = MsprobeAccumulator() if convention == "msprobe" else None
        self._acc = np.zeros(fused.N_ACCUMULATORS)
        self._ulp = np.zeros(fused.N_ULP_BUCKETS, dtype=np.int64)
        self._count = 0
        self._non_finite = NonFiniteCounter(self.shape)

    def add(self, expected: np.ndarray, actual: np.ndarray) -> None:
        e, a = as_numpy(expected).reshape(-1), as_numpy(actual).reshape(-1)
        if e.shape != a.shape:
            raise ValueError(f"block shape mismatch: {np.shape(expected)} vs {np.shape(actual)}")
        any_bad = not bool((np.isfinite(e) & np.isfinite(a)).all())
        self._non_finite.add(e, a, any_bad)
        jobs = [_workers().submit(_chunk, e[i:i + _CHUNK], a[i:i + _CHUNK], any_bad) for i in range(0, e.size, _CHUNK)]
        if self._msprobe is not None:
            self._msprobe.add(e, a)
        for job in jobs:
            out, ulp, n = job.result()
            self._acc[[0, 1, 2, 3, 4, 7, 8]] += out[[0, 1, 2, 3, 4, 7, 8]]
            self._acc[5], self._acc[6] = max(self._acc[5], out[5]), max(self._acc[6], out[6])
            self._ulp += ulp
            self._count += n

    def result(self) -> TensorStats:
        stats = self._own_result()
        return _with_msprobe(stats, self._msprobe) if self._msprobe is not None else stats

    def _own_result(self) -> TensorStats:
        nf = self._non_finite.result()
        elements = int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1
        if self._count == 0:
            nan = float("nan")
            return TensorStats(nan, nan, nan, nan, nan, nan, nan, {k: nan for k in ULP_BUCKETS}, nan, elements, nf, nan,
                               "precision-check")
        e2, a2, d2, ea, sum_abs, max_abs, max_rel, below_1e3, below_5e3 = self._acc
        norm_e, norm_a = float(np.sqrt(e2)), float(np.sqrt(a2))
        if norm_e == 0.0 and norm_a == 0.0:
            cosine = 1.0
        elif norm_e == 0.0 or norm_a == 0.0:
            cosine = float("nan")
        else:
            cosine = float(np.clip(ea / (norm_e * norm_a), -1.0, 1.0))
        count = self._count
        return TensorStats(
            relative_l2=_relative_l2(norm_e, float(np.sqrt(d2))),
            max_abs=float(max_abs),
            max_relative=float(max_rel),
            mean_abs=float(sum_abs) / count,
            cosine=cosine,
            one_thousandth_err_ratio=float(below_1e3) / count,
            five_thousandths_err_ratio=float(below_5e3) / count,
            ulp_shares={bucket: float(n) / count for bucket, n in zip(ULP_BUCKETS, self._ulp)},
            expected_l2=norm_e,
            elements=elements,
            non_finite=nf,
            euclidean_distance=float(np.sqrt(d2)),
            convention="precision-check",
        )


def _with_msprobe(stats: TensorStats, msprobe: MsprobeAccumulator) -> TensorStats:
    return replace(stats, **msprobe.result(), convention="msprobe")


def tensor_stats(expected, actual, *, convention: str = "precision-check") -> TensorStats:
    """All element-wise metrics of a pair (numpy arrays or torch tensors of any float dtype), streamed over chunks
    with float64 accumulators (the compiled one-pass kernel when numba is installed); same definitions as the
    single-metric functions in precision.metrics.elementwise, which the tests check it against. ``convention``:
    "precision-check" (default) or "msprobe" (see TensorStats)."""
    check_convention(convention)
    e_raw, a_raw = as_numpy(expected), as_numpy(actual)
    if e_raw.shape != a_raw.shape:
        raise ValueError(f"shape mismatch: expected {e_raw.shape} vs actual {a_raw.shape}")
    if _needs_scaling(e_raw) or _needs_scaling(a_raw):
        stats = _tensor_stats_whole(e_raw, a_raw, non_finite(e_raw, a_raw))
        if convention == "msprobe":
            msprobe = MsprobeAccumulator()
            msprobe.add(e_raw.reshape(-1), a_raw.reshape(-1))
            stats = _with_msprobe(stats, msprobe)
        return stats
    stream = StreamingStats(e_raw.shape, convention)
    stream.add(e_raw, a_raw)
    return stream.result()


def _needs_scaling(x: np.ndarray) -> bool:
    """float64 magnitudes whose squares would underflow or overflow need the scaled (whole-array) path."""
    if x.dtype != np.float64 or x.size == 0:
        return False
    finite = np.abs(x[np.isfinite(x)])
    if finite.size == 0:
        return False
    nonzero = finite[finite > 0]
    return bool(finite.max() >= _SAFE_RANGE[1] or (nonzero.size and nonzero.min() <= _SAFE_RANGE[0]))


def _tensor_stats_whole(e_raw: np.ndarray, a_raw: np.ndarray, nf: NonFinite) -> TensorStats:
    e, a = _finite_pair(e_raw, a_raw)
    if e.size == 0:
        nan = float("nan")
        return TensorStats(nan, nan, nan, nan, nan, nan, nan, ulp_histogram(e, a), nan, int(e_raw.size), nf, nan, "precision-check")
    diff = a - e
    abs_diff = np.abs(diff)
    norm_e, norm_a, norm_d = (_norm(v) for v in (e, a, diff))
    rel = _elementwise_relative(e, a, RELATIVE_ERROR_FLOOR)
    return TensorStats(
        relative_l2=_relative_l2(norm_e, norm_d),
        max_abs=float(abs_diff.max()),
        max_relative=float(rel.max()),
        mean_abs=float(abs_diff.mean()),
        cosine=_cosine(e, a, norm_e, norm_a),
        one_thousandth_err_ratio=float(np.mean(rel < 1e-3)),
        five_thousandths_err_ratio=float(np.mean(rel < 5e-3)),
        ulp_shares=ulp_histogram(e, a),
        expected_l2=norm_e,
        elements=int(e_raw.size),
        non_finite=nf,
        euclidean_distance=norm_d,
        convention="precision-check",
    )
