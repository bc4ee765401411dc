"""All element-wise metrics of a tensor pair (TensorStats), from one streamed pass of the compiled kernel
(precision.metrics.fused), in float64. This is the only implementation of these metrics: the single-metric functions
(precision.metrics.elementwise) are views of it, and the tests hold it against the plain numpy definitions kept as
their oracle (tests/metrics/oracle.py). NaN and Inf are never dropped silently: the error metrics are computed over
the elements that are finite on both sides, and ``non_finite`` counts and locates the rest per element.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np

from precision.metrics import fused
from precision.metrics.arrays import as_numpy
from precision.metrics.msprobe import MsprobeAccumulator, Sums, check_convention
from precision.metrics.nonfinite import NonFinite, NonFiniteCounter, non_finite  # noqa: F401  (re-exported)
from precision.names import BF16_UNIT_ROUNDOFF, ERR_RATIO_THRESHOLDS, RELATIVE_ERROR_FLOOR  # noqa: F401  (re-exported)

ULP_BUCKETS = ("0", "1", "2", ">2", "non-finite")
"""ulp_shares keys: bf16 ULP distances 0, 1, 2 and more than 2, and pairs whose bf16 roundings are both infinite."""


@dataclass(frozen=True)
class TensorStats:
    """Every element-wise metric of one tensor pair (definitions: precision.metrics.definitions, and the oracle in
    tests/metrics/oracle.py). ``convention`` says whose definitions cosine, euclidean_distance, max_abs, max_relative
    and the two err ratios follow: "precision-check" (this tool's: float64, elements finite on both sides, the 1e-6
    relative-error floor) or "msprobe" (msprobe's compare, exactly; see precision.metrics.msprobe). relative_l2,
    mean_abs, ulp_shares, expected_l2 and non_finite are this tool's in both."""

    relative_l2: float
    max_abs: float
    max_relative: float
    mean_abs: float
    cosine: float
    one_thousandth_err_ratio: float
    five_thousandths_err_ratio: float
    ulp_shares: dict[str, float]
    expected_l2: float
    elements: int
    non_finite: NonFinite
    euclidean_distance: float
    convention: str


_CHUNK = 1 << 20
"""Elements per chunk: large enough to amortize a thread hand-off, small enough to stay near the cache."""
_SAFE_RANGE = (1e-150, 1e150)
"""float64 magnitudes whose squares (and sums of a few billion squares) neither underflow nor overflow."""
_UNSCALED = (1.0, 1.0, 1.0)
_LARGEST_SCALE_EXPONENT = 1000
"""2^1000 scales the largest float64 subnormal (2.2e-308) to 2.4e-7 (2^1024 does not exist)."""


def _scale_exponent(largest: float) -> int:
    """k such that 2^k brings ``largest`` near 1 when it lies outside _SAFE_RANGE (its square would overflow, or
    underflow to zero); 0 inside it. It never grows as ``largest`` does, so a running scale only ever shrinks."""
    if largest == 0.0 or not math.isfinite(largest) or _SAFE_RANGE[0] < largest < _SAFE_RANGE[1]:
        return 0
    return min(-math.frexp(largest)[1], _LARGEST_SCALE_EXPONENT)


_pool: ThreadPoolExecutor | None = None
_WORKER_PREFIX = "precision-metrics"


def worker_count() -> int:
    """Metric worker threads: one per core, at most four."""
    return max(1, min(4, os.cpu_count() or 1))


def _workers() -> ThreadPoolExecutor:
    """Threads for the kernels (they release the GIL; see worker_count)."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=worker_count(), thread_name_prefix=_WORKER_PREFIX)
    return _pool


@dataclass
class _Sums:
    """The kernel's accumulators over all chunks so far (slots: precision.metrics.fused.N_ACCUMULATORS)."""

    acc: np.ndarray
    ulp: np.ndarray
    count: int = 0

    @classmethod
    def empty(cls) -> "_Sums":
        return cls(np.zeros(fused.N_ACCUMULATORS), np.zeros(fused.N_ULP_BUCKETS, dtype=np.int64))

    def add(self, out: np.ndarray, ulp: np.ndarray, count: int) -> None:
        self.acc[[0, 1, 2, 3, 4, 7, 8]] += out[[0, 1, 2, 3, 4, 7, 8]]
        self.acc[5], self.acc[6] = max(self.acc[5], out[5]), max(self.acc[6], out[6])
        self.ulp += ulp
        self.count += count


def _chunk(e: np.ndarray, a: np.ndarray, filter_non_finite: bool, floor: float, thresholds, scales):
    if filter_non_finite:
        keep = np.isfinite(e) & np.isfinite(a)
        e, a = e[keep], a[keep]
    if e.size == 0:
        return np.zeros(fused.N_ACCUMULATORS), np.zeros(fused.N_ULP_BUCKETS, dtype=np.int64), 0
    out, ulp = fused.fused_accumulate(e, a, floor, thresholds, scales)
    return out, ulp, e.size


def _accumulate(sums: _Sums, e: np.ndarray, a: np.ndarray, any_bad: bool, *, floor: float = RELATIVE_ERROR_FLOOR,
                thresholds: tuple[float, float] = ERR_RATIO_THRESHOLDS, scales: tuple[float, float, float] = _UNSCALED) -> None:
    """Add two flat arrays of one length to ``sums``, chunk by chunk on the worker threads (in this thread when it
    is one of the workers: waiting there for the others could leave every worker waiting)."""
    chunks = range(0, e.size, _CHUNK)
    if on_worker_thread():
        for i in chunks:
            sums.add(*_chunk(e[i:i + _CHUNK], a[i:i + _CHUNK], any_bad, floor, thresholds, scales))
        return
    jobs = [_workers().submit(_chunk, e[i:i + _CHUNK], a[i:i + _CHUNK], any_bad, floor, thresholds, scales) for i in chunks]
    for job in jobs:
        sums.add(*job.result())


def on_worker_thread() -> bool:
    """True in one of the metric worker threads (see _workers)."""
    return threading.current_thread().name.startswith(_WORKER_PREFIX)


def widen_bf16(bits: np.ndarray) -> np.ndarray:
    """float32 values of bf16 bit patterns (uint16), exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _flat_pair(expected, actual) -> tuple[np.ndarray, np.ndarray, bool]:
    """Both inputs as flat numpy arrays of one shape, and whether any element of either is non-finite."""
    e, a = as_numpy(expected), as_numpy(actual)
    if e.shape != a.shape:
        raise ValueError(f"shape mismatch: expected {e.shape} vs actual {a.shape}")
    e, a = e.reshape(-1), a.reshape(-1)
    return e, a, not bool((np.isfinite(e) & np.isfinite(a)).all())


class StreamingStats:
    """tensor_stats over a tensor that arrives in blocks (rows of a logits matrix read from disk, say), so that
    memory holds one block pair rather than the whole tensor. Blocks must come in row-major order. ``convention``:
    "precision-check" (default) or "msprobe" (see TensorStats; msprobe's relative errors and ratios come from a numpy
    pass of their own beside the kernel, so that convention costs a few more passes over each block).

    float64 blocks are summed scaled by powers of two for e, a and a - e (see precision.metrics.fused), chosen from the
    largest magnitude seen so far, so that data near float64's limits neither overflows nor underflows; when a later
    block needs a smaller scale, the sums so far are rescaled by a power of two (exact, except for parts that fall below
float64's range and were negligible beside the new block's). float32, bf16 and fp16 data
    (every capture) never needs a scale: its squares stay within float64."""

    def __init__(self, shape: tuple[int, ...], convention: str = "precision-check") -> None:
        self.shape = tuple(shape)
        self.convention = check_convention(convention)
        self._msprobe = MsprobeAccumulator() if convention == "msprobe" else None
        self._sums = _Sums.empty()
        self._largest = [0.0, 0.0, 0.0]  # of e, a and a - e, over the blocks so far
        self._exponents = [0, 0, 0]  # the scales are 2^k of these
        self._non_finite = NonFiniteCounter(self.shape)

    def add(self, expected: np.ndarray, actual: np.ndarray) -> None:
        try:
            e, a, any_bad = _flat_pair(expected, actual)
        except ValueError:
            raise ValueError(f"block shape mismatch: {np.shape(expected)} vs {np.shape(actual)}") from None
        self._add_flat(e, a, any_bad)

    def add_bf16_bits(self, expected_bits: np.ndarray, actual_bits: np.ndarray) -> None:
        """add() for a block pair given as bf16 bit patterns (uint16, as a capture stores them): read in place by
        the bf16 kernel when both are entirely finite and the convention is this tool's, else widened and added."""
        e, a = expected_bits.reshape(-1), actual_bits.reshape(-1)
        if e.shape != a.shape:
            raise ValueError(f"block shape mismatch: {expected_bits.shape} vs {actual_bits.shape}")
        sums = fused.bf16_accumulate(e, a, RELATIVE_ERROR_FLOOR) if self._msprobe is None else None
        if sums is None:
            self.add(widen_bf16(e), widen_bf16(a))
        else:
            self.add_sums(sums, e.size)

    def add_sums(self, sums: tuple[np.ndarray, np.ndarray], count: int) -> None:
        """The bf16 kernel's accumulators of the next ``count`` elements, all finite (fused.bf16_accumulate)."""
        self._sums.add(*sums, count)
        self._non_finite.skip(count)

    def _add_flat(self, e: np.ndarray, a: np.ndarray, any_bad: bool) -> None:
        self._non_finite.add(e, a, any_bad)
        if e.dtype.itemsize >= 8 or a.dtype.itemsize >= 8:  # only float64 (and wider) can leave _SAFE_RANGE
            self._rescale(fused.largest_magnitudes(e, a))
        _accumulate(self._sums, e, a, any_bad, scales=self._scales)
        if self._msprobe is not None:
            self._msprobe.add(e, a)

    @property
    def _scales(self) -> tuple[float, float, float]:
        return tuple(math.ldexp(1.0, k) for k in self._exponents)

    def _rescale(self, block_largest: tuple[float, float, float]) -> None:
        self._largest = [max(seen, new) for seen, new in zip(self._largest, block_largest)]
        exponents = [_scale_exponent(largest) for largest in self._largest]
        shift_e, shift_a, shift_d = (new - old for new, old in zip(exponents, self._exponents))
        if shift_e or shift_a or shift_d:  # every shift is <= 0 (see _scale_exponent): no overflow
            acc = self._sums.acc
            acc[0], acc[1] = math.ldexp(acc[0], 2 * shift_e), math.ldexp(acc[1], 2 * shift_a)
            acc[2], acc[3] = math.ldexp(acc[2], 2 * shift_d), math.ldexp(acc[3], shift_e + shift_a)
            self._exponents = exponents

    def result(self) -> TensorStats:
        stats = self._own_result()
        if self._msprobe is None:
            return stats
        return replace(stats, **self._msprobe.result(self._msprobe_sums()), convention="msprobe")

    def _msprobe_sums(self) -> Sums:
        e2, a2, d2, ea, _, max_abs = (float(v) for v in self._sums.acc[:6])
        scale_e, scale_a, scale_d = self._scales
        norm_es, norm_as = math.sqrt(e2), math.sqrt(a2)  # of the scaled values; the scales cancel in the quotient
        with np.errstate(divide="ignore", invalid="ignore"):
            quotient = float(np.float64(ea) / (np.float64(norm_as) * np.float64(norm_es)))
        return Sums(norm_e=norm_es / scale_e, norm_a=norm_as / scale_a, quotient=quotient,
                    euclidean=math.sqrt(d2) / scale_d, max_abs=max_abs)

    def _own_result(self) -> TensorStats:
        nf = self._non_finite.result()
        elements = int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1
        count = self._sums.count
        if count == 0:
            nan = math.nan
            return TensorStats(nan, nan, nan, nan, nan, nan, nan, dict.fromkeys(ULP_BUCKETS, nan), nan, elements, nf, nan,
                               "precision-check")
        e2, a2, d2, ea, sum_abs, max_abs, max_rel, below_low, below_high = (float(v) for v in self._sums.acc)
        scale_e, _, scale_d = self._scales
        norm_e, norm_d = math.sqrt(e2) / scale_e, math.sqrt(d2) / scale_d
        return TensorStats(
            relative_l2=_relative_l2(norm_e, norm_d),
            max_abs=max_abs,
            max_relative=max_rel,
            mean_abs=sum_abs / count,
            cosine=_cosine(ea, math.sqrt(e2), math.sqrt(a2)),
            one_thousandth_err_ratio=below_low / count,
            five_thousandths_err_ratio=below_high / count,
            ulp_shares={bucket: float(n) / count for bucket, n in zip(ULP_BUCKETS, self._sums.ulp)},
            expected_l2=norm_e,
            elements=elements,
            non_finite=nf,
            euclidean_distance=norm_d,
            convention="precision-check",
        )


def _relative_l2(norm_expected: float, norm_diff: float) -> float:
    """||a - e|| / ||e||; 0 when both are zero, +inf when only ||e|| is."""
    if norm_expected == 0.0:
        return 0.0 if norm_diff == 0.0 else math.inf
    return norm_diff / norm_expected


def _cosine(dot: float, norm_e: float, norm_a: float) -> float:
    """<e, a> / (||e|| ||a||) clipped to [-1, 1] (rounding can leave it a bit outside); 1 when both norms are 0
    (identical), NaN when one is. Scales cancel: the sums may be of scaled values."""
    if norm_e == 0.0 and norm_a == 0.0:
        return 1.0
    if norm_e == 0.0 or norm_a == 0.0:
        return math.nan
    return min(1.0, max(-1.0, dot / (norm_e * norm_a)))


def tensor_stats(expected, actual, *, convention: str = "precision-check") -> TensorStats:
    """All element-wise metrics of a pair (numpy arrays, anything numpy converts, or torch tensors of any float
    dtype), streamed over chunks through the compiled kernel with float64 accumulators. ``convention``:
    "precision-check" (default) or "msprobe" (see TensorStats)."""
    check_convention(convention)
    e_raw = as_numpy(expected)
    e, a, any_bad = _flat_pair(e_raw, actual)
    stream = StreamingStats(e_raw.shape, convention)
    stream._add_flat(e, a, any_bad)
    return stream.result()


def bf16_stats(expected_bits: np.ndarray, actual_bits: np.ndarray, shape: tuple[int, ...], *, convention: str = "precision-check") -> TensorStats:
    """tensor_stats of two tensors given as bf16 bit patterns (uint16, any layout of ``shape``'s elements)."""
    stream = StreamingStats(shape, convention)
    stream.add_bf16_bits(expected_bits, actual_bits)
    return stream.result()


def _raw_sums(expected, actual, *, floor: float, thresholds: tuple[float, float]) -> _Sums:
    """The kernel's accumulators of a pair with another relative-error floor or other thresholds (the general forms
    max_relative_error(floor=...) and err_ratio_below)."""
    e, a, any_bad = _flat_pair(expected, actual)
    sums = _Sums.empty()
    _accumulate(sums, e, a, any_bad, floor=floor, thresholds=thresholds)
    return sums

