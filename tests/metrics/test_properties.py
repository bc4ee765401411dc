"""Property-based tests of the metrics (hypothesis)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from precision.metrics import (
    bf16_ulp_distance,
    cosine_similarity,
    err_ratio_below,
    five_thousandths_err_ratio,
    logits_stats,
    max_abs_error,
    max_relative_error,
    mean_abs_error,
    non_finite,
    one_thousandth_err_ratio,
    relative_l2_error,
    tensor_stats,
    ulp_histogram,
)
from tests.metrics import oracle

# No example database: keep the checkout free of a .hypothesis folder.
SETTINGS = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

# Overflow/underflow in float64 intermediates (e.g. 1e308 - (-1e308)) warn; the properties hold regardless.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DTYPES = st.sampled_from([np.float32, np.float64])
SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=6)

BF16_MAX = 3.3895313892515355e38  # (2 - 2^-7) * 2^127

# Values picked with extra weight on the extremes: huge, tiny, float32/float64 subnormals, signed zeros.
SPECIAL_VALUES = [0.0, -0.0, 1.0, -1.0, 1e30, -1e30, 1e-30, -1e-30, 1e-40, -1e-40, 2.0**-133, -(2.0**-133),
                  1.0078125, 1.0 + 2**-8, 3.3895313892515355e38, -3.3895313892515355e38]


def elements(dtype, *, allow_non_finite: bool):
    width = 32 if dtype == np.float32 else 64
    base = st.floats(width=width, allow_nan=allow_non_finite, allow_infinity=allow_non_finite, allow_subnormal=True)
    special = [v for v in SPECIAL_VALUES if width == 64 or abs(v) <= float(np.finfo(np.float32).max)]
    special = [float(np.float32(v)) for v in special] if width == 32 else special
    extra = [float("nan"), float("inf"), float("-inf")] if allow_non_finite else []
    return st.one_of(base, st.sampled_from(special + extra))


@st.composite
def pairs(draw, *, allow_non_finite: bool = False):
    """Two arrays of one shape and dtype; the second is often a small perturbation of the first."""
    dtype = draw(DTYPES)
    shape = draw(SHAPES)
    e = draw(hnp.arrays(dtype, shape, elements=elements(dtype, allow_non_finite=allow_non_finite)))
    how = draw(st.sampled_from(["independent", "perturbed", "identical"]))
    if how == "independent":
        a = draw(hnp.arrays(dtype, shape, elements=elements(dtype, allow_non_finite=allow_non_finite)))
    elif how == "perturbed":
        factors = draw(hnp.arrays(np.float64, shape, elements=st.floats(-0.01, 0.01)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a = (e.astype(np.float64) * (1.0 + factors)).astype(dtype)
        if not allow_non_finite:
            a = np.where(np.isfinite(a), a, e)
    else:
        a = e.copy()
    return e, a


def finite_pair_exists(e, a) -> bool:
    return bool((np.isfinite(e) & np.isfinite(a)).any())


# ------------------------------------------------------------------------------------------ finite data


@SETTINGS
@given(pairs())
def test_relative_l2_non_negative_or_nan(pair):
    e, a = pair
    r = relative_l2_error(e, a)
    assert isinstance(r, float)
    assert r >= 0.0 or math.isnan(r)


@SETTINGS
@given(pairs())
def test_relative_l2_of_identical_is_zero(pair):
    e, _ = pair
    assert relative_l2_error(e, e.copy()) == 0.0
    assert max_abs_error(e, e.copy()) == 0.0
    assert mean_abs_error(e, e.copy()) == 0.0
    assert max_relative_error(e, e.copy()) == 0.0
    assert one_thousandth_err_ratio(e, e.copy()) == 1.0
    assert bf16_ulp_distance(e, e.copy()).max() == 0


@SETTINGS
@given(pairs())
def test_cosine_in_range_or_nan(pair):
    e, a = pair
    c = cosine_similarity(e, a)
    assert -1.0 <= c <= 1.0 or math.isnan(c)


@SETTINGS
@given(pairs())
def test_ratios_in_unit_interval_and_ordered(pair):
    e, a = pair
    one, five = one_thousandth_err_ratio(e, a), five_thousandths_err_ratio(e, a)
    assert 0.0 <= one <= 1.0
    assert 0.0 <= five <= 1.0
    # every element below 0.001 is also below 0.005
    assert one <= five
    assert err_ratio_below(e, a, 0.0) == 0.0


@SETTINGS
@given(pairs())
def test_abs_errors_ordered(pair):
    e, a = pair
    mx, mean = max_abs_error(e, a), mean_abs_error(e, a)
    assert mx >= 0.0 and mean >= 0.0
    # (the float64 mean of n equal values may round one ulp above them)
    assert mean <= mx * (1 + 1e-12) or math.isinf(mean) or math.isinf(mx)


@SETTINGS
@given(pairs())
def test_ulp_histogram_sums_to_one(pair):
    e, a = pair
    hist = ulp_histogram(e, a)
    assert list(hist) == ["0", "1", "2", ">2", "non-finite"]
    assert all(0.0 <= v <= 1.0 for v in hist.values())
    assert sum(hist.values()) == pytest.approx(1.0, abs=1e-12)
    d = bf16_ulp_distance(e, a)
    # oracle for overflow: torch's own float -> bfloat16 cast (float64 goes through float32, as documented)
    torch = pytest.importorskip("torch")
    keep = np.isfinite(e) & np.isfinite(a)

    def bf16_inf(x):
        return torch.isinf(torch.from_numpy(np.asarray(x[keep], dtype=np.float32).reshape(-1)).to(torch.bfloat16)).numpy()

    both_overflow = bf16_inf(e) & bf16_inf(a)
    assert hist["non-finite"] == pytest.approx(np.count_nonzero(both_overflow) / d.size)
    assert hist["0"] == pytest.approx(np.count_nonzero((d == 0) & ~both_overflow) / d.size)


@SETTINGS
@given(pairs())
def test_bf16_ulp_distance_symmetric_and_non_negative(pair):
    e, a = pair
    d1, d2 = bf16_ulp_distance(e, a), bf16_ulp_distance(a, e)
    np.testing.assert_array_equal(d1, d2)
    assert (d1 >= 0).all()
    assert d1.shape == (e.size,)


@SETTINGS
@given(pairs())
def test_bf16_ulp_distance_triangle_inequality(pair):
    # distances are differences of positions on the ordered bf16 line: d(e, a) <= d(e, 0) + d(0, a)
    e, a = pair
    z = np.zeros_like(e)
    assert (bf16_ulp_distance(e, a) <= bf16_ulp_distance(e, z) + bf16_ulp_distance(z, a)).all()


@SETTINGS
@given(st.floats(min_value=-BF16_MAX, max_value=BF16_MAX, width=32, allow_subnormal=True))
def test_bf16_ulp_zero_to_own_bf16_rounding(x):
    # a float32 value and its bf16 rounding (torch, nearest-even) are the same bf16 value
    # (bounded by the bf16 max: above it float32 values round to bf16 inf, which the metric excludes)
    torch = pytest.importorskip("torch")
    rounded = torch.tensor([x], dtype=torch.float32).to(torch.bfloat16).to(torch.float32).numpy()
    assert bf16_ulp_distance(np.array([x], dtype=np.float32), rounded)[0] == 0


@SETTINGS
@given(
    hnp.arrays(np.float64, st.integers(1, 8), elements=st.one_of(st.just(0.0), st.floats(1e-50, 1e50),
                                                                  st.floats(-1e50, -1e-50))),
    hnp.arrays(np.float64, 8, elements=st.floats(-0.5, 0.5)),
    st.integers(-20, 20),
)
def test_scale_invariance_of_relative_metrics(e, noise, k):
    # scaling both sides by 2^k is exact in this range, so the relative metrics must not change
    a = e * (1.0 + noise[: e.size])
    s = 2.0**k
    assert relative_l2_error(e * s, a * s) == pytest.approx(relative_l2_error(e, a), rel=1e-12, nan_ok=True)
    c1, c2 = cosine_similarity(e * s, a * s), cosine_similarity(e, a)
    assert c1 == pytest.approx(c2, rel=1e-12, abs=1e-15, nan_ok=True)


# -------------------------------------------------------------------------------------- non-finite mixes


def same_float(x, y) -> bool:
    # tensor_stats streams its sums (and vectorizes them in the fused kernel), so its float64 sums may differ
    # from the oracle's in the last bits; counts, maxima and shares agree exactly. The dot product
    # of a cosine can cancel catastrophically (1e30 - 1e30 + 7e13), so near-zero results agree only absolutely.
    return (math.isnan(x) and math.isnan(y)) or x == y or math.isclose(x, y, rel_tol=1e-12, abs_tol=1e-12)


@SETTINGS
@given(pairs(allow_non_finite=True))
def test_metrics_never_raise_on_non_finite_mixes(pair):
    e, a = pair
    s = tensor_stats(e, a)
    definitions = {  # the oracle's plain numpy definitions (tests/metrics/oracle.py)
        "relative_l2": oracle.relative_l2_error(e, a),
        "max_abs": oracle.max_abs_error(e, a),
        "max_relative": oracle.max_relative_error(e, a),
        "mean_abs": oracle.mean_abs_error(e, a),
        "cosine": oracle.cosine_similarity(e, a),
        "one_thousandth_err_ratio": oracle.one_thousandth_err_ratio(e, a),
        "five_thousandths_err_ratio": oracle.five_thousandths_err_ratio(e, a),
        "euclidean_distance": oracle.euclidean_distance(e, a),
    }
    for name, value in definitions.items():
        if name in ("relative_l2", "euclidean_distance") and math.isinf(definitions["max_abs"]):
            assert getattr(s, name) == math.inf  # a - e overflows float64: the oracle's scaled norm says NaN there
            continue
        assert same_float(getattr(s, name), value), name
    hist = oracle.ulp_histogram(e, a)
    assert ulp_histogram(e, a) == s.ulp_shares
    assert all(same_float(s.ulp_shares[k], hist[k]) for k in hist)

    nf = non_finite(e, a)
    assert s.non_finite == nf
    assert nf.expected_nan == np.isnan(e).sum() and nf.actual_nan == np.isnan(a).sum()
    assert nf.expected_inf == np.isinf(e).sum() and nf.actual_inf == np.isinf(a).sum()
    bad = ~np.isfinite(e) | ~np.isfinite(a)
    if bad.any():
        assert nf.any
        assert len(nf.first_index) == e.ndim
        assert bad[nf.first_index]
        flat = np.ravel_multi_index(nf.first_index, e.shape) if e.ndim else 0
        assert not bad.ravel()[:flat].any()
    else:
        assert nf.first_index is None and not nf.any
    # per element, against the plain numpy definitions (the oracle)
    with np.errstate(invalid="ignore"):
        actual_only = ~np.isfinite(a) & np.isfinite(e)
        both = ~np.isfinite(a) & ~np.isfinite(e)
        same_value = np.array([(x != x and y != y) or x == y for x, y in zip(e.ravel().tolist(), a.ravel().tolist())],
                              dtype=bool).reshape(e.shape)
    mismatched = both & ~same_value
    for count, first, mask in ((nf.actual_only, nf.actual_only_first_index, actual_only),
                               (nf.mismatched, nf.mismatched_first_index, mismatched)):
        assert count == int(mask.sum())
        if count:
            assert first == tuple(int(i) for i in np.unravel_index(int(np.flatnonzero(mask.ravel())[0]), e.shape))
        else:
            assert first is None

    if finite_pair_exists(e, a):
        assert sum(hist.values()) == pytest.approx(1.0, abs=1e-12)
        assert 0.0 <= s.one_thousandth_err_ratio <= s.five_thousandths_err_ratio <= 1.0
        assert -1.0 <= s.cosine <= 1.0 or math.isnan(s.cosine)
        assert s.relative_l2 >= 0.0 or math.isnan(s.relative_l2)
        # the error metrics only see the finite pairs
        keep = ~bad
        assert same_float(relative_l2_error(e[keep], a[keep]), s.relative_l2)
        assert bf16_ulp_distance(e, a).size == keep.sum()
    else:
        assert math.isnan(s.relative_l2) and math.isnan(s.cosine) and math.isnan(s.max_abs)
        assert all(math.isnan(v) for v in hist.values())
    np.testing.assert_array_equal(bf16_ulp_distance(e, a), bf16_ulp_distance(a, e))


# ------------------------------------------------------------------------------------------------ logits


@SETTINGS
@given(
    hnp.arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 9)),
               elements=st.floats(-30, 30, width=32)),
    st.data(),
)
def test_logits_metrics_in_range(e, data):
    a = data.draw(hnp.arrays(np.float32, e.shape, elements=st.floats(-30, 30, width=32)))
    s = logits_stats(e, a)
    assert s.finite_rows.all()
    assert (s.kl >= 0.0).all()
    assert ((s.top5_overlap >= 0.0) & (s.top5_overlap <= 1.0)).all()
    np.testing.assert_array_equal(s.top1_agree, s.expected_top1 == s.actual_top1)
    np.testing.assert_array_equal(s.expected_top1, np.argmax(e, axis=1))  # argmax also takes the lowest id
    np.testing.assert_array_equal(s.actual_top1, np.argmax(a, axis=1))
    np.testing.assert_allclose(s.max_abs, np.abs(a.astype(np.float64) - e).max(axis=1))
    if e.shape[1] > 1:
        assert (s.expected_margin >= 0.0).all()
    same = logits_stats(e, e.copy())
    assert (same.kl == 0.0).all() and (same.top5_overlap == 1.0).all() and same.top1_agree.all()


@SETTINGS
@given(pairs(allow_non_finite=True), st.integers(1, 5))
def test_msprobe_convention_does_not_depend_on_blocks(pair, rows_per_block):
    # streamed in row blocks or in one piece: the same msprobe numbers (sums may differ in their last bits only)
    from precision.metrics import msprobe_metrics
    from precision.metrics.tensor import StreamingStats

    e, a = pair
    whole = msprobe_metrics(e, a)
    e2, a2 = e.reshape(e.shape[0] if e.ndim else 1, -1), a.reshape(e.shape[0] if e.ndim else 1, -1)
    stream = StreamingStats(e2.shape, convention="msprobe")
    for start in range(0, e2.shape[0], rows_per_block):
        stream.add(e2[start:start + rows_per_block], a2[start:start + rows_per_block])
    streamed = stream.result()
    assert streamed.convention == "msprobe"
    for name, value in whole.items():
        got = getattr(streamed, name)
        assert same_float(got, value) or math.isclose(got, value, rel_tol=1e-9), name
