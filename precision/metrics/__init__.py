"""Metrics, float64 inside. ``expected`` is the reference, ``actual`` the target.

Element-wise metrics have one implementation, the compiled one-pass kernel behind ``tensor_stats``; the
single-metric functions are views of it. ``DEFINITIONS`` holds the written definition of every reported number.
"""

from precision.metrics.logits import LogitsStats, logits_stats
from precision.metrics.tensor import NonFinite, TensorStats, non_finite, tensor_stats
from precision.metrics.elementwise import (
    BF16_UNIT_ROUNDOFF,
    RELATIVE_ERROR_FLOOR,
    bf16_ulp_distance,
    cosine_similarity,
    err_ratio_below,
    euclidean_distance,
    five_thousandths_err_ratio,
    max_abs_error,
    max_relative_error,
    mean_abs_error,
    one_thousandth_err_ratio,
    relative_l2_error,
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
