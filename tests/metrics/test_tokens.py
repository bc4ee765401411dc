"""Greedy generation agreement (precision/metrics/tokens.py)."""

from __future__ import annotations

import numpy as np

from precision.metrics import TokenAgreement, token_agreement


def test_identical():
    assert token_agreement([5, 6, 7], [5, 6, 7]) == TokenAgreement(
        matching_prefix=3, match_rate=1.0, first_divergence=None, expected_length=3, actual_length=3
    )


def test_both_empty():
    assert token_agreement([], []) == TokenAgreement(
        matching_prefix=0, match_rate=1.0, first_divergence=None, expected_length=0, actual_length=0
    )


def test_expected_empty():
    # 0 matches over max(0, 2) = 2 positions; they differ at index 0
    assert token_agreement([], [1, 2]) == TokenAgreement(
        matching_prefix=0, match_rate=0.0, first_divergence=0, expected_length=0, actual_length=2
    )


def test_actual_empty():
    assert token_agreement([1, 2, 3], []) == TokenAgreement(
        matching_prefix=0, match_rate=0.0, first_divergence=0, expected_length=3, actual_length=0
    )


def test_actual_longer_with_shared_prefix():
    # 3 matches over max(3, 5) = 5 -> 0.6; the sequences first differ at index 3 (where expected ended)
    assert token_agreement([1, 2, 3], [1, 2, 3, 4, 5]) == TokenAgreement(
        matching_prefix=3, match_rate=0.6, first_divergence=3, expected_length=3, actual_length=5
    )


def test_expected_longer_with_shared_prefix():
    # 2 matches over 4 -> 0.5
    assert token_agreement([9, 8, 7, 6], [9, 8]) == TokenAgreement(
        matching_prefix=2, match_rate=0.5, first_divergence=2, expected_length=4, actual_length=2
    )


def test_divergence_in_the_middle():
    # differs only at index 2: prefix 2, matches 4 of 5 -> 0.8 (positions after the divergence still count)
    assert token_agreement([1, 2, 3, 4, 5], [1, 2, 9, 4, 5]) == TokenAgreement(
        matching_prefix=2, match_rate=0.8, first_divergence=2, expected_length=5, actual_length=5
    )


def test_divergence_at_first_token():
    r = token_agreement([1, 2, 3, 4], [0, 2, 3, 0])
    # prefix 0, matches at 1 and 2 -> 2 / 4
    assert (r.matching_prefix, r.match_rate, r.first_divergence) == (0, 0.5, 0)


def test_different_lengths_and_contents():
    r = token_agreement([1, 2, 3, 4, 5, 6], [1, 7, 3])
    # prefix 1; matches at 0 and 2 over max(6, 3) = 6 -> 1/3
    assert (r.matching_prefix, r.first_divergence) == (1, 1)
    assert r.match_rate == 2 / 6
    assert (r.expected_length, r.actual_length) == (6, 3)


def test_accepts_tuples_generators_and_numpy():
    r = token_agreement((1, 2, 3), (x for x in [1, 2, 4]))
    assert (r.matching_prefix, r.match_rate, r.first_divergence) == (2, 2 / 3, 2)
    r = token_agreement(np.array([1, 2, 3], dtype=np.int64), np.array([1, 2, 3], dtype=np.int32))
    assert r.first_divergence is None and r.match_rate == 1.0 and r.matching_prefix == 3
    assert isinstance(r.match_rate, float)
