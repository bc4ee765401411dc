"""Agreement of two greedy generations (token id sequences)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class TokenAgreement:
    matching_prefix: int
    """Number of leading tokens that are identical."""
    match_rate: float
    """Positions i with e_i == a_i, divided by max(len(e), len(a)); 1.0 when both are empty."""
    first_divergence: int | None
    """Index of the first differing token (= matching_prefix), None when the sequences are identical."""
    expected_length: int
    actual_length: int


def token_agreement(expected: Sequence[int], actual: Sequence[int]) -> TokenAgreement:
    """Greedy token agreement of a target's generation with the reference's (see TokenAgreement)."""
    expected, actual = list(expected), list(actual)
    prefix = 0
    for e, a in zip(expected, actual):
        if e != a:
            break
        prefix += 1
    longest = max(len(expected), len(actual))
    same = sum(e == a for e, a in zip(expected, actual))
    identical = expected == actual
    return TokenAgreement(
        matching_prefix=prefix,
        match_rate=1.0 if longest == 0 else same / longest,
        first_divergence=None if identical else prefix,
        expected_length=len(expected),
        actual_length=len(actual),
    )
