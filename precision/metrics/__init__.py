"""Metrics: small pure functions, float64 inside. ``expected`` is the reference, ``actual`` the target.

Each function's docstring is its definition; ``DEFINITIONS`` collects them for the reports.
"""

from precision.metrics.logits import LogitsStats, logits_stats
from precision.metrics.tensor import (
    BF16_UNIT_ROUNDOFF,
    RELATIVE_ERROR_FLOOR,
    NonFinite,
    TensorStats,
    bf16_ulp_distance,
    cosine_similarity,
    err_ratio_below,
    euclidean_distance,
    five_thousandths_err_ratio,
    max_abs_error,
    max_relative_error,
    mean_abs_error,
    non_finite,
    one_thousandth_err_ratio,
    relative_l2_error,
    tensor_stats,
    ulp_histogram,
)
from precision.metrics.msprobe import CONVENTIONS, msprobe_metrics
from precision.metrics.tokens import TokenAgreement, token_agreement
from precision.metrics.definitions import DEFINITIONS

__all__ = [
    "BF16_UNIT_ROUNDOFF",
    "CONVENTIONS",
    "DEFINITIONS",
    "LogitsStats",
    "NonFinite",
    "RELATIVE_ERROR_FLOOR",
    "TensorStats",
    "TokenAgreement",
    "bf16_ulp_distance",
    "cosine_similarity",
    "err_ratio_below",
    "euclidean_distance",
    "five_thousandths_err_ratio",
    "logits_stats",
    "max_abs_error",
    "max_relative_error",
    "mean_abs_error",
    "msprobe_metrics",
    "non_finite",
    "one_thousandth_err_ratio",
    "relative_l2_error",
    "tensor_stats",
    "token_agreement",
    "ulp_histogram",
]
