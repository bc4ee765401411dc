"""The "msprobe" metric convention: Cosine, EucDist, MaxAbsErr, MaxRelativeErr and One / Five Thousandth(s) Err
Ratio computed as msprobe's compare computes them (mindstudio-probe 26.2.0, msprobe/core/compare: npy_compare.py,
utils.py and algorithm/builtin_algorithm/alg_*.py), so that users who hold our numbers against msprobe's get the
same values. Re-implemented from those definitions; nothing of msprobe is imported.

msprobe calls the target n (NPU) and the reference b (bench). What it does, and this module with it:
- bfloat16 is widened to float32 (its PyTorch reader does this); the tensor is squeezed, so a one-element tensor
  becomes 0-d, for which Cosine, EucDist and the two ratios are unsupported (NaN here) and the rest is computed on
  the raw values.
- Non-finite values: if NaN sits at the same elements on both sides and +-Inf at the same elements on both sides
  (the sign is not compared), those elements are set to 0 on both sides and take part in every metric; otherwise
  every metric is unsupported (NaN here). The tool's own non_finite record still counts and locates them.
- Cosine: dot(n, b) / (||n|| ||b||) in float64, not clipped; 1.0 when both norms are <= float64 eps (2.2e-16),
  NaN when one is; then rounded to 12 decimals, and to 6 when above 0.9999.
- EucDist: ||n - b||_2 in float64, unrounded.
- MaxAbsErr: max |n - b| in float64 (in the input dtype for a 0-d tensor), rounded to 12 decimals.
- Relative error: |(n - b) / b| in the dtype numpy.result_type(n, b, float32) (float32 for float32, float16 and
  bfloat16 inputs), with that dtype's eps added to BOTH sides where b is exactly 0, and no floor anywhere else.
  MaxRelativeErr is its maximum, the ratios the share of elements with it below 0.001 / 0.005 (the thresholds
  cast to the same dtype, as numpy compares a float32 array with a Python float); all rounded to 12 decimals.
Cosine, EucDist and MaxAbsErr come from the sums of the one kernel pass every metric shares (precision.metrics.tensor;
see ``Sums``); only the float32 relative error is msprobe's own pass here. Sums run in another order than msprobe's
BLAS dot products, so unrounded sums (EucDist) can differ in the last bit; the rounded numbers are the same. One
deliberate difference: float64 data beyond 1e+-150, whose squares overflow (or underflow) in msprobe's unscaled
float64 sums (EucDist Inf or 0, Cosine NaN), is summed scaled here and gets its true values; no capture holds such data.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from precision.names import (
    COSINE,
    ERR_RATIO_THRESHOLDS,
    EUCLIDEAN_DISTANCE,
    FIVE_THOUSANDTHS_ERR_RATIO,
    MAX_ABS,
    MAX_RELATIVE,
    ONE_THOUSANDTH_ERR_RATIO,
)

CONVENTIONS = ("precision-check", "msprobe")
"""Metric conventions: "precision-check" (this tool's definitions, precision.metrics.elementwise) and "msprobe"."""

FLOAT64_EPS = float(np.finfo(np.float64).eps)
"""msprobe's cosine treats a vector whose float64 norm is at most this as all zero."""

COSINE_ROUNDING_ABOVE = 0.9999
"""msprobe rounds a cosine above this to 6 decimals (every reported number is first rounded to 12)."""

THRESHOLDS = ERR_RATIO_THRESHOLDS
"""One Thousandth and Five Thousandths Err Ratio thresholds on the relative error (msprobe's, and this tool's)."""
METRICS = (COSINE, EUCLIDEAN_DISTANCE, MAX_ABS, MAX_RELATIVE, ONE_THOUSANDTH_ERR_RATIO, FIVE_THOUSANDTHS_ERR_RATIO)
"""The TensorStats fields the msprobe convention replaces."""


def check_convention(convention: str) -> str:
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown metric convention {convention!r}; use one of: {', '.join(CONVENTIONS)}")
    return convention


def _rounded(value: float) -> float:
    """msprobe's format_value: the number printed with 12 decimals and read back."""
    return float(f"{float(value):.12f}") if math.isfinite(value) else float(value)


def _relative_error(e: np.ndarray, a: np.ndarray) -> np.ndarray:
    """|(a - e) / e| in result_type(a, e, float32), with that dtype's eps added to both sides where e == 0."""
    dtype = np.result_type(a.dtype, e.dtype, np.float32)
    n, b = a.astype(dtype), e.astype(dtype)
    zero = b == 0
    if zero.any():
        eps = np.finfo(dtype).eps
        n[zero] += eps
        b[zero] += eps
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return np.abs((n - b) / b)


class Sums(NamedTuple):
    """What msprobe's Cosine, EucDist and MaxAbsErr are made of, from the one kernel pass (precision.metrics.tensor):
    over the pairs finite on both sides, which are msprobe's sums too, since msprobe zeroes the matching non-finite
    elements on both sides (they add nothing) and gives no number when the non-finite elements do not match."""

    norm_e: float
    norm_a: float
    quotient: float
    """<e, a> / (||e|| ||a||), unclipped (NaN when either norm is 0)."""
    euclidean: float
    max_abs: float


class MsprobeAccumulator:
    """msprobe's relative error, its maximum and the two ratios (in msprobe's float32 arithmetic), over flat blocks of
    one tensor pair in row-major order; ``result`` adds Cosine, EucDist and MaxAbsErr from the kernel's sums."""

    def __init__(self) -> None:
        self._max_rel = 0.0
        self._below = [0, 0]
        self._count = 0
        self._non_finite_apart = False  # NaN or Inf masks differ between the sides: every metric unsupported
        self._first: tuple[np.ndarray, np.ndarray] | None = None  # the raw first pair, for one-element tensors

    def add(self, e: np.ndarray, a: np.ndarray) -> None:
        if e.size == 0:
            return
        if self._first is None:
            self._first = (e[:1].reshape(()), a[:1].reshape(()))
        finite_e, finite_a = np.isfinite(e), np.isfinite(a)
        if not (finite_e.all() and finite_a.all()):
            if not (np.array_equal(np.isnan(e), np.isnan(a)) and np.array_equal(np.isinf(e), np.isinf(a))):
                self._non_finite_apart = True
            e, a = np.where(finite_e, e, 0).astype(e.dtype), np.where(finite_a, a, 0).astype(a.dtype)
        rel = _relative_error(e, a)
        self._max_rel = max(self._max_rel, float(np.max(rel)))
        for slot, threshold in enumerate(THRESHOLDS):
            self._below[slot] += int(np.count_nonzero(rel < rel.dtype.type(threshold)))
        self._count += e.size

    def result(self, sums: Sums) -> dict[str, float]:
        """cosine, euclidean_distance, max_abs, max_relative, one_thousandth_err_ratio, five_thousandths_err_ratio;
        NaN where msprobe reports "unsupported", "N/A" or "Nan"."""
        nan = math.nan
        if self._count == 0 or self._non_finite_apart and self._count > 1:
            return dict.fromkeys(METRICS, nan)
        if self._count == 1:
            return self._zero_dimensional()
        return {
            COSINE: _cosine(sums.quotient, sums.norm_a, sums.norm_e),
            EUCLIDEAN_DISTANCE: sums.euclidean,
            MAX_ABS: _rounded(sums.max_abs),
            MAX_RELATIVE: _rounded(self._max_rel),
            ONE_THOUSANDTH_ERR_RATIO: _rounded(self._below[0] / self._count),
            FIVE_THOUSANDTHS_ERR_RATIO: _rounded(self._below[1] / self._count),
        }

    def _zero_dimensional(self) -> dict[str, float]:
        """A one-element tensor, squeezed to 0-d by msprobe: no non-finite handling, only the two maxima."""
        e, a = self._first
        with np.errstate(over="ignore", invalid="ignore"):
            max_abs = float(np.abs(a - e))
        max_rel = float(_relative_error(e.reshape(1), a.reshape(1))[0])
        nan = math.nan
        return {COSINE: nan, EUCLIDEAN_DISTANCE: nan, MAX_ABS: _rounded(max_abs), MAX_RELATIVE: _rounded(max_rel),
                ONE_THOUSANDTH_ERR_RATIO: nan, FIVE_THOUSANDTHS_ERR_RATIO: nan}


def _cosine(quotient: float, norm_a: float, norm_e: float) -> float:
    if norm_a <= FLOAT64_EPS and norm_e <= FLOAT64_EPS:
        return 1.0
    if norm_a <= FLOAT64_EPS or norm_e <= FLOAT64_EPS or math.isnan(quotient):
        return math.nan
    cos = _rounded(quotient)
    return round(cos, 6) if cos > COSINE_ROUNDING_ABOVE else cos


def msprobe_metrics(expected, actual) -> dict[str, float]:
    """msprobe's Cosine, EucDist, MaxAbsErr, MaxRelativeErr, One and Five Thousandth(s) Err Ratio of one pair
    (see the module's docstring), keyed as in TensorStats: tensor_stats(..., convention="msprobe")'s numbers."""
    from precision.metrics.tensor import tensor_stats  # tensor.py builds on this module

    stats = tensor_stats(expected, actual, convention="msprobe")
    return {name: getattr(stats, name) for name in METRICS}
