"""NaN and Inf, element by element: never dropped silently, always counted and located.

A tensor pair can hold non-finite values in three ways that mean different things:
- only the reference has them (the reference is broken there; the target cannot be judged at that element);
- only the target has them where the reference is finite (``actual_only``: the target broke something);
- both have them at the same element but not the same value (``mismatched``: NaN against +-Inf, +Inf against
  -Inf), which is as wrong as a finite mismatch and must not pass because "the reference has one too".
Both sides NaN, or both +Inf, or both -Inf at the same element agree and are only counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from precision.metrics.arrays import as_numpy


@dataclass(frozen=True)
class NonFinite:
    """NaN/Inf counts on each side, and per-element disagreements with the first (row-major) index of each.

    expected_nan, expected_inf, actual_nan, actual_inf: counts of NaN and of +-Inf in each tensor.
    first_index: first element non-finite on either side (None when every element is finite).
    actual_only: elements non-finite in the target where the reference is finite; actual_only_first_index: the first.
    mismatched: elements non-finite on both sides with different values (NaN vs +-Inf, +Inf vs -Inf);
    mismatched_first_index: the first. Indexes are in the tensor's own shape ([row, column] for a 2-D tensor)."""

    expected_nan: int
    expected_inf: int
    actual_nan: int
    actual_inf: int
    first_index: tuple[int, ...] | None
    actual_only: int
    actual_only_first_index: tuple[int, ...] | None
    mismatched: int
    mismatched_first_index: tuple[int, ...] | None

    @property
    def any(self) -> bool:
        return bool(self.expected_nan or self.expected_inf or self.actual_nan or self.actual_inf)


def element_masks(e: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Masks of the same shape as the inputs: non-finite on either side, non-finite only in the target, and
    non-finite on both sides with different values."""
    bad_e, bad_a = ~np.isfinite(e), ~np.isfinite(a)
    actual_only = bad_a & ~bad_e
    both = bad_e & bad_a
    if both.any():
        # e == a is True for +Inf/+Inf and -Inf/-Inf, False for NaN/anything and for +Inf/-Inf
        same = (np.isnan(e) & np.isnan(a)) | (e == a)
        mismatched = both & ~same
    else:
        mismatched = both
    return bad_e | bad_a, actual_only, mismatched


class NonFiniteCounter:
    """Accumulates NonFinite over flat blocks that arrive in row-major order (see StreamingStats)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = tuple(shape)
        self._nan_inf = [0, 0, 0, 0]  # expected nan, expected inf, actual nan, actual inf
        self._counts = [0, 0]  # actual only, mismatched
        self._first: list[int | None] = [None, None, None]  # either side, actual only, mismatched (flat)
        self._seen = 0

    def add(self, e: np.ndarray, a: np.ndarray, any_bad: bool) -> None:
        """Count a flat block pair; ``any_bad`` says whether any element of it is non-finite (the caller knows)."""
        if any_bad:
            for slot, count in enumerate((np.isnan(e).sum(), np.isinf(e).sum(), np.isnan(a).sum(), np.isinf(a).sum())):
                self._nan_inf[slot] += int(count)
            masks = element_masks(e, a)
            for slot, mask in enumerate(masks):
                hits = np.flatnonzero(mask)
                if slot:
                    self._counts[slot - 1] += int(hits.size)
                if hits.size and self._first[slot] is None:
                    self._first[slot] = self._seen + int(hits[0])
        self._seen += e.size

    def skip(self, count: int) -> None:
        """Count a block of ``count`` elements known to be finite on both sides."""
        self._seen += count

    def _index(self, flat: int | None) -> tuple[int, ...] | None:
        if flat is None:
            return None
        return tuple(int(i) for i in np.unravel_index(flat, self.shape)) if self.shape else ()

    def result(self) -> NonFinite:
        first, actual_first, mismatched_first = (self._index(f) for f in self._first)
        return NonFinite(*self._nan_inf, first_index=first, actual_only=self._counts[0], actual_only_first_index=actual_first,
                         mismatched=self._counts[1], mismatched_first_index=mismatched_first)


def non_finite(expected, actual) -> NonFinite:
    """Counts of NaN and +/-Inf in each tensor; the index (in the tensor's own shape) of the first element that
    is non-finite on either side, of the first that is non-finite only in the target, and of the first that is
    non-finite on both sides with different values; None where there is none."""
    e, a = as_numpy(expected), as_numpy(actual)
    if e.shape != a.shape:
        raise ValueError(f"shape mismatch: expected {e.shape} vs actual {a.shape}")
    counter = NonFiniteCounter(e.shape)
    e_flat, a_flat = e.reshape(-1), a.reshape(-1)
    counter.add(e_flat, a_flat, bool((~np.isfinite(e_flat)).any() or (~np.isfinite(a_flat)).any()))
    return counter.result()
