"""Element-wise tensor metrics against hand-computed values (precision/metrics/tensor.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from precision.metrics import (
    BF16_UNIT_ROUNDOFF,
    DEFINITIONS,
    RELATIVE_ERROR_FLOOR,
    NonFinite,
    bf16_ulp_distance,
    cosine_similarity,
    err_ratio_below,
    euclidean_distance,
    five_thousandths_err_ratio,
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

NAN, INF = float("nan"), float("inf")

SCALAR_METRICS = [
    relative_l2_error,
    max_abs_error,
    mean_abs_error,
    max_relative_error,
    cosine_similarity,
    one_thousandth_err_ratio,
    five_thousandths_err_ratio,
]


def same_float(x: float, y: float) -> bool:
    """Equal up to the last bits of a float64 sum (tensor_stats streams and vectorizes its sums), or both NaN."""
    return (math.isnan(x) and math.isnan(y)) or x == y or math.isclose(x, y, rel_tol=1e-12, abs_tol=1e-300)


# --------------------------------------------------------------------------------------------- constants


def test_constants():
    # bf16 has 8 significand bits including the implicit one -> u = 2^-8.
    assert BF16_UNIT_ROUNDOFF == 0.00390625
    assert RELATIVE_ERROR_FLOOR == 1e-6


def test_constants_are_named_once_in_precision_names():
    from precision import metrics, names
    from precision.metrics import msprobe, tensor

    assert metrics.BF16_UNIT_ROUNDOFF is names.BF16_UNIT_ROUNDOFF
    assert metrics.RELATIVE_ERROR_FLOOR is names.RELATIVE_ERROR_FLOOR and tensor.RELATIVE_ERROR_FLOOR is names.RELATIVE_ERROR_FLOOR
    assert msprobe.THRESHOLDS is names.ERR_RATIO_THRESHOLDS == (names.ONE_THOUSANDTH, names.FIVE_THOUSANDTHS)


def test_the_kernel_counts_below_the_thresholds_it_is_given():
    # the thresholds reach the kernel as arguments from precision.names (not constants frozen into numba's cache):
    # other thresholds give other counts
    from precision.metrics import fused

    e = np.full(4, 1000.0, dtype=np.float32)
    a = np.array([1000.0, 1000.5, 1002.0, 1010.0], dtype=np.float32)  # relative errors 0, 5e-4, 2e-3, 1e-2
    out, _ = fused.fused_accumulate(e, a, RELATIVE_ERROR_FLOOR)
    assert (out[7], out[8]) == (2, 3)
    out, _ = fused.fused_accumulate(e, a, RELATIVE_ERROR_FLOOR, (1e-9, 0.5))
    assert (out[7], out[8]) == (1, 4)


def test_every_tensor_stats_field_has_a_definition():
    from dataclasses import fields

    from precision.metrics import TensorStats

    bookkeeping = {"expected_l2", "elements"}  # inputs of other numbers (pooling), not shown as metrics
    for field in fields(TensorStats):
        if field.name not in bookkeeping:
            assert DEFINITIONS.get(field.name), field.name


@pytest.mark.parametrize("torch_dtype", ["bfloat16", "float16", "float32"])
def test_metric_functions_accept_torch_tensors(torch_dtype):
    torch = pytest.importorskip("torch")
    dtype = getattr(torch, torch_dtype)
    e_t = torch.tensor([[1.0, 2.0, -3.0], [0.5, 0.25, 8.0]], dtype=dtype)
    a_t = torch.tensor([[1.0078125, 2.0, -3.0], [0.5, float("nan"), 8.0]], dtype=dtype)
    e, a = e_t.float().numpy(), a_t.float().numpy()  # the same values (bf16 and fp16 widen exactly)
    for f in SCALAR_METRICS + [euclidean_distance]:
        assert same_float(f(e_t, a_t), f(e, a)), f.__name__
    assert ulp_histogram(e_t, a_t) == ulp_histogram(e, a)
    assert non_finite(e_t, a_t) == non_finite(e, a)
    assert non_finite(e_t, a_t).actual_only_first_index == (1, 1)
    for convention, (x_t, y_t) in (("precision-check", (e_t, a_t)), ("msprobe", (e_t, e_t * 1.5))):
        ours, reference = tensor_stats(x_t, y_t, convention=convention), tensor_stats(x_t.float().numpy(), y_t.float().numpy(), convention=convention)
        for name in ("relative_l2", "max_abs", "max_relative", "mean_abs", "cosine", "one_thousandth_err_ratio",
                     "five_thousandths_err_ratio", "euclidean_distance"):
            assert same_float(getattr(ours, name), getattr(reference, name)), (convention, name)
            assert not math.isnan(getattr(ours, name)), (convention, name)
        assert ours.ulp_shares == reference.ulp_shares and ours.non_finite == reference.non_finite


# ----------------------------------------------------------------------------------- basic hand examples


def test_basic_example_by_hand():
    e, a = np.array([3.0, 4.0]), np.array([3.0, 5.0])
    # a - e = [0, 1]; ||e|| = sqrt(9 + 16) = 5; ||a - e|| = 1 -> 1/5
    assert relative_l2_error(e, a) == pytest.approx(0.2, rel=1e-15)
    # max(|0|, |1|) = 1
    assert max_abs_error(e, a) == 1.0
    # (0 + 1) / 2
    assert mean_abs_error(e, a) == 0.5
    # max(0/3, 1/4) = 0.25
    assert max_relative_error(e, a) == 0.25
    # <e, a> = 9 + 20 = 29; ||a|| = sqrt(9 + 25) = sqrt(34) -> 29 / (5 sqrt 34) = 29 / 29.1547594... = 0.9946918...
    assert cosine_similarity(e, a) == pytest.approx(29 / (5 * math.sqrt(34)), rel=1e-15)
    assert cosine_similarity(e, a) == pytest.approx(0.9946917938, rel=1e-9)
    # relative errors [0, 0.25]: only the first is < 0.001 and < 0.005 -> 1/2 each
    assert one_thousandth_err_ratio(e, a) == 0.5
    assert five_thousandths_err_ratio(e, a) == 0.5


def test_accepts_lists_and_integer_inputs():
    # same as the basic example, given as Python int lists
    assert relative_l2_error([3, 4], [3, 5]) == pytest.approx(0.2, rel=1e-15)
    assert max_abs_error([3, 4], [3, 5]) == 1.0


def test_float32_inputs_are_computed_in_float64():
    # 16777216 = 2^24; 2^24 + 1 is not representable in float32 but the difference of two float32 values
    # 2^24 and 2^24 + 2 is exactly 2 in float64.
    e = np.array([2.0**24], dtype=np.float32)
    a = np.array([2.0**24 + 2], dtype=np.float32)
    assert max_abs_error(e, a) == 2.0
    # 2 / 2^24 = 2^-23 exactly
    assert relative_l2_error(e, a) == 2.0**-23
    # Squares of float32 max (3.4e38) overflow float32 but not float64: ||e|| = 3.4e38 * sqrt(2)
    big = np.full(2, np.finfo(np.float32).max, dtype=np.float32)
    assert relative_l2_error(big, big) == 0.0
    assert cosine_similarity(big, big) == 1.0
    assert tensor_stats(big, big).expected_l2 == pytest.approx(float(np.finfo(np.float32).max) * math.sqrt(2))


def test_relative_l2_is_over_the_whole_tensor_not_per_element():
    e, a = np.array([[1.0, 0.0], [0.0, 0.0]]), np.array([[1.0, 0.0], [0.0, 1.0]])
    # ||a - e|| = 1, ||e|| = 1 -> 1 (per-element relative error would be 1e6 at the zero)
    assert relative_l2_error(e, a) == 1.0
    assert max_relative_error(e, a) == pytest.approx(1.0 / 1e-6)


# ------------------------------------------------------------------------------------------------ zeros


def test_both_all_zero():
    z = np.zeros(4)
    assert relative_l2_error(z, z) == 0.0
    assert max_abs_error(z, z) == 0.0
    assert mean_abs_error(z, z) == 0.0
    assert max_relative_error(z, z) == 0.0  # 0 / max(0, 1e-6) = 0
    assert cosine_similarity(z, z) == 1.0  # defined as identical
    assert one_thousandth_err_ratio(z, z) == 1.0  # 0 < 0.001 everywhere
    assert five_thousandths_err_ratio(z, z) == 1.0
    assert ulp_histogram(z, z) == {"0": 1.0, "1": 0.0, "2": 0.0, ">2": 0.0, "non-finite": 0.0}


def test_negative_zero_equals_zero():
    e, a = np.array([0.0, -0.0]), np.array([-0.0, 0.0])
    assert relative_l2_error(e, a) == 0.0
    assert cosine_similarity(e, a) == 1.0
    assert list(bf16_ulp_distance(e, a)) == [0, 0]


def test_only_expected_all_zero():
    e, a = np.zeros(2), np.array([3.0, 4.0])
    # ||e|| = 0, ||a - e|| = 5 -> +inf
    assert relative_l2_error(e, a) == INF
    assert max_abs_error(e, a) == 4.0
    assert mean_abs_error(e, a) == 3.5
    # 4 / max(0, 1e-6) = 4e6
    assert max_relative_error(e, a) == pytest.approx(4e6, rel=1e-12)
    assert math.isnan(cosine_similarity(e, a))
    assert one_thousandth_err_ratio(e, a) == 0.0
    assert five_thousandths_err_ratio(e, a) == 0.0


def test_only_actual_all_zero():
    e, a = np.array([3.0, 4.0]), np.zeros(2)
    # ||a - e|| = ||e|| = 5 -> 1
    assert relative_l2_error(e, a) == 1.0
    assert max_abs_error(e, a) == 4.0
    assert mean_abs_error(e, a) == 3.5
    # max(3/3, 4/4) = 1
    assert max_relative_error(e, a) == 1.0
    assert math.isnan(cosine_similarity(e, a))
    assert one_thousandth_err_ratio(e, a) == 0.0


# ------------------------------------------------------------------------------------------ NaN and Inf


def test_non_finite_elements_are_excluded_from_error_metrics():
    e = np.array([1.0, NAN, 3.0, 4.0])
    a = np.array([1.0, 2.0, INF, 6.0])
    # finite on both sides: positions 0 (1 vs 1) and 3 (4 vs 6)
    # ||a - e|| = 2, ||e|| = sqrt(1 + 16) = sqrt(17)
    assert relative_l2_error(e, a) == pytest.approx(2 / math.sqrt(17), rel=1e-15)
    assert max_abs_error(e, a) == 2.0
    assert mean_abs_error(e, a) == 1.0  # (0 + 2) / 2
    assert max_relative_error(e, a) == 0.5  # 2 / 4
    # <e, a> = 1 + 24 = 25; ||a|| = sqrt(1 + 36) -> 25 / (sqrt 17 sqrt 37)
    assert cosine_similarity(e, a) == pytest.approx(25 / math.sqrt(17 * 37), rel=1e-15)
    assert one_thousandth_err_ratio(e, a) == 0.5  # only position 0 of 2
    assert list(bf16_ulp_distance(e, a)) == [0, 64]  # 4.0 = 0x4080, 6.0 = 0x40C0 -> 0x40 = 64
    assert ulp_histogram(e, a) == {"0": 0.5, "1": 0.0, "2": 0.0, ">2": 0.5, "non-finite": 0.0}


def test_non_finite_counts_and_locates():
    e = np.array([1.0, NAN, 3.0, 4.0, -INF])
    a = np.array([1.0, 2.0, INF, NAN, NAN])
    nf = non_finite(e, a)
    # element 2: target +Inf where the reference is 3.0 (actual only); element 3 likewise (NaN);
    # element 4: -Inf against NaN (both non-finite, different values); element 1: only the reference is NaN
    assert nf == NonFinite(expected_nan=1, expected_inf=1, actual_nan=2, actual_inf=1, first_index=(1,),
                           actual_only=2, actual_only_first_index=(2,), mismatched=1, mismatched_first_index=(4,))
    assert nf.any


def test_non_finite_first_index_is_in_the_tensors_own_shape():
    e = np.zeros((2, 3, 4))
    a = np.zeros((2, 3, 4))
    a[1, 2, 3] = NAN  # row-major flat index 23
    e[1, 0, 2] = INF  # flat index 12 + 2 = 14: first
    nf = non_finite(e, a)
    assert nf.first_index == (1, 0, 2)
    assert nf == NonFinite(0, 1, 1, 0, (1, 0, 2), 1, (1, 2, 3), 0, None)


def test_non_finite_first_index_either_side():
    e = np.array([[1.0, 2.0], [3.0, NAN]])
    a = np.array([[1.0, -INF], [3.0, 4.0]])
    nf = non_finite(e, a)
    assert nf.first_index == (0, 1)  # the actual's -inf at flat 1 comes before the expected's NaN at flat 3
    assert nf.expected_nan == 1 and nf.actual_inf == 1
    assert nf.expected_inf == 0 and nf.actual_nan == 0


def test_non_finite_all_finite():
    nf = non_finite(np.ones((2, 2)), np.ones((2, 2)))
    assert nf == NonFinite(0, 0, 0, 0, None, 0, None, 0, None)
    assert not nf.any


def test_non_finite_actual_only():
    nf = non_finite(np.array([1.0, 2.0]), np.array([1.0, INF]))
    assert nf.any and nf.actual_only == 1 and nf.actual_only_first_index == (1,)
    assert nf.first_index == (1,)
    nf = non_finite(np.array([NAN, 2.0]), np.array([1.0, 2.0]))
    assert nf.any and nf.actual_only == 0 and nf.actual_only_first_index is None


def test_non_finite_actual_only_is_per_element_not_per_tensor():
    # the review's case: a reference NaN at [0, 0] must not excuse a target NaN at [2, 3]
    e, a = np.ones((3, 4)), np.ones((3, 4))
    e[0, 0] = NAN
    a[2, 3] = NAN
    nf = non_finite(e, a)
    assert nf.actual_only == 1 and nf.actual_only_first_index == (2, 3)
    assert nf.mismatched == 0 and nf.mismatched_first_index is None
    assert nf.first_index == (0, 0)
    # the same NaN on both sides is neither
    a[0, 0], a[2, 3] = NAN, 1.0
    nf = non_finite(e, a)
    assert (nf.actual_only, nf.mismatched, nf.actual_only_first_index) == (0, 0, None)


@pytest.mark.parametrize("e_value, a_value, mismatched", [
    (INF, -INF, 1), (-INF, INF, 1), (NAN, INF, 1), (INF, NAN, 1), (NAN, -INF, 1),
    (INF, INF, 0), (-INF, -INF, 0), (NAN, NAN, 0), (INF, 1.0, 0), (1.0, 2.0, 0),
])
def test_non_finite_mismatched_values(e_value, a_value, mismatched):
    e, a = np.zeros((2, 3), dtype=np.float32), np.zeros((2, 3), dtype=np.float32)
    e[1, 2], a[1, 2] = e_value, a_value
    nf = non_finite(e, a)
    assert nf.mismatched == mismatched
    assert nf.mismatched_first_index == ((1, 2) if mismatched else None)
    assert tensor_stats(e, a).non_finite == nf


def test_non_finite_float32_and_bf16_like_inputs():
    e = np.array([1.0, np.inf], dtype=np.float32)
    a = np.array([np.nan, 1.0], dtype=np.float16)
    assert non_finite(e, a) == NonFinite(0, 1, 1, 0, (0,), 1, (0,), 0, None)


def test_nothing_finite_on_both_sides_gives_nan():
    e = np.array([NAN, 1.0])
    a = np.array([1.0, INF])
    for f in SCALAR_METRICS:
        assert math.isnan(f(e, a)), f.__name__
    assert bf16_ulp_distance(e, a).size == 0
    hist = ulp_histogram(e, a)
    assert set(hist) == {"0", "1", "2", ">2", "non-finite"}
    assert all(math.isnan(v) for v in hist.values())
    s = tensor_stats(e, a)
    for name in ("relative_l2", "max_abs", "max_relative", "mean_abs", "cosine", "one_thousandth_err_ratio",
                 "five_thousandths_err_ratio", "expected_l2"):
        assert math.isnan(getattr(s, name)), name
    assert all(math.isnan(v) for v in s.ulp_shares.values())
    assert s.elements == 2
    assert s.non_finite == NonFinite(1, 0, 0, 1, (0,), 1, (1,), 0, None)


def test_empty_tensors():
    e = a = np.zeros((0, 3))
    for f in SCALAR_METRICS:
        assert math.isnan(f(e, a)), f.__name__
    s = tensor_stats(e, a)
    assert s.elements == 0
    assert s.non_finite == NonFinite(0, 0, 0, 0, None, 0, None, 0, None)
    assert math.isnan(s.relative_l2)


# ----------------------------------------------------------------------------------- 0-d and length-1


def test_zero_dimensional():
    e, a = np.float64(2.0), np.float64(3.0)
    assert relative_l2_error(e, a) == 0.5  # |3 - 2| / 2
    assert max_abs_error(e, a) == 1.0
    assert mean_abs_error(e, a) == 1.0
    assert max_relative_error(e, a) == 0.5
    assert cosine_similarity(e, a) == 1.0  # 6 / (2 * 3)
    # 2.0 = 0x4000, 3.0 = 0x4040 -> 64 bf16 values apart
    assert list(bf16_ulp_distance(e, a)) == [64]
    s = tensor_stats(np.array(2.0), np.array(3.0))
    assert s.elements == 1
    assert s.relative_l2 == 0.5
    assert s.non_finite.first_index is None


def test_zero_dimensional_non_finite_first_index_is_empty_tuple():
    nf = non_finite(np.array(NAN), np.array(1.0))
    assert nf == NonFinite(1, 0, 0, 0, (), 0, None, 0, None)
    s = tensor_stats(np.array(1.0), np.array(-INF))
    assert s.non_finite == NonFinite(0, 0, 0, 1, (), 1, (), 0, None)
    assert math.isnan(s.relative_l2)
    assert s.elements == 1


def test_length_one():
    e, a = np.array([-2.0]), np.array([2.0])
    assert relative_l2_error(e, a) == 2.0  # 4 / 2
    assert cosine_similarity(e, a) == -1.0  # -4 / (2 * 2)
    assert max_relative_error(e, a) == 2.0
    # -2.0 -> -0x4000, 2.0 -> 0x4000: 2 * 16384 = 32768 bf16 values apart
    assert list(bf16_ulp_distance(e, a)) == [32768]


# ----------------------------------------------------------------------------------------- shape checks


@pytest.mark.parametrize(
    "f", SCALAR_METRICS + [bf16_ulp_distance, ulp_histogram, tensor_stats], ids=lambda f: f.__name__
)
def test_shape_mismatch_raises(f):
    with pytest.raises(ValueError, match="shape mismatch"):
        f(np.zeros(3), np.zeros(4))


def test_tensor_stats_rejects_same_size_different_shape():
    with pytest.raises(ValueError, match="shape mismatch"):
        tensor_stats(np.zeros((2, 3)), np.zeros((3, 2)))


def test_same_size_different_shape_raises():
    for f in SCALAR_METRICS + [bf16_ulp_distance, ulp_histogram]:
        with pytest.raises(ValueError, match="shape mismatch"):
            f(np.zeros((2, 3)), np.ones((3, 2)))


def test_non_finite_shape_mismatch_raises():
    with pytest.raises(ValueError):
        non_finite(np.array([1.0, 2.0, NAN]), np.array([1.0]))


# ---------------------------------------------------------------------------------- relative-error floor


def test_floor_applies_to_tiny_expected_values():
    # |e| = 1e-8 < 1e-6: denominator 1e-6 -> 1e-8 / 1e-6 = 0.01 (without the floor it would be 1.0)
    assert max_relative_error([1e-8], [2e-8]) == pytest.approx(0.01, rel=1e-9)
    # custom floor 1e-9 < |e|: |e| is used -> 1e-8 / 1e-8 = 1
    assert max_relative_error([1e-8], [2e-8], floor=1e-9) == pytest.approx(1.0, rel=1e-9)
    # negative tiny expected: |e| = 1e-7 -> 1e-7 / 1e-6 = 0.1
    assert max_relative_error([-1e-7], [0.0]) == pytest.approx(0.1, rel=1e-9)
    # e = 0: 5e-7 / 1e-6 = 0.5
    assert max_relative_error([0.0], [5e-7]) == pytest.approx(0.5, rel=1e-9)


def test_floor_not_applied_above_it():
    # |e| = 2e-6 > 1e-6: 1e-6 / 2e-6 = 0.5
    assert max_relative_error([2e-6], [3e-6]) == pytest.approx(0.5, rel=1e-9)
    # |e| = 1e-6 exactly: max(1e-6, 1e-6) -> 1e-6 / 1e-6 = 1
    assert max_relative_error([1e-6], [2e-6]) == pytest.approx(1.0, rel=1e-9)


def test_floor_in_msprobe_ratios():
    e = np.zeros(3)
    # 5e-10 / 1e-6 = 5e-4 (< 1e-3); 2e-9 / 1e-6 = 2e-3 (< 5e-3 only); 1e-8 / 1e-6 = 1e-2 (neither)
    a = np.array([5e-10, 2e-9, 1e-8])
    assert one_thousandth_err_ratio(e, a) == pytest.approx(1 / 3)
    assert five_thousandths_err_ratio(e, a) == pytest.approx(2 / 3)
    # with floor 1e-12 all three relative errors are >= 500
    assert err_ratio_below(e, a, 1e-3, floor=1e-12) == 0.0
    # with floor 1.0 all are <= 1e-8
    assert err_ratio_below(e, a, 1e-3, floor=1.0) == 1.0


# ------------------------------------------------------------------------------------- msprobe ratios


def test_msprobe_ratios_strictly_below_threshold():
    e = np.full(5, 1000.0)
    # differences are exact: 0, 0.5, 1, 4, 5; divided by 1000 -> 0, 5e-4, 1e-3, 4e-3, 5e-3
    # (1/1000 and 5/1000 are correctly rounded, i.e. bit-equal to the literals 1e-3 and 5e-3)
    a = np.array([1000.0, 1000.5, 1001.0, 1004.0, 1005.0])
    assert 1.0 / 1000.0 == 1e-3 and 5.0 / 1000.0 == 5e-3
    # < 1e-3: 0, 5e-4 -> 2/5 (1e-3 itself is not below)
    assert one_thousandth_err_ratio(e, a) == 0.4
    # < 5e-3: 0, 5e-4, 1e-3, 4e-3 -> 4/5 (5e-3 itself is not below)
    assert five_thousandths_err_ratio(e, a) == 0.8


def test_msprobe_ratios_just_around_thresholds():
    e = np.array([1000.0, 1000.0])
    # 0.999 / 1000 < 1e-3 counts; 1.001 / 1000 > 1e-3 does not
    assert one_thousandth_err_ratio(e, np.array([1000.999, 1001.001])) == 0.5
    # 4.999 / 1000 < 5e-3 counts; 5.001 / 1000 does not
    assert five_thousandths_err_ratio(e, np.array([1004.999, 1005.001])) == 0.5
    # negative differences count the same as positive ones
    assert one_thousandth_err_ratio(e, np.array([999.001, 998.999])) == 0.5
    assert five_thousandths_err_ratio(e, np.array([995.001, 994.999])) == 0.5


def test_err_ratio_below_is_the_general_form():
    e = np.full(4, 100.0)
    a = np.array([100.0, 101.0, 102.0, 110.0])  # relative errors 0, 0.01, 0.02, 0.1
    assert err_ratio_below(e, a, 0.015) == 0.5
    assert err_ratio_below(e, a, 0.02) == 0.5  # 0.02 is not strictly below 0.02
    assert err_ratio_below(e, a, 0.5) == 1.0
    assert err_ratio_below(e, a, 0.0) == 0.0  # nothing is < 0


# ------------------------------------------------------------------------------------------------ cosine


# A vector whose float64 <x, x> / (||x|| ||x||) rounds to 1.0000000000000002 (found by search).
CLIP_VECTOR = np.array([-1.1138308775395456, -0.4529517073695439])


def test_cosine_is_clipped_to_one():
    x = CLIP_VECTOR
    norm = np.linalg.norm(x)
    assert np.dot(x, x) / (norm * norm) > 1.0  # the unclipped formula exceeds 1 for this vector
    assert cosine_similarity(x, x) == 1.0
    assert tensor_stats(x, x).cosine == 1.0


def test_cosine_is_clipped_to_minus_one():
    x = CLIP_VECTOR
    norm = np.linalg.norm(x)
    assert np.dot(x, -x) / (norm * norm) < -1.0
    assert cosine_similarity(x, -x) == -1.0


def test_cosine_orthogonal_and_scaled():
    assert cosine_similarity([1.0, 0.0], [0.0, 5.0]) == 0.0  # <e, a> = 0
    # a = 3e: cosine 1 whatever the scale (ratios are not cosine's business)
    assert cosine_similarity([1.0, 2.0, 2.0], [3.0, 6.0, 6.0]) == pytest.approx(1.0, rel=1e-15)
    # e = [1, 1], a = [1, 0]: 1 / (sqrt 2 * 1)
    assert cosine_similarity([1.0, 1.0], [1.0, 0.0]) == pytest.approx(1 / math.sqrt(2), rel=1e-15)


# ---------------------------------------------------------------------------------------- bf16 ULPs

BF16_MIN_SUBNORMAL = 2.0**-133  # 2^-126 (min normal exponent) * 2^-7 (7 stored fraction bits)


def ulp(e, a) -> int:
    d = bf16_ulp_distance(np.array([e], dtype=np.float64), np.array([a], dtype=np.float64))
    assert d.shape == (1,)
    return int(d[0])


def test_bf16_ulp_one_step_above_one():
    # bf16 spacing in [1, 2) is 2^-7 = 0.0078125: 1.0 = 0x3F80, 1.0078125 = 0x3F81
    assert ulp(1.0, 1.0078125) == 1
    assert ulp(1.0, 1.0 + 2 * 2**-7) == 2
    assert ulp(1.0, 2.0) == 128  # 0x4000 - 0x3F80 = 0x80
    assert ulp(1.0, 1.0) == 0


def test_bf16_ulp_signed_zero():
    assert ulp(0.0, -0.0) == 0
    assert ulp(-0.0, BF16_MIN_SUBNORMAL) == 1


def test_bf16_ulp_rounding_to_nearest_even():
    # 1 + 2^-9 is a quarter of a bf16 step above 1.0: rounds to 1.0 -> 0 ULP
    assert ulp(1.0, 1.0 + 2**-9) == 0
    # 1 + 2^-8 is exactly halfway between 0x3F80 and 0x3F81: ties to even 0x3F80 -> 0
    assert ulp(1.0, 1.0 + 2**-8) == 0
    # 1 + 2^-8 + 2^-20 (a float32) is just above halfway -> 0x3F81 -> 1
    assert ulp(1.0, 1.0 + 2**-8 + 2**-20) == 1
    # 1 + 2^-7 + 2^-8 is halfway between 0x3F81 (odd) and 0x3F82 (even): -> 0x3F82 -> 2
    assert ulp(1.0, 1.0 + 2**-7 + 2**-8) == 2
    # same with float32 input
    e = np.array([1.0, 1.0], dtype=np.float32)
    a = np.array([1.0 + 2**-8, 1.0 + 2**-7 + 2**-8], dtype=np.float32)
    assert list(bf16_ulp_distance(e, a)) == [0, 2]


def test_bf16_ulp_negative_numbers():
    assert ulp(-1.0, -1.0078125) == 1
    assert ulp(-1.0078125, -1.0) == 1
    assert ulp(-1.0, -(1.0 + 2**-9)) == 0
    assert ulp(-1.0, -(1.0 + 2**-7 + 2**-8)) == 2  # ties to even in magnitude, as for positives
    assert ulp(-2.0, -1.0) == 128


def test_bf16_ulp_crossing_zero():
    # smallest positive subnormal 0x0001 and smallest negative 0x8001: 1 -> 0 -> -1
    assert ulp(BF16_MIN_SUBNORMAL, -BF16_MIN_SUBNORMAL) == 2
    assert ulp(BF16_MIN_SUBNORMAL, 2 * BF16_MIN_SUBNORMAL) == 1
    # 1.0 (0x3F80 = 16256) to -1.0 (-16256): 32512
    assert ulp(1.0, -1.0) == 32512


def test_bf16_ulp_subnormals_flush_below_half_the_smallest():
    # 2^-135 is a quarter of the smallest bf16 subnormal: rounds to 0
    assert ulp(0.0, 2.0**-135) == 0
    # 2^-149 (smallest float32 subnormal) also rounds to 0
    assert ulp(0.0, 2.0**-149) == 0


def test_bf16_ulp_overflow_is_one_past_max():
    bf16_max = (2 - 2**-7) * 2.0**127  # 0x7F7F
    f32_max = float(np.finfo(np.float32).max)  # 0x7F7FFFFF rounds up to 0x7F80 (inf)
    assert ulp(bf16_max, f32_max) == 1
    assert ulp(bf16_max, (2 - 2**-6) * 2.0**127) == 1  # 0x7F7E, one step below the max


def test_ulp_shares_count_both_overflow_as_non_finite():
    # float32 values at or above (2 - 2^-8) * 2^127 round to bf16 Inf: both sides overflowing are not "identical"
    f32_max = float(np.finfo(np.float32).max)
    e = np.array([f32_max, f32_max, -f32_max, 1.0], dtype=np.float32)
    a = np.array([f32_max, -f32_max, -f32_max, 1.0], dtype=np.float32)
    expected = {"0": 0.25, "1": 0.0, "2": 0.0, ">2": 0.0, "non-finite": 0.75}
    assert ulp_histogram(e, a) == expected
    assert tensor_stats(e, a).ulp_shares == expected  # the streamed (fused) path
    # one side overflowing keeps its distance: bf16 max to Inf is one step
    bf16_max = np.float32((2 - 2**-7) * 2.0**127)
    assert ulp_histogram(np.array([bf16_max]), np.array([f32_max], dtype=np.float32))["1"] == 1.0


def test_bf16_ulp_excludes_non_finite_and_keeps_order():
    e = np.array([[1.0, NAN], [2.0, 4.0]])
    a = np.array([[1.0078125, 3.0], [INF, 4.0]])
    # finite pairs in row-major order: (1, 1.0078125), (4, 4)
    assert bf16_ulp_distance(e, a).tolist() == [1, 0]


def test_bf16_ulp_returns_integers():
    d = bf16_ulp_distance(np.array([1.0, 2.0]), np.array([1.0, 3.0]))
    assert np.issubdtype(d.dtype, np.integer)
    assert d.tolist() == [0, 64]


def test_bf16_ulp_float64_is_rounded_through_float32_like_torch():
    # Documented: float64 goes to float32 first (as torch's cast does), so 1 + 2^-8 + 2^-40 becomes the float32
    # tie 1 + 2^-8, which rounds to even: 1.0. torch agrees.
    import torch

    x = 1.0 + 2**-8 + 2**-40
    assert torch.tensor(x, dtype=torch.float64).to(torch.bfloat16).item() == 1.0
    assert ulp(x, 1.0) == 0
    assert ulp(x, 1.0078125) == 1


def test_ulp_histogram_by_hand():
    e = np.ones(9)
    a = np.array([1.0, 1.0, 1.0078125, 1.015625, 1.0234375, 2.0, 1.0, 1.0, NAN])
    # distances of the 8 finite pairs: [0, 0, 1, 2, 3, 128, 0, 0]
    hist = ulp_histogram(e, a)
    assert hist == {"0": 0.5, "1": 0.125, "2": 0.125, ">2": 0.25, "non-finite": 0.0}
    assert list(hist) == ["0", "1", "2", ">2", "non-finite"]
    assert sum(hist.values()) == 1.0


def test_ulp_histogram_shares_sum_to_one_on_random_data():
    rng = np.random.default_rng(1)
    e = rng.standard_normal(1000).astype(np.float32)
    a = (e * (1 + rng.standard_normal(1000) * 2**-7)).astype(np.float32)
    hist = ulp_histogram(e, a)
    assert sum(hist.values()) == pytest.approx(1.0, abs=1e-12)
    assert all(0.0 < hist[k] < 1.0 for k in ("0", "1", "2", ">2"))  # this noise populates every distance bucket
    assert hist["non-finite"] == 0.0


# ----------------------------------------------------------------------------------------- tensor_stats


def assert_stats_match_functions(e, a):
    """tensor_stats and each single-metric view against the oracle's plain numpy definitions."""
    s = tensor_stats(e, a)
    for view, definition, field in ((relative_l2_error, oracle.relative_l2_error, "relative_l2"),
                                    (max_abs_error, oracle.max_abs_error, "max_abs"),
                                    (max_relative_error, oracle.max_relative_error, "max_relative"),
                                    (mean_abs_error, oracle.mean_abs_error, "mean_abs"),
                                    (cosine_similarity, oracle.cosine_similarity, "cosine"),
                                    (one_thousandth_err_ratio, oracle.one_thousandth_err_ratio, "one_thousandth_err_ratio"),
                                    (five_thousandths_err_ratio, oracle.five_thousandths_err_ratio, "five_thousandths_err_ratio"),
                                    (euclidean_distance, oracle.euclidean_distance, "euclidean_distance")):
        assert same_float(getattr(s, field), definition(e, a)), field
        assert same_float(view(e, a), definition(e, a)), field
    hist = oracle.ulp_histogram(e, a)
    assert set(s.ulp_shares) == set(hist)
    assert all(same_float(s.ulp_shares[k], hist[k]) for k in hist)
    assert ulp_histogram(e, a) == s.ulp_shares
    assert s.non_finite == non_finite(e, a)
    assert s.elements == np.asarray(e).size
    keep = np.isfinite(np.asarray(e, np.float64)) & np.isfinite(np.asarray(a, np.float64))
    if keep.any():
        assert s.expected_l2 == pytest.approx(float(np.linalg.norm(np.asarray(e, np.float64)[keep])), rel=1e-14)
    return s


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tensor_stats_agrees_with_each_function(dtype):
    rng = np.random.default_rng(42)
    e = rng.standard_normal((7, 33)).astype(dtype)
    a = (e + rng.standard_normal((7, 33)) * 1e-3).astype(dtype)
    s = assert_stats_match_functions(e, a)
    assert s.elements == 7 * 33
    assert not s.non_finite.any
    assert 0 < s.relative_l2 < 1e-2
    assert 0.99 < s.cosine <= 1.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tensor_stats_agrees_with_each_function_with_non_finite(dtype):
    rng = np.random.default_rng(7)
    e = rng.standard_normal((5, 20)).astype(dtype)
    a = (e + rng.standard_normal((5, 20)) * 1e-2).astype(dtype)
    e[0, 3] = np.nan
    a[2, 1] = np.inf
    a[4, 19] = -np.inf
    e[4, 19] = np.nan
    s = assert_stats_match_functions(e, a)
    # a[2, 1] = +Inf where e is finite (actual only); e[4, 19] NaN against a[4, 19] -Inf (mismatched)
    assert s.non_finite == NonFinite(expected_nan=2, expected_inf=0, actual_nan=0, actual_inf=2, first_index=(0, 3),
                                     actual_only=1, actual_only_first_index=(2, 1), mismatched=1, mismatched_first_index=(4, 19))
    assert s.elements == 100
    assert math.isfinite(s.relative_l2)


def test_tensor_stats_by_hand():
    e, a = np.array([[3.0, 4.0], [0.0, NAN]]), np.array([[3.0, 5.0], [0.0, 1.0]])
    s = tensor_stats(e, a)
    # finite pairs (3,3), (4,5), (0,0): ||e|| = 5, ||a-e|| = 1
    assert s.relative_l2 == pytest.approx(0.2, rel=1e-15)
    assert s.expected_l2 == 5.0
    assert s.max_abs == 1.0
    assert s.mean_abs == pytest.approx(1 / 3)
    assert s.max_relative == 0.25
    assert s.one_thousandth_err_ratio == pytest.approx(2 / 3)
    # 4.0 = 0x4080, 5.0 = 0x40A0: 32 apart
    assert s.ulp_shares == pytest.approx({"0": 2 / 3, "1": 0.0, "2": 0.0, ">2": 1 / 3, "non-finite": 0.0})
    assert s.elements == 4
    assert s.non_finite == NonFinite(1, 0, 0, 0, (1, 1), 0, None, 0, None)


# ---------------------------------------------------------------------- float64 range (norm under/overflow)


def test_relative_l2_is_scale_invariant_in_float64_range():
    assert relative_l2_error([1e-200], [2e-200]) == pytest.approx(1.0)
    assert relative_l2_error([1e200], [2e200]) == pytest.approx(1.0)


def test_cosine_of_opposite_float64_subnormals():
    assert cosine_similarity([5e-324], [-5e-324]) == -1.0
