"""Element-wise error metrics between two tensors of the same shape, computed in float64.

Conventions: NaN and Inf are never dropped silently. The error metrics below are computed over the elements
that are finite on both sides, and ``non_finite`` counts and locates the rest; a tensor pair with any
non-finite element is flagged by the analysis.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from precision.metrics import fused
from precision.metrics.arrays import as_numpy
from precision.metrics.nonfinite import NonFinite, NonFiniteCounter, non_finite

BF16_UNIT_ROUNDOFF = 2.0**-8
"""Unit roundoff u of bfloat16 (8 significand bits incl. the implicit one): |round(x) - x| <= u |x|."""

RELATIVE_ERROR_FLOOR = 1e-6
"""Denominator floor for element-wise relative error: |a - e| / max(|e|, floor). Keeps elements whose
expected value is (almost) zero from dividing by zero; 1e-6 matches the magnitude msprobe uses."""


def _as_float64(x) -> np.ndarray:
    return as_numpy(x).astype(np.float64, copy=False)


def _finite_pair(expected, actual) -> tuple[np.ndarray, np.ndarray]:
    e, a = _as_float64(expected), _as_float64(actual)
    if e.shape != a.shape:
        raise ValueError(f"shape mismatch: expected {e.shape} vs actual {a.shape}")
    e, a = e.ravel(), a.ravel()
    keep = np.isfinite(e) & np.isfinite(a)
    if keep.all():
        return e, a
    return e[keep], a[keep]


_SAFE_RANGE = (1e-150, 1e150)


def _dot(x: np.ndarray, y: np.ndarray) -> float:
    """Dot product in float64 without BLAS: numpy's einsum, which measured 30x faster than np.dot (OpenBLAS)
    on this project's 2-core machines for cache-sized vectors, with the same float64 accumulation."""
    return float(np.einsum("i,i->", x, y))


def _norm(x: np.ndarray) -> float:
    """L2 norm that neither underflows nor overflows in float64 (scaled by the largest magnitude when needed)."""
    if x.size == 0:
        return 0.0
    largest = float(np.max(np.abs(x)))
    if largest == 0.0 or _SAFE_RANGE[0] < largest < _SAFE_RANGE[1]:
        return float(np.sqrt(_dot(x, x)))
    return largest * float(np.sqrt(_dot(x / largest, x / largest)))


def relative_l2_error(expected, actual) -> float:
    """Relative L2 error ||a - e||_2 / ||e||_2 over the elements finite on both sides.
    0 when both are all zero; +inf when only e is all zero; NaN when no element is finite on both sides."""
    e, a = _finite_pair(expected, actual)
    return _relative_l2(_norm(e), _norm(a - e)) if e.size else float("nan")


def _relative_l2(norm_expected: float, norm_diff: float) -> float:
    if norm_expected == 0.0:
        return 0.0 if norm_diff == 0.0 else float("inf")
    return norm_diff / norm_expected


def max_abs_error(expected, actual) -> float:
    """Max absolute error max_i |a_i - e_i| over elements finite on both sides (NaN if none)."""
    e, a = _finite_pair(expected, actual)
    return float(np.max(np.abs(a - e))) if e.size else float("nan")


def mean_abs_error(expected, actual) -> float:
    """Mean absolute error mean_i |a_i - e_i| over elements finite on both sides (NaN if none)."""
    e, a = _finite_pair(expected, actual)
    return float(np.mean(np.abs(a - e))) if e.size else float("nan")


def _elementwise_relative(e: np.ndarray, a: np.ndarray, floor: float) -> np.ndarray:
    return np.abs(a - e) / np.maximum(np.abs(e), floor)


def max_relative_error(expected, actual, *, floor: float = RELATIVE_ERROR_FLOOR) -> float:
    """Max relative error max_i |a_i - e_i| / max(|e_i|, floor), floor = RELATIVE_ERROR_FLOOR (1e-6)
    by default, over elements finite on both sides (NaN if none)."""
    e, a = _finite_pair(expected, actual)
    return float(np.max(_elementwise_relative(e, a, floor))) if e.size else float("nan")


def err_ratio_below(expected, actual, threshold: float, *, floor: float = RELATIVE_ERROR_FLOOR) -> float:
    """Share of elements whose relative error |a - e| / max(|e|, floor) is below ``threshold``
    (msprobe's "Err Ratio"), over elements finite on both sides (NaN if none)."""
    e, a = _finite_pair(expected, actual)
    return float(np.mean(_elementwise_relative(e, a, floor) < threshold)) if e.size else float("nan")


def one_thousandth_err_ratio(expected, actual) -> float:
    """msprobe "One Thousandth Err Ratio": share of elements with relative error below 0.001."""
    return err_ratio_below(expected, actual, 1e-3)


def five_thousandths_err_ratio(expected, actual) -> float:
    """msprobe "Five Thousandths Err Ratio": share of elements with relative error below 0.005."""
    return err_ratio_below(expected, actual, 5e-3)


def cosine_similarity(expected, actual) -> float:
    """Cosine similarity <e, a> / (||e|| ||a||) over elements finite on both sides.
    1 when both are all zero (identical); NaN when exactly one is all zero (undefined) or nothing is finite."""
    e, a = _finite_pair(expected, actual)
    if e.size == 0:
        return float("nan")
    return _cosine(e, a, _norm(e), _norm(a))


def _cosine(e: np.ndarray, a: np.ndarray, norm_e: float, norm_a: float) -> float:
    if norm_e == 0.0 and norm_a == 0.0:
        return 1.0
    if norm_e == 0.0 or norm_a == 0.0:
        return float("nan")
    # Unit vectors first: the dot product of two tiny (or huge) vectors would underflow (overflow).
    return float(np.clip(_dot(e / norm_e, a / norm_a), -1.0, 1.0))


def _bf16_ordered_bits(x: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (round-to-nearest-even from float32) mapped to integers that are ordered like
    the values, so that the difference of two of them counts the representable bf16 numbers between.
    float64 inputs are rounded to float32 first, as torch's float64 -> bfloat16 cast does.
    (uint32 arithmetic cannot overflow here: the largest finite pattern plus the rounding stays below 2^32.)"""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    b16 = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    magnitude = (b16 & 0x7FFF).astype(np.int32)
    return np.where(b16 & 0x8000, -magnitude, magnitude)


def bf16_ulp_distance(expected, actual) -> np.ndarray:
    """Element distance in bf16 units in the last place: the number of bf16 values between round_bf16(e)
    and round_bf16(a) (0 = same bf16 value; +0 and -0 count as the same). Elements are first rounded to
    bf16 (nearest-even), so bf16 captures are measured exactly. Only finite pairs are included."""
    e, a = _finite_pair(expected, actual)
    return np.abs(_bf16_ordered_bits(a) - _bf16_ordered_bits(e))


ULP_BUCKETS = ("0", "1", "2", ">2")


def ulp_histogram(expected, actual) -> dict[str, float]:
    """Share of finite element pairs at a bf16 ULP distance of exactly 0, 1, 2, and more than 2.
    Empty dict values are NaN when no pair is finite."""
    d = bf16_ulp_distance(expected, actual)
    if d.size == 0:
        return {k: float("nan") for k in ULP_BUCKETS}
    n = float(d.size)
    return {
        "0": float(np.count_nonzero(d == 0)) / n,
        "1": float(np.count_nonzero(d == 1)) / n,
        "2": float(np.count_nonzero(d == 2)) / n,
        ">2": float(np.count_nonzero(d > 2)) / n,
    }


@dataclass(frozen=True)
class TensorStats:
    """Every element-wise metric of one tensor pair (see each function for its definition)."""

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
    distance = np.abs(_bf16_ordered_bits(a_part) - _bf16_ordered_bits(e_part))
    return out, np.bincount(np.minimum(distance, 3), minlength=4)[:4].astype(np.int64)


def _chunk(e: np.ndarray, a: np.ndarray, filter_non_finite: bool):
    if filter_non_finite:
        keep = np.isfinite(e) & np.isfinite(a)
        e, a = e[keep], a[keep]
    if e.size == 0:
        return np.zeros(fused.N_ACCUMULATORS), np.zeros(4, dtype=np.int64), 0
    if fused.available() and e.dtype == np.float32 and a.dtype == np.float32:
        out, ulp = fused.fused_accumulate(e, a, RELATIVE_ERROR_FLOOR)
    else:
        out, ulp = _numpy_accumulate(e, a)
    return out, ulp, e.size


class StreamingStats:
    """tensor_stats over a tensor that arrives in blocks (rows of a logits matrix read from disk, say), so that
    memory holds one block pair rather than the whole tensor. Blocks must come in row-major order."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = tuple(shape)
        self._acc = np.zeros(fused.N_ACCUMULATORS)
        self._ulp = np.zeros(4, dtype=np.int64)
        self._count = 0
        self._non_finite = NonFiniteCounter(self.shape)

    def add(self, expected: np.ndarray, actual: np.ndarray) -> None:
        e, a = as_numpy(expected).reshape(-1), as_numpy(actual).reshape(-1)
        if e.shape != a.shape:
            raise ValueError(f"block shape mismatch: {np.shape(expected)} vs {np.shape(actual)}")
        any_bad = not bool((np.isfinite(e) & np.isfinite(a)).all())
        self._non_finite.add(e, a, any_bad)
        jobs = [_workers().submit(_chunk, e[i:i + _CHUNK], a[i:i + _CHUNK], any_bad) for i in range(0, e.size, _CHUNK)]
        for job in jobs:
            out, ulp, n = job.result()
            self._acc[[0, 1, 2, 3, 4, 7, 8]] += out[[0, 1, 2, 3, 4, 7, 8]]
            self._acc[5], self._acc[6] = max(self._acc[5], out[5]), max(self._acc[6], out[6])
            self._ulp += ulp
            self._count += n

    def result(self) -> TensorStats:
        nf = self._non_finite.result()
        elements = int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1
        if self._count == 0:
            nan = float("nan")
            return TensorStats(nan, nan, nan, nan, nan, nan, nan, {k: nan for k in ULP_BUCKETS}, nan, elements, nf)
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
        )


def tensor_stats(expected, actual) -> TensorStats:
    """All element-wise metrics of a pair, streamed over chunks with float64 accumulators (the compiled one-pass
    kernel when numba is installed); same definitions as the single-metric functions above, which the tests check
    it against."""
    e_raw, a_raw = as_numpy(expected), as_numpy(actual)
    if e_raw.shape != a_raw.shape:
        raise ValueError(f"shape mismatch: expected {e_raw.shape} vs actual {a_raw.shape}")
    if _needs_scaling(e_raw) or _needs_scaling(a_raw):
        return _tensor_stats_whole(e_raw, a_raw, non_finite(e_raw, a_raw))
    stream = StreamingStats(e_raw.shape)
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
        return TensorStats(nan, nan, nan, nan, nan, nan, nan, ulp_histogram(e, a), nan, int(e_raw.size), nf)
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
    )
