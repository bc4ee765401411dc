"""The test oracle: every element-wise metric as a plain numpy function of the whole pair, in float64.

These are the definitions written as directly as numpy allows (whole-array float64 copies, norms scaled by their
largest magnitude when a square would under- or overflow). The package computes the same metrics in one streamed
pass of the compiled kernel (precision.metrics.tensor); the property tests hold it to these functions. Nothing in
precision/ imports this module.
"""

from __future__ import annotations

import numpy as np

from precision.metrics.arrays import as_numpy
from precision.names import FIVE_THOUSANDTHS, ONE_THOUSANDTH, RELATIVE_ERROR_FLOOR


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
    (an "Err Ratio" in msprobe's naming, with this tool's floor), over elements finite on both sides (NaN if none)."""
    e, a = _finite_pair(expected, actual)
    return float(np.mean(_elementwise_relative(e, a, floor) < threshold)) if e.size else float("nan")


def one_thousandth_err_ratio(expected, actual) -> float:
    """"One Thousandth Err Ratio" (msprobe's name): share of elements with relative error below 0.001, with this tool's
    denominator floor (RELATIVE_ERROR_FLOOR); tensor_stats(..., convention="msprobe") gives msprobe's own number."""
    return err_ratio_below(expected, actual, ONE_THOUSANDTH)


def five_thousandths_err_ratio(expected, actual) -> float:
    """"Five Thousandths Err Ratio" (msprobe's name): share of elements with relative error below 0.005, with this
    tool's denominator floor (see one_thousandth_err_ratio)."""
    return err_ratio_below(expected, actual, FIVE_THOUSANDTHS)


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
    # Unit vectors first: the dot product of two tiny (or huge) vectors would underflow (overflow). Each is scaled
    # by its largest magnitude before its own norm: the norm of four 2^1023s is 2^1024, which float64 lacks.
    return float(np.clip(_dot(_unit(e), _unit(a)), -1.0, 1.0))


def _unit(x: np.ndarray) -> np.ndarray:
    scaled = x / np.max(np.abs(x))
    return scaled / np.sqrt(_dot(scaled, scaled))


def euclidean_distance(expected, actual) -> float:
    """Euclidean distance ||a - e||_2 (msprobe's EucDist) over elements finite on both sides (NaN if none)."""
    e, a = _finite_pair(expected, actual)
    return _norm(a - e) if e.size else float("nan")


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


ULP_BUCKETS = ("0", "1", "2", ">2", "non-finite")
"""ulp_shares keys: bf16 ULP distances 0, 1, 2 and more than 2, and pairs whose bf16 roundings are both infinite."""

BF16_INF_MAGNITUDE = 0x7F80
"""|ordered bits| of bf16 +-Inf: float32 values at or above (2 - 2^-8) * 2^127 round to it."""


def ulp_histogram(expected, actual) -> dict[str, float]:
    """Share of the element pairs finite on both sides whose bf16 roundings are 0, 1, 2 or more than 2 bf16 ULPs
    apart, and ("non-finite") of those where both sides overflow to bf16 +-Inf, where a distance would call two
    overflows identical (or 2 x 0x7F80 apart). One side overflowing counts by its distance (bf16 max to Inf is 1).
    The shares sum to 1; all are NaN when no pair is finite."""
    e, a = _finite_pair(expected, actual)
    if e.size == 0:
        return {k: float("nan") for k in ULP_BUCKETS}
    bits_e, bits_a = _bf16_ordered_bits(e), _bf16_ordered_bits(a)
    both_overflow = (np.abs(bits_e) >= BF16_INF_MAGNITUDE) & (np.abs(bits_a) >= BF16_INF_MAGNITUDE)
    d = np.abs(bits_a - bits_e)[~both_overflow]
    n = float(e.size)
    return {
        "0": float(np.count_nonzero(d == 0)) / n,
        "1": float(np.count_nonzero(d == 1)) / n,
        "2": float(np.count_nonzero(d == 2)) / n,
        ">2": float(np.count_nonzero(d > 2)) / n,
        "non-finite": float(np.count_nonzero(both_overflow)) / n,
    }
