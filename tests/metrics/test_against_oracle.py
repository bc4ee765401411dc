"""The production path (tensor_stats: the compiled one-pass kernel, streamed in chunks) against the oracle (the
plain numpy definitions in tests/metrics/oracle.py), on every dtype a capture or a caller gives, with NaN/Inf, zeros,
tensors longer than one chunk and float64 values near the ends of its range.

Tolerance: counts, shares, maxima and bf16 buckets agree exactly (the same IEEE operations per element; a maximum
does not depend on order). Sums (relative_l2, cosine, mean_abs, expected_l2, euclidean_distance) agree to 1e-12
relative: the kernel adds blocks of 4096 terms and then the blocks, numpy adds pairwise, and two float64 summation
orders of n terms differ by at most about (4096 + n / 4096) * 2.2e-16 relative, under 1e-12 for every size here. The
cosine's dot product can cancel (1e30 - 1e30 + 7e13), so it is also allowed 1e-12 absolute.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from precision.metrics import elementwise, tensor
from precision.metrics.tensor import tensor_stats
from precision.names import FIVE_THOUSANDTHS, ONE_THOUSANDTH
from tests.metrics import oracle

SETTINGS = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # overflowing float64 intermediates warn

REL = 1e-12
SUMS = ("relative_l2", "mean_abs", "expected_l2", "euclidean_distance")
EXACT = ("max_abs", "max_relative", "one_thousandth_err_ratio", "five_thousandths_err_ratio")


def close(x: float, y: float, *, abs_tol: float = 0.0) -> bool:
    return (math.isnan(x) and math.isnan(y)) or x == y or math.isclose(x, y, rel_tol=REL, abs_tol=abs_tol)


def exact(x: float, y: float) -> bool:
    return (math.isnan(x) and math.isnan(y)) or x == y


def assert_agrees_with_oracle(stats, e, a) -> None:
    """Every field of ``stats`` (computed from e, a) against the oracle, to the tolerance in the module docstring."""
    o_max_abs = oracle.max_abs_error(e, a)
    assert exact(stats.max_abs, o_max_abs), ("max_abs", stats.max_abs, o_max_abs)
    assert exact(stats.max_relative, oracle.max_relative_error(e, a)), ("max_relative", stats.max_relative)
    assert exact(stats.one_thousandth_err_ratio, oracle.one_thousandth_err_ratio(e, a))
    assert exact(stats.five_thousandths_err_ratio, oracle.five_thousandths_err_ratio(e, a))
    hist = oracle.ulp_histogram(e, a)
    assert list(stats.ulp_shares) == list(hist)
    assert all(exact(stats.ulp_shares[k], hist[k]) for k in hist), (stats.ulp_shares, hist)
    assert stats.non_finite == oracle_non_finite(e, a)
    assert close(stats.mean_abs, oracle.mean_abs_error(e, a)), ("mean_abs", stats.mean_abs)
    e64, a64 = oracle._finite_pair(e, a)
    o_cosine = oracle.cosine_similarity(e64, a64)
    if e64.size and math.isinf(oracle._norm(e64)) + math.isinf(oracle._norm(a64)):
        # ||e|| or ||a|| beyond float64 (n values near 1.8e308): the oracle's scaled norm overflows and its cosine
        # with it; the cosine does not depend on the scale of either side, so compare with each side scaled to 1
        o_cosine = oracle.cosine_similarity(e64 / np.abs(e64).max(), a64 / np.abs(a64).max())
    assert close(stats.cosine, o_cosine, abs_tol=REL), ("cosine", stats.cosine, o_cosine)
    assert close(stats.expected_l2, oracle._norm(e64) if e64.size else math.nan), ("expected_l2", stats.expected_l2)
    if math.isinf(o_max_abs):
        # a - e itself overflows float64 somewhere: its norm is beyond float64 (+inf); the oracle's scaled norm
        # divides Inf by Inf there and says NaN
        assert stats.euclidean_distance == math.inf and stats.relative_l2 == math.inf
    else:
        assert close(stats.euclidean_distance, oracle.euclidean_distance(e, a)), ("euclidean", stats.euclidean_distance)
        assert close(stats.relative_l2, oracle.relative_l2_error(e, a)), ("relative_l2", stats.relative_l2, oracle.relative_l2_error(e, a))


def oracle_non_finite(e, a):
    """The non-finite record is its own module's (precision.metrics.nonfinite, one implementation); here it is only
    checked to be the same whatever path computed it."""
    from precision.metrics.nonfinite import non_finite

    return non_finite(e, a)


@contextlib.contextmanager
def chunk_size(elements: int):
    """Stream in chunks of ``elements`` so that small examples cross chunk boundaries (merged sums and maxima)."""
    saved = tensor._CHUNK
    tensor._CHUNK = elements
    try:
        yield
    finally:
        tensor._CHUNK = saved


# ------------------------------------------------------------------------------------------------ strategies

# Extremes by hand: float64 near its limits (squares over- or underflow: the scaled path), subnormals of both widths,
# signed zeros, bf16's largest value and the float32 values that round to bf16 Inf.
SPECIAL = [0.0, -0.0, 1.0, -1.0, 1e-7, 1e-6, 2e-6, 1e30, -1e30, 1e-40, 2.0**-133, 1.0 + 2**-8, 3.3895313892515355e38,
           float(np.finfo(np.float32).max), 1e200, -1e200, 1e-200, 1e300, -1e300, 5e-324, 2.2250738585072014e-308, 1.7e308]
NON_FINITE = [math.nan, math.inf, -math.inf]
DTYPES = ["float16", "float32", "float64", "bfloat16"]


def _values(dtype: str, allow_non_finite: bool):
    width = {"float16": 16, "float32": 32, "bfloat16": 32, "float64": 64}[dtype]
    limit = {16: 65504.0, 32: float(np.finfo(np.float32).max), 64: math.inf}[width]
    special = [v for v in SPECIAL if abs(v) <= limit] + (NON_FINITE if allow_non_finite else [])
    base = st.floats(width=width, allow_nan=allow_non_finite, allow_infinity=allow_non_finite, allow_subnormal=True)
    return st.one_of(base, st.sampled_from(special))


def _as_input(x: np.ndarray, dtype: str):
    if dtype == "bfloat16":
        torch = pytest.importorskip("torch")
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16)
    return x.astype(dtype)


@st.composite
def pairs(draw, allow_non_finite: bool = True):
    """(e, a) of one shape and dtype (numpy float16/32/64 or a torch bf16 tensor); a is independent of e, equal to
    it, or e perturbed by up to 1% (so that the err ratios see both sides of their thresholds)."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=7))
    store = np.float64 if dtype == "float64" else np.float32
    e = draw(hnp.arrays(store, shape, elements=_values(dtype, allow_non_finite)))
    how = draw(st.sampled_from(["independent", "perturbed", "identical"]))
    if how == "independent":
        a = draw(hnp.arrays(store, shape, elements=_values(dtype, allow_non_finite)))
    elif how == "perturbed":
        factors = draw(hnp.arrays(np.float64, shape, elements=st.floats(-0.01, 0.01)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a = (e.astype(np.float64) * (1.0 + factors)).astype(store)
    else:
        a = e.copy()
    return _as_input(e, dtype), _as_input(a, dtype)


# ------------------------------------------------------------------------------------------- the properties


@SETTINGS
@given(pairs(), st.sampled_from([None, 1, 3, 16]))
def test_tensor_stats_equals_the_oracle(pair, chunk):
    e, a = pair
    with chunk_size(chunk) if chunk else contextlib.nullcontext():
        stats = tensor_stats(e, a)
    assert_agrees_with_oracle(stats, e, a)


@SETTINGS
@given(pairs(), st.integers(1, 4))
def test_streamed_row_blocks_equal_the_oracle(pair, rows_per_block):
    # blocks of different magnitudes (1e-200, then 1e200) make the running scale shrink between blocks
    e, a = (np.asarray(x.float() if hasattr(x, "bfloat16") else x) for x in pair)
    e2, a2 = e.reshape(e.shape[0] if e.ndim else 1, -1), a.reshape(e.shape[0] if e.ndim else 1, -1)
    stream = tensor.StreamingStats(e2.shape)
    for start in range(0, e2.shape[0], rows_per_block):
        stream.add(e2[start:start + rows_per_block], a2[start:start + rows_per_block])
    assert_agrees_with_oracle(stream.result(), e2, a2)


def test_a_later_block_of_larger_magnitude_rescales_the_sums():
    e = np.array([[3e-200, 4e-200], [3e200, 4e200], [1.0, 2.0]])
    a = e * np.array([[1.0, 1.5], [1.0, 1.5], [1.0, 1.5]])
    stream = tensor.StreamingStats(e.shape)
    for row in range(3):
        stream.add(e[row:row + 1], a[row:row + 1])
    streamed = stream.result()
    assert_agrees_with_oracle(streamed, e, a)
    assert streamed.relative_l2 == pytest.approx(2e200 / 5e200, rel=1e-15)  # only the 1e200 row counts


@SETTINGS
@given(pairs())
def test_every_single_metric_function_is_a_view_of_tensor_stats(pair):
    e, a = pair
    stats = tensor_stats(e, a)
    views = {"relative_l2": elementwise.relative_l2_error, "max_abs": elementwise.max_abs_error,
             "mean_abs": elementwise.mean_abs_error, "cosine": elementwise.cosine_similarity,
             "euclidean_distance": elementwise.euclidean_distance, "max_relative": elementwise.max_relative_error,
             "one_thousandth_err_ratio": elementwise.one_thousandth_err_ratio,
             "five_thousandths_err_ratio": elementwise.five_thousandths_err_ratio}
    for field, view in views.items():
        assert exact(view(e, a), getattr(stats, field)), field
    hist = elementwise.ulp_histogram(e, a)
    assert all(exact(hist[k], stats.ulp_shares[k]) for k in hist)
    assert exact(elementwise.err_ratio_below(e, a, ONE_THOUSANDTH), stats.one_thousandth_err_ratio)
    assert exact(elementwise.err_ratio_below(e, a, FIVE_THOUSANDTHS), stats.five_thousandths_err_ratio)


@SETTINGS
@given(pairs(), st.sampled_from([0.0, 1e-3, 0.015, 0.5]), st.sampled_from([1e-12, 1e-6, 1.0]))
def test_general_floor_and_threshold_equal_the_oracle(pair, threshold, floor):
    e, a = pair
    assert exact(elementwise.err_ratio_below(e, a, threshold, floor=floor), oracle.err_ratio_below(e, a, threshold, floor=floor))
    assert exact(elementwise.max_relative_error(e, a, floor=floor), oracle.max_relative_error(e, a, floor=floor))


@SETTINGS
@given(pairs())
def test_bf16_ulp_distance_equals_the_oracle(pair):
    e, a = pair
    np.testing.assert_array_equal(elementwise.bf16_ulp_distance(e, a), oracle.bf16_ulp_distance(e, a))


# ------------------------------------------------------------------------------ larger than one chunk, by hand


def _noisy(size: int, dtype, seed: int, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    e = rng.standard_normal(size) * scale
    a = e * (1.0 + 3e-3 * rng.standard_normal(size))
    e[rng.integers(0, size, 5)] = 0.0
    return e.astype(dtype), a.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_more_than_two_chunks_with_non_finite_values(dtype):
    size = 2 * tensor._CHUNK + 4099  # three chunks, the last one more than a kernel block long
    e, a = _noisy(size, dtype, seed=5)
    e[[7, tensor._CHUNK + 1]] = np.nan
    a[[9, size - 1]] = np.inf
    a[tensor._CHUNK] = -np.inf
    assert_agrees_with_oracle(tensor_stats(e, a), e, a)


@pytest.mark.parametrize("scale", [1e200, 1e-200, 1e300, 1e-310])
def test_float64_near_its_limits_over_more_than_one_chunk(scale):
    # squares of these overflow to Inf or underflow to 0 in float64: the kernel sums them scaled by powers of two
    e, a = _noisy(tensor._CHUNK + 11, np.float64, seed=9, scale=scale)
    stats = tensor_stats(e, a)
    assert_agrees_with_oracle(stats, e, a)
    assert 1e-3 < stats.relative_l2 < 1e-2 and 0.99 < stats.cosine <= 1.0  # not Inf, not 0, not NaN


def test_a_bf16_capture_sized_tensor():
    torch = pytest.importorskip("torch")
    e, a = _noisy(3 * 1024 * 320, np.float32, seed=2)
    e_t, a_t = torch.from_numpy(e).bfloat16().reshape(-1, 320), torch.from_numpy(a).bfloat16().reshape(-1, 320)
    stats = tensor_stats(e_t, a_t)
    assert_agrees_with_oracle(stats, e_t, a_t)
    assert stats.ulp_shares["1"] > 0.1 and stats.ulp_shares["0"] > 0.1  # both sides of the bf16 rounding are seen


def test_the_comparison_catches_a_wrong_sum_or_count():
    # the check above can fail: one part in 1e9 on a sum, one element on a count
    e, a = _noisy(5000, np.float32, seed=4)
    stats = tensor_stats(e, a)
    assert_agrees_with_oracle(stats, e, a)
    for wrong in (replace(stats, relative_l2=stats.relative_l2 * (1 + 1e-9)),
                  replace(stats, one_thousandth_err_ratio=stats.one_thousandth_err_ratio + 1 / 5000),
                  replace(stats, ulp_shares={**stats.ulp_shares, "0": stats.ulp_shares["0"] - 1 / 5000})):
        with pytest.raises(AssertionError):
            assert_agrees_with_oracle(wrong, e, a)
