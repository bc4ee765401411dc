"""Per-position logits metrics (precision/metrics/logits.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import special

from precision.metrics import logits_stats

NAN, INF = float("nan"), float("inf")
ARRAY_FIELDS = ("kl", "top1_agree", "top5_overlap", "expected_margin", "expected_top1", "actual_top1", "max_abs",
                "flip_margin", "other_rms", "flip_scale", "finite_rows")


def scipy_kl(e: np.ndarray, a: np.ndarray) -> np.ndarray:
    """KL(softmax(e) || softmax(a)) per row, directly in float64 with scipy."""
    p = special.softmax(e.astype(np.float64), axis=1)
    log_p = special.log_softmax(e.astype(np.float64), axis=1)
    log_q = special.log_softmax(a.astype(np.float64), axis=1)
    return (p * (log_p - log_q)).sum(axis=1)


def assert_stats_equal(s1, s2, *, rtol=1e-12):
    for name in ARRAY_FIELDS:
        x, y = getattr(s1, name), getattr(s2, name)
        assert x.shape == y.shape, name
        if x.dtype.kind == "f":
            np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-15, equal_nan=True, err_msg=name)
        else:
            np.testing.assert_array_equal(x, y, err_msg=name)


# ----------------------------------------------------------------------------------------------------- KL


def test_kl_of_identical_rows_is_zero():
    rng = np.random.default_rng(0)
    e = rng.standard_normal((4, 100)) * 3
    s = logits_stats(e, e.copy())
    assert np.all(s.kl == 0.0)
    assert s.kl.dtype == np.float64


def test_kl_is_invariant_to_a_constant_shift():
    e = np.array([[1.0, 2.0, 3.0]])
    # softmax(e + 100) = softmax(e) -> KL = 0
    assert logits_stats(e, e + 100.0).kl[0] == pytest.approx(0.0, abs=1e-14)


def test_kl_two_token_example_by_hand():
    # p = softmax([0, 0]) = [1/2, 1/2]; q = softmax([0, ln 3]) = [1/4, 3/4]
    # KL = 1/2 ln((1/2)/(1/4)) + 1/2 ln((1/2)/(3/4)) = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3) = 0.1438410362...
    e = np.array([[0.0, 0.0]])
    a = np.array([[0.0, math.log(3.0)]])
    s = logits_stats(e, a)
    assert s.kl[0] == pytest.approx(0.5 * math.log(4 / 3), rel=1e-12)
    assert s.kl[0] == pytest.approx(0.1438410362, rel=1e-9)
    # KL is not symmetric: KL(q || p) = 1/4 ln((1/4)/(1/2)) + 3/4 ln((3/4)/(1/2)) = -1/4 ln 2 + 3/4 ln(3/2)
    assert logits_stats(a, e).kl[0] == pytest.approx(-0.25 * math.log(2) + 0.75 * math.log(1.5), rel=1e-12)


def test_kl_matches_scipy_float64():
    rng = np.random.default_rng(1)
    e = (rng.standard_normal((10, 257)) * 4).astype(np.float32)
    a = (e + rng.standard_normal((10, 257)) * 0.5).astype(np.float32)
    s = logits_stats(e, a)
    expected = scipy_kl(e, a)
    assert np.all(expected > 0)
    np.testing.assert_allclose(s.kl, expected, rtol=1e-10, atol=1e-15)


def test_kl_large_logits_are_stable():
    # 1000 and 0: softmax([1000, 0]) = [1, e^-1000] without overflow; p identical on both sides -> 0
    e = np.array([[1000.0, 0.0], [0.0, 1000.0]])
    a = np.array([[1000.0, 0.0], [1000.0, 0.0]])
    s = logits_stats(e, a)
    assert s.kl[0] == 0.0
    # row 1: p = [~0, 1], log p_a = [0, -1000] -> KL ~= 1 * (0 - (-1000)) = 1000
    assert s.kl[1] == pytest.approx(1000.0, rel=1e-12)
    assert np.all(np.isfinite(s.kl))


# ------------------------------------------------------------------------------------------------- top-k


def test_top1_ties_broken_by_lowest_id():
    e = np.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 1.0, 0.0]])
    a = np.array([[3.0, 1.0, 3.0, 3.0], [1.0, 2.0, 2.0, 0.0]])
    s = logits_stats(e, a)
    # row 0: e's max 3 at ids 1, 2 -> 1; a's max 3 at ids 0, 2, 3 -> 0
    # row 1: e's max 2 at ids 0, 1 -> 0; a's max 2 at ids 1, 2 -> 1
    assert s.expected_top1.tolist() == [1, 0]
    assert s.actual_top1.tolist() == [0, 1]
    assert s.top1_agree.tolist() == [False, False]


def test_top1_agree_when_tied_on_both_sides():
    e = np.array([[5.0, 5.0, 5.0]])
    a = np.array([[7.0, 7.0, 1.0]])
    s = logits_stats(e, a)
    assert s.expected_top1.tolist() == [0] and s.actual_top1.tolist() == [0]
    assert s.top1_agree.tolist() == [True]


def test_top5_overlap_by_hand():
    e = np.arange(10.0)[None, :]  # top5 = {9, 8, 7, 6, 5}
    a_same_order = e * 2
    a_reversed = e[:, ::-1].copy()  # top5 = {0, 1, 2, 3, 4}
    a_swap = e.copy()
    a_swap[0, [4, 5]] = a_swap[0, [5, 4]]  # top5 = {9, 8, 7, 6, 4}
    assert logits_stats(e, a_same_order).top5_overlap[0] == 1.0
    assert logits_stats(e, a_reversed).top5_overlap[0] == 0.0
    assert logits_stats(e, a_swap).top5_overlap[0] == 0.8  # 4 of 5
    assert logits_stats(e, a_swap).top1_agree[0]


def test_top5_overlap_order_within_top5_does_not_matter():
    e = np.array([[9.0, 8.0, 7.0, 6.0, 5.0, 0.0, 0.0]])
    a = np.array([[5.0, 6.0, 7.0, 8.0, 9.0, 0.0, 0.0]])
    s = logits_stats(e, a)
    assert s.top5_overlap[0] == 1.0
    assert not s.top1_agree[0]


def test_top5_overlap_ties_use_lowest_ids():
    # all-equal row: top5 = ids {0..4}; a's top5 = {5, 6, 0, 1, 2} (5 and 6 highest, then lowest ids of the tie)
    e = np.zeros((1, 8))
    a = np.zeros((1, 8))
    a[0, 5] = a[0, 6] = 1.0
    # intersection {0, 1, 2} -> 3/5
    assert logits_stats(e, a).top5_overlap[0] == pytest.approx(0.6)


def test_top5_overlap_with_vocab_smaller_than_five():
    # k = min(5, V) = 3: identical rankings -> 3/3 = 1, not 3/5
    e = np.array([[1.0, 2.0, 3.0]])
    assert logits_stats(e, e * 3).top5_overlap[0] == 1.0
    assert logits_stats(e, e[:, ::-1].copy()).top5_overlap[0] == 1.0  # all 3 ids are in both "top 3"
    # V = 1: always 1/1
    s = logits_stats(np.array([[4.0]]), np.array([[-2.0]]))
    assert s.top5_overlap[0] == 1.0
    assert s.top1_agree[0]
    assert s.kl[0] == 0.0  # softmax of one logit is [1]
    assert s.max_abs[0] == 6.0


# ---------------------------------------------------------------------------------- margin and max_abs


def test_expected_margin_by_hand():
    e = np.array([[1.0, 5.0, 3.0], [5.0, 5.0, 1.0], [-1.0, -4.0, -2.5]])
    a = np.zeros_like(e)
    s = logits_stats(e, a)
    # 5 - 3 = 2; tie 5 - 5 = 0; -1 - (-2.5) = 1.5
    assert s.expected_margin.tolist() == [2.0, 0.0, 1.5]


def test_expected_margin_is_the_references():
    e = np.array([[0.0, 1.0]])
    a = np.array([[0.0, 10.0]])
    assert logits_stats(e, a).expected_margin[0] == 1.0
    assert logits_stats(a, e).expected_margin[0] == 10.0


def test_expected_margin_single_token_vocab_is_nan():
    assert math.isnan(logits_stats(np.array([[1.0]]), np.array([[1.0]])).expected_margin[0])


def test_max_abs_by_hand():
    e = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    a = np.array([[1.5, 0.0, 3.0], [0.0, -7.0, 1.0]])
    # row 0: |0.5|, |-2|, 0 -> 2; row 1: 0, 7, 1 -> 7
    assert logits_stats(e, a).max_abs.tolist() == [2.0, 7.0]


def test_flip_noise_by_hand():
    # Row 0: the target flips 0 -> 2 by +3 on token 2; the other tokens (1, 3) differ by 0.3 and -0.4:
    # other_rms = sqrt((0.09 + 0.16) / 2) = sqrt(0.125), untouched by the flip's own +3.
    # Row 1: no flip; the one top-1 token (0) is left out: other_rms = sqrt((1 + 4 + 0) / 3).
    e = np.array([[5.0, 1.0, 4.0, -6.0], [5.0, 1.0, 2.0, 3.0]])
    a = np.array([[5.0, 1.3, 7.0, -6.4], [5.0, 2.0, 0.0, 3.0]])
    s = logits_stats(e, a)
    assert s.flip_margin.tolist() == [1.0, 0.0]
    assert s.flip_scale.tolist() == [5.0, 5.0]
    assert s.other_rms[0] == pytest.approx(math.sqrt(0.125), rel=1e-12)
    assert s.other_rms[1] == pytest.approx(math.sqrt(5.0 / 3.0), rel=1e-12)


def test_other_rms_does_not_cancel_next_to_a_huge_flip_error():
    # A +1e12 error on the flip token next to 1e-3 noise: subtracting (1e12)^2 from the full sum of squares
    # would leave nothing of the 1e-3 noise; leaving the token out of the sum keeps it exact.
    e = np.zeros((1, 1001))
    e[0, 0] = 1.0
    a = e.copy()
    a[0, 1] = 1e12
    a[0, 2:] += 1e-3
    s = logits_stats(e, a)
    assert s.actual_top1[0] == 1 and s.other_rms[0] == pytest.approx(1e-3, rel=1e-9)


def test_other_rms_of_a_two_token_vocabulary_is_nan():
    s = logits_stats(np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]]))
    assert math.isnan(s.other_rms[0]) and s.flip_margin[0] == 1.0


# ----------------------------------------------------------------------------------------- non-finite


@pytest.mark.parametrize("side", ["expected", "actual"])
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_non_finite_rows_are_marked_with_nan_metrics(side, bad):
    e = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    a = e.copy()
    (e if side == "expected" else a)[1, 2] = bad
    s = logits_stats(e, a)
    assert s.finite_rows.tolist() == [True, False, True]
    for name in ("kl", "top5_overlap", "expected_margin", "max_abs", "flip_margin", "other_rms", "flip_scale"):
        values = getattr(s, name)
        assert math.isnan(values[1]), name
        assert np.isfinite(values[[0, 2]]).all(), name
    assert s.expected_top1.tolist() == [2, -1, 0]
    assert s.actual_top1.tolist() == [2, -1, 0]
    assert s.top1_agree.tolist() == [True, False, True]
    assert s.kl[[0, 2]].tolist() == [0.0, 0.0]


def test_all_rows_non_finite():
    e = np.full((3, 4), NAN)
    a = np.zeros((3, 4))
    s = logits_stats(e, a)
    assert not s.finite_rows.any()
    assert np.isnan(s.kl).all() and np.isnan(s.max_abs).all()
    assert (s.expected_top1 == -1).all()


# ------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    "e_shape, a_shape",
    [((3, 4), (3, 5)), ((3, 4), (2, 4)), ((4,), (4,)), ((2, 3, 4), (2, 3, 4)), ((), ())],
)
def test_shape_errors(e_shape, a_shape):
    with pytest.raises(ValueError):
        logits_stats(np.zeros(e_shape), np.zeros(a_shape))


def test_no_positions():
    s = logits_stats(np.zeros((0, 7)), np.zeros((0, 7)))
    for name in ARRAY_FIELDS:
        assert getattr(s, name).shape == (0,), name


def test_output_shapes_and_dtypes():
    s = logits_stats(np.zeros((3, 6)), np.zeros((3, 6)))
    for name in ARRAY_FIELDS:
        assert getattr(s, name).shape == (3,), name
    assert s.top1_agree.dtype == bool and s.finite_rows.dtype == bool
    assert np.issubdtype(s.expected_top1.dtype, np.integer)
    assert s.kl.dtype == np.float64


# ------------------------------------------------------------------------------------------- chunking


def make_200_rows():
    rng = np.random.default_rng(3)
    e = (rng.standard_normal((200, 23)) * 3).astype(np.float32)
    a = (e + rng.standard_normal((200, 23)) * 0.3).astype(np.float32)
    e[5, 1:4] = e[5].max() + 1  # a three-way tie for the reference's top-1 at ids 1, 2, 3
    a[70] = a[70, 0]  # an all-tied target row
    for row in (0, 63, 64, 127, 199):  # non-finite rows at the chunk edges
        a[row, row % 23] = np.nan
    e[128:192, 0] = np.inf  # a whole chunk without a finite row
    return e, a



def test_chunked_results_equal_row_by_row():
    e, a = make_200_rows()
    s = logits_stats(e, a)
    rows = [logits_stats(e[i : i + 1], a[i : i + 1]) for i in range(200)]
    for name in ARRAY_FIELDS:
        by_row = np.concatenate([getattr(r, name) for r in rows])
        x = getattr(s, name)
        if x.dtype.kind == "f":
            np.testing.assert_allclose(x, by_row, rtol=1e-12, atol=1e-15, equal_nan=True, err_msg=name)
        else:
            np.testing.assert_array_equal(x, by_row, err_msg=name)
    bad = [0, 63, 64, 127, 199, *range(128, 192)]
    assert s.finite_rows.sum() == 200 - len(bad)
    assert not s.finite_rows[bad].any()
    ok = s.finite_rows
    np.testing.assert_allclose(s.kl[ok], scipy_kl(e[ok], a[ok]), rtol=1e-10, atol=1e-15)
    assert s.expected_top1[5] == 1 and s.actual_top1[70] == 0 and s.expected_margin[5] == 0.0


class LazyRows:
    """A lazily read [P, V] array: exposes ``shape`` and row slices only, and records every read."""

    def __init__(self, data: np.ndarray):
        self._data = data
        self.shape = data.shape
        self.reads: list[tuple[int, int]] = []

    def __getitem__(self, key):
        assert isinstance(key, slice), f"only row slices are supported, got {key!r}"
        start, stop, step = key.indices(self.shape[0])
        assert step == 1
        self.reads.append((start, stop))
        return self._data[key].copy()

    def __array__(self, *args, **kwargs):
        raise AssertionError("the whole array must not be converted at once")

    def __len__(self):
        return self.shape[0]


def test_lazy_reader_gives_the_same_result_as_the_array():
    e, a = make_200_rows()
    lazy_e, lazy_a = LazyRows(e), LazyRows(a)
    assert_stats_equal(logits_stats(lazy_e, lazy_a), logits_stats(e, a), rtol=0)
    # every row is read exactly once, in chunks of at most 64 rows
    for lazy in (lazy_e, lazy_a):
        assert lazy.reads == [(0, 64), (64, 128), (128, 192), (192, 200)]


def test_lazy_reader_shape_mismatch():
    with pytest.raises(ValueError):
        logits_stats(LazyRows(np.zeros((3, 4))), LazyRows(np.zeros((3, 5))))


def test_bf16_torch_tensors_give_the_numbers_of_their_float32_values():
    torch = pytest.importorskip("torch")
    generator = torch.Generator().manual_seed(0)
    e = torch.randn(6, 97, generator=generator).bfloat16()
    a = (e.float() + 0.05 * torch.randn(6, 97, generator=generator)).bfloat16()
    from_torch, from_numpy = logits_stats(e, a), logits_stats(e.float().numpy(), a.float().numpy())
    for name in ("kl", "expected_margin", "max_abs", "top5_overlap"):
        assert np.array_equal(getattr(from_torch, name), getattr(from_numpy, name))
    assert np.array_equal(from_torch.actual_top1, from_numpy.actual_top1)
