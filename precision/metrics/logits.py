"""Per-position metrics of full-vocabulary logits, float64 inside, one compiled pass per row pair
(precision.metrics.logits_kernel), processed in row chunks so memory stays bounded by a chunk. The plain numpy
definitions they are held to are frozen in tests/metrics/logits_oracle.py."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from precision.metrics.arrays import as_numpy
from precision.metrics.logits_kernel import bf16_tables, row_metrics
from precision.names import ERR_RATIO_THRESHOLDS, RELATIVE_ERROR_FLOOR

TOP_K_OVERLAP = 5
_ROWS_PER_CHUNK = 64


@dataclass(frozen=True)
class LogitsStats:
    """Arrays of length P (one value per captured position)."""

    kl: np.ndarray
    """KL(softmax(e) || softmax(a)) = sum_v p_e(v) (log p_e(v) - log p_a(v)), in nats, float64."""
    top1_agree: np.ndarray
    """argmax(e) == argmax(a) (ties: lowest token id wins on both sides)."""
    top5_overlap: np.ndarray
    """|top5(e) ∩ top5(a)| / 5: share of the reference's five highest tokens among the target's five."""
    expected_margin: np.ndarray
    """e[top1] - e[top2]: the reference's logit gap between its best and second-best token."""
    expected_top1: np.ndarray
    actual_top1: np.ndarray
    max_abs: np.ndarray
    """max_v |a_v - e_v| at the position: the largest logit difference."""
    flip_margin: np.ndarray
    """e[i] - e[j] with i = argmax(e), j = argmax(a): how far the reference prefers its token over the target's
    (0 where they agree)."""
    other_rms: np.ndarray
    """sqrt(mean over v not in {i, j} of (a_v - e_v)^2), float64: the logit noise at the position measured on
    every token except the two top-1 tokens, so it does not contain a flip's own error (NaN when V <= 2)."""
    flip_scale: np.ndarray
    """max(|e[i]|, |e[j]|): the magnitude whose rounding unit bounds how a stored margin differs from the exact one."""
    finite_rows: np.ndarray
    """True where both rows are entirely finite; the other metrics are NaN (or -1 for ids) elsewhere."""


def logits_stats(expected, actual) -> LogitsStats:
    """Per-position logits metrics of two [P, V] arrays (numpy, torch, or any object with ``shape`` whose row
    slices convert to numpy); see LogitsStats for definitions. Computed row by row in the compiled kernel
    (precision.metrics.logits_kernel), ``_ROWS_PER_CHUNK`` rows converted at a time."""
    e_shape, a_shape = tuple(np.shape(expected)), tuple(np.shape(actual))
    if e_shape != a_shape or len(e_shape) != 2:
        raise ValueError(f"logits must be two [positions, vocab] arrays of one shape, got {e_shape} and {a_shape}")
    parts = []
    for start in range(0, e_shape[0], _ROWS_PER_CHUNK):
        e, a = (_kernel_rows(as_numpy(x[start:start + _ROWS_PER_CHUNK])) for x in (expected, actual))
        if e.dtype != a.dtype:
            e, a = e.astype(np.float64), a.astype(np.float64)
        parts.append(_stats(e, a, bf16_bits=False)[0])
    return concat(parts) if parts else _stats(np.zeros((0, e_shape[1])), np.zeros((0, e_shape[1])), bf16_bits=False)[0]


def logits_stats_bf16(expected_bits: np.ndarray, actual_bits: np.ndarray) -> LogitsStats:
    """logits_stats of two [P, V] uint16 arrays holding bf16 bit patterns (a capture's logits as stored)."""
    return logits_and_element_sums_bf16(expected_bits, actual_bits)[0]


def logits_and_element_sums_bf16(expected_bits: np.ndarray, actual_bits: np.ndarray, *, floor: float = RELATIVE_ERROR_FLOOR,
                                 thresholds: tuple[float, float] = ERR_RATIO_THRESHOLDS):
    """logits_stats_bf16 and, from the same pass, the element-wise accumulators of the pair (as
    precision.metrics.fused.bf16_accumulate returns them: None when any element is NaN or Inf)."""
    if expected_bits.shape != actual_bits.shape or expected_bits.ndim != 2:
        raise ValueError(f"logits must be two [positions, vocab] arrays of one shape, got {expected_bits.shape} and {actual_bits.shape}")
    stats, sums = _stats(expected_bits, actual_bits, bf16_bits=True, floor=floor, thresholds=thresholds)
    return stats, sums if stats.finite_rows.all() else None


def concat(parts: list[LogitsStats]) -> LogitsStats:
    """The LogitsStats of consecutive row blocks, in order."""
    return LogitsStats(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(LogitsStats)))


def _kernel_rows(x: np.ndarray) -> np.ndarray:
    """float32 and float64 as they are (contiguous); float16 and integers as float64 (exact)."""
    dtype = x.dtype if x.dtype in (np.float32, np.float64) else np.float64
    return np.ascontiguousarray(x, dtype=dtype)


def _stats(e: np.ndarray, a: np.ndarray, *, bf16_bits: bool, floor: float = 0.0, thresholds: tuple[float, float] = (0.0, 0.0)):
    """LogitsStats from the kernel's per-row results (the few per-row values derived from top lists here), and
    the kernel's element sums (bf16 only)."""
    positions, width = e.shape
    k = min(TOP_K_OVERLAP, width)
    kl, top_e, top_a, max_abs, other_sq, finite_rows, sums = row_metrics(e, a, k, bf16_bits=bf16_bits, floor=floor, thresholds=thresholds)
    top5_overlap, expected_margin, flip_margin, flip_scale, other_rms = (np.full(positions, np.nan) for _ in range(5))
    e_top1 = np.where(finite_rows, top_e[:, 0] if k else -1, -1)
    a_top1 = np.where(finite_rows, top_a[:, 0] if k else -1, -1)
    top1_agree = finite_rows & (e_top1 == a_top1)
    rows = np.flatnonzero(finite_rows)
    if rows.size:
        top5_overlap[rows] = (top_e[rows, :, None] == top_a[rows, None, :]).any(axis=2).sum(axis=1) / k
        ranked = _values(e, rows, top_e[rows], bf16_bits)
        if width > 1:
            expected_margin[rows] = ranked[:, 0] - ranked[:, 1]
        e_i = ranked[:, 0]
        e_j = _values(e, rows, top_a[rows, :1], bf16_bits)[:, 0]
        flip_margin[rows] = e_i - e_j
        flip_scale[rows] = np.maximum(np.abs(e_i), np.abs(e_j))
        others = width - 1 - (top_e[rows, 0] != top_a[rows, 0])
        with np.errstate(invalid="ignore", divide="ignore"):
            other_rms[rows] = np.where(others > 0, np.sqrt(other_sq[rows] / np.maximum(others, 1)), np.nan)
    return LogitsStats(kl=kl, top1_agree=top1_agree, top5_overlap=top5_overlap, expected_margin=expected_margin,
                       expected_top1=e_top1, actual_top1=a_top1, max_abs=max_abs, flip_margin=flip_margin,
                       other_rms=other_rms, flip_scale=flip_scale, finite_rows=finite_rows), sums


def _values(x: np.ndarray, rows: np.ndarray, ids: np.ndarray, bf16_bits: bool) -> np.ndarray:
    """float64 values of ``x`` at ``ids`` (one row of ids per entry of ``rows``), bf16 bits decoded. Only those
    elements are read: ``x[rows]`` would copy whole rows (8 MB for 25 rows of 166144 bf16 logits, per side)."""
    picked = x[rows[:, None], ids]
    if bf16_bits:
        return bf16_tables()[0][picked]
    return picked.astype(np.float64)
