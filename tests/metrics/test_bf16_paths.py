"""The compiled paths a comparison takes (the bf16 element kernel, the logits row kernels, the bf16 reading in
precision.analysis.compare_jobs) against the implementation they replaced, frozen as the oracle: the per-position
logits metrics of tests/metrics/logits_oracle.py, the element-wise general path (held to tests/metrics/oracle.py
elsewhere), and whole comparison documents computed the old way, on real captures of stories260K and on
synthetic rows at the seed model's vocabulary (166144).

Tolerances: everything that is a count, a maximum, an id, a share or a single rounding agrees exactly. Sums agree
to 1e-12 relative (different summation orders of float64 terms). KL agrees to 1e-12 relative or 1e-13 nats
absolute: both compute it through log-sum-exps of size ~log V (~12) in float64, whose rounding (a few 1e-15)
is the floor of either's accuracy, and the oracle's per-token log p_e - log p_a cancels about 16 digits' worth
of such terms for a KL of ~1e-4.
"""

from __future__ import annotations

import math
from dataclasses import fields

import numpy as np
import pytest
import torch

from precision.metrics import fused
from precision.metrics.logits import LogitsStats, logits_and_element_sums_bf16, logits_stats, logits_stats_bf16
from precision.metrics.tensor import StreamingStats, bf16_stats, tensor_stats, widen_bf16
from precision.names import RELATIVE_ERROR_FLOOR
from tests.metrics import logits_oracle

REL = 1e-12
KL_ABS = 1e-13
VOCAB = 166144


def bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.int16).numpy().view(np.uint16)


def assert_logits_match(new: LogitsStats, old) -> None:
    for f in fields(LogitsStats):
        x, y = getattr(new, f.name), getattr(old, f.name)
        assert x.shape == y.shape, f.name
        if f.name == "kl":
            assert np.allclose(x, y, rtol=REL, atol=KL_ABS, equal_nan=True), (f.name, np.nanmax(np.abs(x - y)))
        elif f.name == "other_rms":
            assert np.allclose(x, y, rtol=REL, atol=0.0, equal_nan=True), f.name
        else:
            assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), f.name


def synthetic_rows(rows: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 logits and a target 5e-3 away, with the cases each path must get right planted in some rows."""
    g = torch.Generator().manual_seed(seed)
    e = (torch.randn(rows, width, generator=g) * 3).bfloat16()
    a = (e.float() * (1 + 5e-3 * torch.randn(rows, width, generator=g))).bfloat16()
    e[1, 100:110] = 20.0  # a ten-way tie at the top: lowest ids first
    a[1, 100:110] = 20.0
    e[2, 7 % width] = float("nan")  # a non-finite row on one side
    a[3, width - 1] = float("inf")
    e[4, :50] = 700.0  # beyond the exp table's range: exp computed as the definition does
    a[5, 3 % width], e[5, 3 % width] = 900.0, -900.0  # a flip whose own error is most of the row's squares
    e[6] = 0.0  # flat rows
    a[6] = 0.0
    e[7, 11 % width], e[7, 12 % width], a[7, 12 % width] = 15.0, 15.0, 15.0  # a flip between two tied tokens
    return e, a


@pytest.mark.parametrize("width", [VOCAB, 1000, 7, 2])
def test_logits_kernels_match_the_frozen_oracle(width):
    e, a = synthetic_rows(12, width, seed=width)
    old = logits_oracle.logits_stats(e.float().numpy(), a.float().numpy())
    assert_logits_match(logits_stats_bf16(bits(e), bits(a)), old)
    assert_logits_match(logits_stats(e.float().numpy(), a.float().numpy()), old)  # the float path
    assert_logits_match(logits_stats(e.float().numpy().astype(np.float16), a.float().numpy().astype(np.float16)),
                        logits_oracle.logits_stats(e.float().numpy().astype(np.float16), a.float().numpy().astype(np.float16)))


def test_logits_kernel_finds_what_the_planted_rows_hold():
    """The planted cases fire: the tie resolves to the lowest id, the non-finite rows are flagged, the flip
    with a huge own error keeps it out of the noise."""
    e, a = synthetic_rows(12, 1000, seed=3)
    s = logits_stats_bf16(bits(e), bits(a))
    assert s.expected_top1[1] == 100 and s.actual_top1[1] == 100
    assert not s.finite_rows[2] and not s.finite_rows[3] and s.finite_rows[[0, 1, 4, 5, 6, 7]].all()
    assert np.isnan(s.kl[2]) and s.expected_top1[2] == -1
    assert s.actual_top1[5] == 3 and s.expected_top1[5] != 3 and s.other_rms[5] < 1.0
    assert s.kl[6] == 0.0 and s.top1_agree[6]
    assert s.expected_top1[7] == 11 and s.actual_top1[7] == 12 and s.flip_margin[7] == 0.0


def test_bf16_element_kernel_matches_the_general_path():
    g = torch.Generator().manual_seed(1)
    n = 3 * 4096 + 17
    e = (torch.randn(n, generator=g) * 3).bfloat16()
    e[::9] = 0.0
    e[5], e[6], e[7] = 1e-7, -0.0, 3e38  # tiny, negative zero, near bf16's largest
    e[8] = 1e-40  # subnormal in bf16
    a = (e.float() * (1 + 5e-3 * torch.randn(n, generator=g))).bfloat16()
    a[11] = -a[11]
    a[13] = e[13] * 1.02
    fast = bf16_stats(bits(e), bits(a), (n,))
    general = tensor_stats(e.float().numpy(), a.float().numpy())
    for name in ("relative_l2", "mean_abs", "cosine", "expected_l2", "euclidean_distance"):
        assert math.isclose(getattr(fast, name), getattr(general, name), rel_tol=REL), name
    for name in ("max_abs", "max_relative", "one_thousandth_err_ratio", "five_thousandths_err_ratio", "ulp_shares",
                 "elements", "non_finite"):
        assert getattr(fast, name) == getattr(general, name), name
    assert fast.ulp_shares[">2"] > 0 and fast.ulp_shares["1"] > 0  # the planted sign flip and 2 % error count


def test_bf16_pairs_with_nan_or_inf_take_the_general_path():
    e = torch.tensor([1.0, float("nan"), 2.0, float("inf"), 5.0]).bfloat16()
    a = torch.tensor([1.0, 1.0, float("-inf"), float("inf"), 5.5]).bfloat16()
    assert fused.bf16_accumulate(bits(e), bits(a), RELATIVE_ERROR_FLOOR) is None
    fast = bf16_stats(bits(e), bits(a), (5,))
    general = tensor_stats(e.float().numpy(), a.float().numpy())
    assert fast == general
    assert fast.non_finite.actual_only == 1 and fast.non_finite.first_index == (1,)


def test_streamed_bf16_blocks_locate_non_finite_elements_after_finite_blocks():
    """A finite block read by the kernel still advances the element count, so a later NaN is located right."""
    e = torch.ones(2, 6).bfloat16()
    a = torch.ones(2, 6).bfloat16()
    a[1, 4] = float("nan")
    stream = StreamingStats((2, 6))
    stream.add_bf16_bits(bits(e[0]), bits(a[0]))
    stream.add_bf16_bits(bits(e[1]), bits(a[1]))
    assert stream.result().non_finite.actual_only_first_index == (1, 4)
    assert stream.result() == tensor_stats(widen_bf16(bits(e)).reshape(2, 6), widen_bf16(bits(a)).reshape(2, 6))


@pytest.mark.parametrize("width", [VOCAB, 1000, 3])
def test_logits_pass_element_sums_match_the_element_kernel(width):
    """The element-wise metrics of the logits come from the row kernel's pass: the same accumulators as the
    element kernel's (sums to 1e-12, maxima and counts exactly), and None when a row holds NaN or Inf."""
    e, a = synthetic_rows(12, width, seed=width + 1)
    finite_rows = [0, 1, 4, 5, 6, 7, 8, 9, 10, 11]
    eb, ab = bits(e[finite_rows]), bits(a[finite_rows])
    _, sums = logits_and_element_sums_bf16(eb, ab)
    out, ulp = fused.bf16_accumulate(eb.reshape(-1), ab.reshape(-1), RELATIVE_ERROR_FLOOR)
    assert np.allclose(sums[0][:5], out[:5], rtol=REL, atol=0.0) and np.array_equal(sums[0][5:], out[5:])
    assert np.array_equal(sums[1], ulp)
    assert logits_and_element_sums_bf16(bits(e), bits(a))[1] is None


def test_kernels_compile_once_when_threads_ask_at_once():
    """The metric workers reach a kernel's first use together; a fresh process must not compile one twice
    (numba refuses, and the comparison died in its first logits block)."""
    import subprocess
    import sys

    code = ("from concurrent.futures import ThreadPoolExecutor\nimport numpy as np\n"
            "from precision.metrics.logits import logits_and_element_sums_bf16\nfrom precision.metrics import fused\n"
            "x = np.zeros((2, 8), np.uint16)\n"
            "jobs = [lambda: logits_and_element_sums_bf16(x, x), lambda: fused.bf16_accumulate(x.ravel(), x.ravel(), 1e-6)] * 4\n"
            "with ThreadPoolExecutor(8) as pool:\n    [f.result() for f in [pool.submit(j) for j in jobs]]\n")
    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
