"""The compiled one-pass kernel and the numpy path compute the same metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from precision.metrics import fused, tensor
from precision.metrics.tensor import tensor_stats

pytestmark = pytest.mark.skipif(not fused.available(), reason="numba is not installed")


@pytest.mark.parametrize("size", [1, 7, (1 << 20) + 3])
def test_fused_and_numpy_paths_agree(size, monkeypatch):
    rng = np.random.default_rng(size)
    e = rng.standard_normal(size).astype(np.float32)
    a = (e * (1 + 4e-3 * rng.standard_normal(size))).astype(np.float32)
    if size > 3:
        e[2], a[3] = np.nan, -np.inf
    with_kernel = tensor_stats(e, a)
    monkeypatch.setattr(fused, "available", lambda: False)
    without = tensor_stats(e, a)
    assert with_kernel.ulp_shares == without.ulp_shares
    assert with_kernel.non_finite == without.non_finite
    for name in ("relative_l2", "max_abs", "max_relative", "mean_abs", "cosine", "one_thousandth_err_ratio",
                 "five_thousandths_err_ratio", "expected_l2", "euclidean_distance"):
        # float64 sums of a million terms in another order agree to ~1e-12 relative; 1e-9 leaves room
        assert math.isclose(getattr(with_kernel, name), getattr(without, name), rel_tol=1e-9), name


def test_kernel_is_used_for_float32(monkeypatch):
    calls = []
    original = fused.fused_accumulate
    monkeypatch.setattr(fused, "fused_accumulate", lambda *args: calls.append(1) or original(*args))
    tensor_stats(np.ones(10, dtype=np.float32), np.ones(10, dtype=np.float32))
    assert calls == [1]


def test_streaming_blocks_equal_one_pass():
    rng = np.random.default_rng(3)
    e = rng.standard_normal((300, 97)).astype(np.float32)
    a = (e + 1e-3 * rng.standard_normal(e.shape)).astype(np.float32)
    e[201, 5] = np.nan
    whole = tensor_stats(e, a)
    stream = tensor.StreamingStats(e.shape)
    for start in range(0, 300, 64):
        stream.add(e[start:start + 64], a[start:start + 64])
    blocks = stream.result()
    assert blocks.non_finite == whole.non_finite and blocks.non_finite.first_index == (201, 5)
    assert blocks.ulp_shares == whole.ulp_shares
    assert math.isclose(blocks.relative_l2, whole.relative_l2, rel_tol=1e-12)


def test_streaming_non_finite_per_element_across_blocks():
    # a reference NaN in the first block does not hide a target Inf in a later one, and the first index of each
    # kind is found in whichever block holds it
    e = np.ones((10, 7), dtype=np.float32)
    a = np.ones((10, 7), dtype=np.float32)
    e[0, 0] = np.nan
    a[6, 4] = np.inf
    e[8, 1], a[8, 1] = np.inf, -np.inf
    e[9, 6], a[9, 6] = np.nan, np.inf
    stream = tensor.StreamingStats(e.shape)
    for start in range(0, 10, 3):
        stream.add(e[start:start + 3], a[start:start + 3])
    nf = stream.result().non_finite
    assert (nf.actual_only, nf.actual_only_first_index) == (1, (6, 4))
    assert (nf.mismatched, nf.mismatched_first_index) == (2, (8, 1))
    assert nf.first_index == (0, 0)
    assert nf == tensor_stats(e, a).non_finite
