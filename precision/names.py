"""Every name a capture or a result document spells, and every numeric constant the metrics share, in one place.

Site names are the keys of a capture's tensors; metric names are the keys of comparison.json, summary.json and
regression.json. Code spells them through these constants (or as dataclass field names of the typed documents in
precision.contract), never as string literals: a test greps the package to keep it that way.
"""

# Sites, in model order (precision.capture.sites has the helpers that order and select them).
EMBED = "embed"
LAYER_PREFIX = "layer."
FINAL_NORM = "final_norm"
LOGITS = "logits"
POSITIONS = "positions"
"""The int64 tensor of a capture file that lists which token positions its rows are (not a site)."""

# Element-wise metrics of one tensor pair (precision.metrics.tensor.TensorStats; definitions in
# precision.metrics.definitions).
RELATIVE_L2 = "relative_l2"
MAX_ABS = "max_abs"
MAX_RELATIVE = "max_relative"
MEAN_ABS = "mean_abs"
COSINE = "cosine"
EUCLIDEAN_DISTANCE = "euclidean_distance"
ONE_THOUSANDTH_ERR_RATIO = "one_thousandth_err_ratio"
FIVE_THOUSANDTHS_ERR_RATIO = "five_thousandths_err_ratio"
ULP_SHARES = "ulp_shares"
NON_FINITE = "non_finite"
CONVENTION = "convention"

# Logits metrics (precision.metrics.logits) and generated-token agreement (precision.metrics.tokens).
KL = "kl"
TOP1_AGREE = "top1_agree"
TOP5_OVERLAP = "top5_overlap"
EXPECTED_MARGIN = "expected_margin"
NEAR_TIE = "near_tie"
TOKEN_MATCH_RATE = "token_match_rate"
MATCHING_PREFIX = "matching_prefix"
FIRST_DIVERGENCE = "first_divergence"
SERVING_STAGE_DIRECTORY = "serving"
"""The directory of run's serving stage inside the run directory (precision.serving.run_stage writes it,
precision.report summarizes it)."""
TOPK_DELTA = "topk_logprob_delta"
"""At the prompt-logprobs level: per position, max over the configuration's top-K tokens of |logprob_configuration -
logprob_baseline| (precision.serving.logprob_compare)."""
DETAIL_LAYERS, DETAIL_LOGITS, DETAIL_PROMPT_LOGPROBS = "layers", LOGITS, "prompt-logprobs"
"""A serving configuration's level of detail (precision.serving): every site captured, only what runs outside a
compiled graph (final norm and logits), or only the engine's own prompt_logprobs top-K."""

# Three-way comparison against the FP32 truth, and the per-step (local) analysis.
EXPECTED_VS_TRUTH = "expected_vs_truth"
ACTUAL_VS_TRUTH = "actual_vs_truth"
THREE_WAY_RATIO = "R"
LOCAL_ERROR = "local"
LOCAL_RATIO = "local_ratio"
LOCAL_GAIN = "local_gain"

# Pooled per-site rows (comparison.json "sites", summary.json "sites").
COSINE_MIN = "cosine_min"
KL_MEAN = "kl_mean"
TOP1_AGREEMENT = "top1_agreement"

METRIC_NAMES = (
    RELATIVE_L2, MAX_ABS, MAX_RELATIVE, MEAN_ABS, COSINE, EUCLIDEAN_DISTANCE, ONE_THOUSANDTH_ERR_RATIO,
    FIVE_THOUSANDTHS_ERR_RATIO, ULP_SHARES, NON_FINITE, KL, TOP1_AGREE, TOP5_OVERLAP, EXPECTED_MARGIN, NEAR_TIE,
    TOKEN_MATCH_RATE, MATCHING_PREFIX, FIRST_DIVERGENCE, EXPECTED_VS_TRUTH, ACTUAL_VS_TRUTH, LOCAL_RATIO,
    LOCAL_GAIN, COSINE_MIN, KL_MEAN, TOP1_AGREEMENT,
)
"""The names the literal test holds to this module (short generic words such as "R" and "local" are left out of
the grep: they are also ordinary words elsewhere)."""
SITE_NAMES = (EMBED, FINAL_NORM, LOGITS)


def layer_site(index: int) -> str:
    return f"{LAYER_PREFIX}{index}"


# Numeric constants shared by the metrics.
ONE_THOUSANDTH = 1e-3
"""Threshold of msprobe's "One Thousandth Err Ratio": relative error below 0.001."""
FIVE_THOUSANDTHS = 5e-3
"""Threshold of msprobe's "Five Thousandths Err Ratio": relative error below 0.005."""
ERR_RATIO_THRESHOLDS = (ONE_THOUSANDTH, FIVE_THOUSANDTHS)

RELATIVE_ERROR_FLOOR = 1e-6
"""Denominator floor for element-wise relative error: |a - e| / max(|e|, floor). This tool's convention, not
msprobe's: it keeps references that are zero or nearly zero (below 1e-6, where a relative error says little)
from dividing by zero or dominating the maximum. msprobe has no floor; it adds float32 eps to both sides only
where the reference is exactly 0 (reproduced by the "msprobe" convention, precision.metrics.msprobe), so on
references near 1e-7 the two give different shares."""

BF16_UNIT_ROUNDOFF = 2.0**-8
"""Unit roundoff u of bfloat16 (8 significand bits incl. the implicit one): |round(x) - x| <= u |x|."""
