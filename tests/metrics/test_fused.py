"""The compiled one-pass kernel is the only path: every dtype goes through it, blocks stream into the same result,
and a missing numba is a message, not a traceback. (Its numbers against the definitions: test_against_oracle.py.)"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

from precision.errors import PrecisionError
from precision.metrics import fused, tensor
from precision.metrics.tensor import tensor_stats


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16", "int64"])
def test_every_dtype_goes_through_the_kernel(dtype, monkeypatch):
    calls = []
    original = fused.fused_accumulate
    monkeypatch.setattr(fused, "fused_accumulate", lambda *args: calls.append(args[0].dtype) or original(*args))
    if dtype == "bfloat16":
        torch = pytest.importorskip("torch")
        e, a = torch.ones(10, dtype=torch.bfloat16), torch.full((10,), 1.0078125, dtype=torch.bfloat16)
    else:
        e, a = np.ones(10, dtype=dtype), np.full(10, 2, dtype=dtype)
    stats = tensor_stats(e, a)
    assert len(calls) == 1
    assert stats.max_abs > 0


def test_float16_is_read_as_float32_and_float64_as_float64():
    # float16 widens exactly to float32 (half the bytes of float64); float64 keeps its precision in the sums
    e, a = fused._kernel_input(np.ones(3, np.float16)), fused._kernel_input(np.ones(3, np.float64))
    assert (e.dtype, a.dtype) == (np.float32, np.float64)
    tiny = np.array([1.0, 1.0 + 2**-40])  # a difference float32 cannot hold
    assert tensor_stats(tiny[:1], tiny[1:]).max_abs == 2**-40


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


def test_block_sums_are_closer_to_the_exact_sum_than_a_running_sum():
    # why the kernel sums blocks: on 2 Mi terms a running float64 sum was 2e-12 off math.fsum, the block sums 2e-15
    rng = np.random.default_rng(12)
    e = rng.standard_normal(2 << 20).astype(np.float32)
    a = (e * (1 + rng.normal(0, 2e-3, e.size))).astype(np.float32)
    d = a.astype(np.float64) - e
    exact = math.fsum(d * d)
    out, _ = fused.fused_accumulate(e, a, 1e-6)
    assert abs(out[2] - exact) / exact < 1e-13


def test_missing_numba_is_a_message(monkeypatch):
    monkeypatch.setattr(fused, "_compiled", None)
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba raises ImportError
    with pytest.raises(PrecisionError, match="pip install 'numba>=0.60'"):
        tensor_stats(np.ones(3, np.float32), np.ones(3, np.float32))
