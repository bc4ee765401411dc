"""The bf16 kernels do their bit work (ULP distances, finiteness, block maxima for the top-k) in 16-bit integers
(precision.metrics.bits.narrow_intrinsics), where a difference of two ordered keys wraps around. Held here to the
oracle's int64 definition (tests/metrics/oracle.py) on every finite bf16 bit pattern, paired with its neighbours,
its negation and the far end of the range, where a wrong wrap would show."""

from __future__ import annotations

import numpy as np
import pytest

from precision.metrics import fused, logits_kernel
from precision.metrics.bits import BLOCK_COUNT_LIMIT
from precision.metrics.logits import logits_and_element_sums_bf16
from precision.metrics.tensor import widen_bf16
from precision.names import RELATIVE_ERROR_FLOOR
from tests.metrics import oracle

FINITE = np.array([b for b in range(1 << 16) if (b & 0x7FFF) < 0x7F80], dtype=np.uint16)
LARGEST = 0x7F7F
"""bf16 bits of the largest finite value, 3.39e38."""


def _ordered(bits: np.ndarray) -> np.ndarray:
    magnitude = (bits & 0x7FFF).astype(np.int64)
    return np.where(bits & 0x8000, -magnitude, magnitude)


def _from_ordered(keys: np.ndarray) -> np.ndarray:
    return np.where(keys < 0, 0x8000 | -keys, keys).astype(np.uint16)


def _pairs() -> tuple[np.ndarray, np.ndarray]:
    """Every finite pattern against itself, its neighbours 1, 2 and 3 ULPs away (across zero too), its negation
    and the negated largest value; plus +0/-0 and the two ends of the range."""
    keys = _ordered(FINITE)
    expected, actual = [], []
    for shift in (0, 1, -1, 2, -2, 3, -3):
        moved = keys + shift
        keep = np.abs(moved) <= LARGEST
        expected.append(FINITE[keep])
        actual.append(_from_ordered(moved[keep]))
    expected += [FINITE, FINITE, np.array([0x0000, 0x8000, LARGEST, 0xFF7F, 0x0001], np.uint16)]
    actual += [FINITE ^ 0x8000, np.full(FINITE.size, 0xFF7F, np.uint16),
               np.array([0x8000, 0x0000, 0xFF7F, LARGEST, 0x8001], np.uint16)]
    return np.concatenate(expected), np.concatenate(actual)


def _oracle_counts(eb: np.ndarray, ab: np.ndarray) -> list[int]:
    shares = oracle.ulp_histogram(widen_bf16(eb), widen_bf16(ab))
    return [round(shares[bucket] * eb.size) for bucket in oracle.ULP_BUCKETS]


def test_every_bf16_pattern_lands_in_its_ulp_bucket():
    eb, ab = _pairs()
    out, ulp = fused.bf16_accumulate(eb, ab, RELATIVE_ERROR_FLOOR)
    assert ulp.tolist() == _oracle_counts(eb, ab)
    assert ulp[3] >= FINITE.size  # the far pairs (65278 ULPs at most) are counted as far, not wrapped onto 0..2


def test_the_logits_pass_counts_the_same_buckets():
    eb, ab = _pairs()
    width = 1000
    rows = eb.size // width
    eb, ab = eb[:rows * width].reshape(rows, width), ab[:rows * width].reshape(rows, width)
    _, sums = logits_and_element_sums_bf16(eb, ab)
    assert sums[1].tolist() == _oracle_counts(eb.reshape(-1), ab.reshape(-1))


@pytest.mark.parametrize("position", [0, fused.SUM_BLOCK - 1, fused.SUM_BLOCK, 2 * fused.SUM_BLOCK + 4])
@pytest.mark.parametrize("pattern", [0x7F80, 0xFF80, 0x7FC1, 0xFFFF])
def test_a_non_finite_element_anywhere_in_a_block_sends_the_pair_to_the_general_path(position, pattern):
    eb = np.full(2 * fused.SUM_BLOCK + 5, 0x3F80, np.uint16)  # 1.0
    ab = eb.copy()
    assert fused.bf16_accumulate(eb, ab, RELATIVE_ERROR_FLOOR) is not None
    ab[position] = pattern
    assert fused.bf16_accumulate(eb, ab, RELATIVE_ERROR_FLOOR) is None
    assert fused.bf16_accumulate(ab, eb, RELATIVE_ERROR_FLOOR) is None


def test_block_counts_fit_in_16_bits():
    assert fused.SUM_BLOCK <= BLOCK_COUNT_LIMIT and logits_kernel.TOP_BLOCK <= BLOCK_COUNT_LIMIT
