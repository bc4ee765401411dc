"""Single-metric functions of a tensor pair, for callers that want one number. Each is a view of the one
production path (precision.metrics.tensor.tensor_stats, the compiled one-pass kernel), so no metric has two
implementations; the plain numpy definitions they are tested against live in tests/metrics/oracle.py.

Two functions are their metric's only implementation: ``bf16_ulp_distance`` (the per-element distances, of which
the kernel keeps only the bucket counts) and ``_dot`` (a float64 dot product for the replay analysis).
NaN and Inf are never dropped silently: the error metrics cover the elements finite on both sides, and
precision.metrics.nonfinite counts and locates the rest.
"""

from __future__ import annotations

import numpy as np

from precision.metrics.arrays import as_numpy
from precision.metrics.tensor import (  # noqa: F401  (BF16_UNIT_ROUNDOFF, RELATIVE_ERROR_FLOOR, ULP_BUCKETS re-exported)
    BF16_UNIT_ROUNDOFF,
    ULP_BUCKETS,
    _raw_sums,
    tensor_stats,
)
from precision.names import FIVE_THOUSANDTHS, ONE_THOUSANDTH, RELATIVE_ERROR_FLOOR


def relative_l2_error(expected, actual) -> float:
    """Relative L2 error ||a - e||_2 / ||e||_2 over the elements finite on both sides.
    0 when both are all zero; +inf when only e is all zero; NaN when no element is finite on both sides."""
    return tensor_stats(expected, actual).relative_l2


def max_abs_error(expected, actual) -> float:
    """Max absolute error max_i |a_i - e_i| over elements finite on both sides (NaN if none)."""
    return tensor_stats(expected, actual).max_abs


def mean_abs_error(expected, actual) -> float:
    """Mean absolute error mean_i |a_i - e_i| over elements finite on both sides (NaN if none)."""
    return tensor_stats(expected, actual).mean_abs


def cosine_similarity(expected, actual) -> float:
    """Cosine similarity <e, a> / (||e|| ||a||) over elements finite on both sides, clipped to [-1, 1].
    1 when both are all zero (identical); NaN when exactly one is all zero (undefined) or nothing is finite."""
    return tensor_stats(expected, actual).cosine


def euclidean_distance(expected, actual) -> float:
    """Euclidean distance ||a - e||_2 (msprobe's EucDist) over elements finite on both sides (NaN if none)."""
    return tensor_stats(expected, actual).euclidean_distance


def one_thousandth_err_ratio(expected, actual) -> float:
    """"One Thousandth Err Ratio" (msprobe's name): share of elements with relative error below ONE_THOUSANDTH
    (0.001), with this tool's denominator floor (RELATIVE_ERROR_FLOOR); tensor_stats(..., convention="msprobe")
    gives msprobe's own number."""
    return tensor_stats(expected, actual).one_thousandth_err_ratio


def five_thousandths_err_ratio(expected, actual) -> float:
    """"Five Thousandths Err Ratio" (msprobe's name): share of elements with relative error below FIVE_THOUSANDTHS
    (0.005), with this tool's denominator floor (see one_thousandth_err_ratio)."""
    return tensor_stats(expected, actual).five_thousandths_err_ratio


def ulp_histogram(expected, actual) -> dict[str, float]:
    """Share of the element pairs finite on both sides whose bf16 roundings are 0, 1, 2 or more than 2 bf16 ULPs
    apart, and ("non-finite") of those where both sides overflow to bf16 +-Inf, where a distance would call two
    overflows identical (or 2 x 0x7F80 apart). One side overflowing counts by its distance (bf16 max to Inf is 1).
    The shares sum to 1; all are NaN when no pair is finite. Keys: ULP_BUCKETS."""
    return tensor_stats(expected, actual).ulp_shares


def max_relative_error(expected, actual, *, floor: float = RELATIVE_ERROR_FLOOR) -> float:
    """Max relative error max_i |a_i - e_i| / max(|e_i|, floor), floor = RELATIVE_ERROR_FLOOR (1e-6)
    by default, over elements finite on both sides (NaN if none)."""
    if floor == RELATIVE_ERROR_FLOOR:
        return tensor_stats(expected, actual).max_relative
    sums = _raw_sums(expected, actual, floor=floor, thresholds=(ONE_THOUSANDTH, FIVE_THOUSANDTHS))
    return float(sums.acc[6]) if sums.count else float("nan")


def err_ratio_below(expected, actual, threshold: float, *, floor: float = RELATIVE_ERROR_FLOOR) -> float:
    """Share of elements whose relative error |a - e| / max(|e|, floor) is below ``threshold``
    (an "Err Ratio" in msprobe's naming, with this tool's floor), over elements finite on both sides (NaN if none)."""
    sums = _raw_sums(expected, actual, floor=floor, thresholds=(threshold, threshold))
    return float(sums.acc[7]) / sums.count if sums.count else float("nan")


def _dot(x: np.ndarray, y: np.ndarray) -> float:
    """Dot product in float64 without BLAS: numpy's einsum, which measured 30x faster than np.dot (OpenBLAS)
    on this project's 2-core machines for cache-sized vectors, with the same float64 accumulation."""
    return float(np.einsum("i,i->", x, y))


def _bf16_ordered_bits(x: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (round-to-nearest-even from float32) mapped to integers that are ordered like
    the values, so that the difference of two of them counts the representable bf16 numbers between.
    float64 inputs are rounded to float32 first, as torch's float64 -> bfloat16 cast does.
    (uint32 arithmetic cannot overflow here: the largest finite pattern plus the rounding stays below 2^32.)"""
    with np.errstate(over="ignore"):  # beyond float32's range: +-Inf, which rounds to bf16 +-Inf as it should
        bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    b16 = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    magnitude = (b16 & 0x7FFF).astype(np.int32)
    return np.where(b16 & 0x8000, -magnitude, magnitude)


def bf16_ulp_distance(expected, actual) -> np.ndarray:
    """Element distance in bf16 units in the last place: the number of bf16 values between round_bf16(e)
    and round_bf16(a) (0 = same bf16 value; +0 and -0 count as the same). Elements are first rounded to
    bf16 (nearest-even), so bf16 captures are measured exactly. Only finite pairs are included, in row-major order."""
    e, a = as_numpy(expected), as_numpy(actual)
    if e.shape != a.shape:
        raise ValueError(f"shape mismatch: expected {e.shape} vs actual {a.shape}")
    e, a = e.reshape(-1), a.reshape(-1)
    keep = np.isfinite(e) & np.isfinite(a)
    if not keep.all():
        e, a = e[keep], a[keep]
    return np.abs(_bf16_ordered_bits(a) - _bf16_ordered_bits(e))
