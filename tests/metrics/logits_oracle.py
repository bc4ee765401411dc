"""The test oracle of the per-position logits metrics: precision/metrics/logits.py as it was before the compiled
row kernel (as of commit ae84f38), frozen: plain numpy, float64 log-softmax of whole rows, top-k by partition. The
package's kernel (precision.metrics.logits_kernel) is held to it in tests/metrics/test_bf16_paths.py. Nothing in
precision/ imports this module."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from precision.metrics.arrays import as_numpy

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


def _log_softmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log softmax and softmax of each row, with one exp per element."""
    shifted = x - x.max(axis=-1, keepdims=True)
    exps = np.exp(shifted)
    sums = exps.sum(axis=-1, keepdims=True)
    return shifted - np.log(sums), exps / sums


def _top_k(x: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k largest values per row, descending, the lowest id first among equal values (as a stable
    sort would give). A partition finds each row's k-th largest value; only the few ids at or above it are
    sorted: a full argsort of a 166k-wide row per position was half of a comparison's time."""
    k = min(k, x.shape[-1])
    kth = np.partition(x, x.shape[-1] - k, axis=-1)[:, x.shape[-1] - k]
    result = np.empty((x.shape[0], k), dtype=np.int64)
    for row in range(x.shape[0]):
        candidates = np.flatnonzero(x[row] >= kth[row])  # ascending ids; more than k only when values tie
        order = np.argsort(-x[row, candidates], kind="stable")[:k]
        result[row] = candidates[order]
    return result


def logits_stats(expected, actual) -> LogitsStats:
    """Per-position logits metrics of two [P, V] arrays; see LogitsStats for definitions.

    ``expected`` and ``actual`` may be numpy arrays or any object with ``shape`` whose row slices convert to
    numpy (a lazily read file, for instance): only ``_ROWS_PER_CHUNK`` rows are held in float64 at a time."""
    e_all, a_all = expected, actual
    e_shape, a_shape = tuple(np.shape(e_all)), tuple(np.shape(a_all))
    if e_shape != a_shape or len(e_shape) != 2:
        raise ValueError(f"logits must be two [positions, vocab] arrays of one shape, got {e_shape} and {a_shape}")
    positions = e_shape[0]
    kl, top5_overlap, expected_margin, max_abs = (np.full(positions, np.nan) for _ in range(4))
    flip = _FlipNoise(positions)
    top1_agree = np.zeros(positions, dtype=bool)
    e_top1 = np.full(positions, -1, dtype=np.int64)
    a_top1 = np.full(positions, -1, dtype=np.int64)
    finite_rows = np.zeros(positions, dtype=bool)
    for start in range(0, positions, _ROWS_PER_CHUNK):
        rows = slice(start, min(start + _ROWS_PER_CHUNK, positions))
        e = as_numpy(e_all[rows]).astype(np.float64, copy=False)
        a = as_numpy(a_all[rows]).astype(np.float64, copy=False)
        ok = np.isfinite(e).all(axis=1) & np.isfinite(a).all(axis=1)
        finite_rows[rows] = ok
        if not ok.any():
            continue
        idx = np.arange(rows.start, rows.stop)[ok]
        e, a = e[ok], a[ok]
        (log_pe, p_e), (log_pa, _) = _log_softmax(e), _log_softmax(a)
        kl[idx] = np.maximum((p_e * (log_pe - log_pa)).sum(axis=1), 0.0)
        top_e, top_a = _top_k(e, TOP_K_OVERLAP), _top_k(a, TOP_K_OVERLAP)
        e_top1[idx], a_top1[idx] = top_e[:, 0], top_a[:, 0]
        top1_agree[idx] = top_e[:, 0] == top_a[:, 0]
        k = top_e.shape[1]
        overlap = (top_e[:, :, None] == top_a[:, None, :]).any(axis=2).sum(axis=1)
        top5_overlap[idx] = overlap / k
        if e.shape[1] > 1:
            ranked = np.take_along_axis(e, top_e[:, :2], axis=1)
            expected_margin[idx] = ranked[:, 0] - ranked[:, 1]
        diff = a - e
        max_abs[idx] = np.abs(diff).max(axis=1)
        flip.add(e, diff, top_e[:, 0], top_a[:, 0], idx)
    return LogitsStats(
        kl=kl,
        top1_agree=top1_agree,
        top5_overlap=top5_overlap,
        expected_margin=expected_margin,
        expected_top1=e_top1,
        actual_top1=a_top1,
        max_abs=max_abs,
        flip_margin=flip.margin,
        other_rms=flip.other_rms,
        flip_scale=flip.scale,
        finite_rows=finite_rows,
    )


class _FlipNoise:
    """flip_margin, other_rms and flip_scale (see LogitsStats), filled chunk by chunk."""

    def __init__(self, positions: int) -> None:
        self.margin, self.other_rms, self.scale = (np.full(positions, np.nan) for _ in range(3))

    def add(self, e: np.ndarray, diff: np.ndarray, top_e: np.ndarray, top_a: np.ndarray, idx: np.ndarray) -> None:
        """The values of a chunk's finite rows.

        The two top-1 tokens' squares are set to zero before the sum rather than subtracted from the full sum:
        a flip's own error can be far larger than the others' (a biased token), and subtracting it would cancel
        most of the sum's digits."""
        rows = np.arange(e.shape[0])
        e_i, e_j = e[rows, top_e], e[rows, top_a]
        self.margin[idx] = e_i - e_j
        self.scale[idx] = np.maximum(np.abs(e_i), np.abs(e_j))
        squares = diff * diff
        squares[rows, top_e] = 0.0
        squares[rows, top_a] = 0.0
        others = e.shape[1] - 1 - (top_e != top_a)
        with np.errstate(invalid="ignore", divide="ignore"):
            self.other_rms[idx] = np.where(others > 0, np.sqrt(squares.sum(axis=1) / np.maximum(others, 1)), np.nan)
