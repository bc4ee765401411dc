"""comparison.json: the typed comparison of a target capture against a reference (and an FP32 truth).

Metric fields carry their written definitions (precision.metrics.definitions) as their schema descriptions.
Producers: precision.analysis.compare (prompts, sites), precision.analysis.explain (analysis).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from precision import names
from precision.contract.analysis import Analysis
from precision.contract.codec import described, optional_key
from precision.metrics.definitions import DEFINITIONS

COMPARISON_FORMAT = "precision-check-comparison"
COMPARISON_VERSION = 1


def metric(name: str, **kwargs: Any) -> Any:
    return described(DEFINITIONS[name], **kwargs)


@dataclass(frozen=True, kw_only=True)
class CaptureRef:
    """Which capture a side of the comparison is, pinned by its manifest's sha256."""

    path: str
    backend: str | None
    engine: str | None
    dtype: str | None
    device: str | None
    manifest_sha256: str


@dataclass(frozen=True, kw_only=True)
class NonFiniteCounts:
    """NaN and Inf on each side of one tensor pair, and where they first occur ([position row, column])."""

    expected_nan: int
    expected_inf: int
    actual_nan: int
    actual_inf: int
    first_index: list[int] | None
    actual_only: int = optional_key("Elements non-finite in the target where the reference is finite.")
    actual_only_first_index: list[int] | None = optional_key()
    mismatched: int = optional_key("Elements non-finite on both sides with different values (NaN vs Inf, +Inf vs -Inf).")
    mismatched_first_index: list[int] | None = optional_key()


@dataclass(frozen=True, kw_only=True)
class TensorMetrics:
    """Every element-wise metric of one tensor pair (precision.metrics.tensor.TensorStats)."""

    relative_l2: float = metric(names.RELATIVE_L2)
    max_abs: float = metric(names.MAX_ABS)
    max_relative: float = metric(names.MAX_RELATIVE)
    mean_abs: float = metric(names.MEAN_ABS)
    cosine: float = metric(names.COSINE)
    one_thousandth_err_ratio: float = metric(names.ONE_THOUSANDTH_ERR_RATIO)
    five_thousandths_err_ratio: float = metric(names.FIVE_THOUSANDTHS_ERR_RATIO)
    ulp_shares: dict[str, float] = metric(names.ULP_SHARES)
    expected_l2: float = described("||e||_2 over the elements finite on both sides, float64.")
    elements: int = described("Number of elements of the tensor.")
    euclidean_distance: float = metric(names.EUCLIDEAN_DISTANCE)
    convention: str = metric(names.CONVENTION)
    non_finite: NonFiniteCounts = metric(names.NON_FINITE)


@dataclass(frozen=True, kw_only=True)
class TruthErrors:
    """Both sides' relative L2 error against the FP32 truth at one site, and their ratio R."""

    expected_vs_truth: float
    actual_vs_truth: float
    R: float = metric(names.THREE_WAY_RATIO)
    truth_l2: float = described("||t||_2 of the truth tensor, float64 (the pooling weight).")


@dataclass(frozen=True, kw_only=True)
class SiteComparison:
    """One captured site of one prompt."""

    site: str
    layer: int | None
    metrics: TensorMetrics
    truth: TruthErrors | None


@dataclass(frozen=True, kw_only=True)
class TokenComparison:
    """Free-running greedy generation on both sides (precision.metrics.tokens.TokenAgreement)."""

    expected_generated: list[int]
    actual_generated: list[int]
    matching_prefix: int = metric(names.MATCHING_PREFIX)
    match_rate: float = metric(names.TOKEN_MATCH_RATE)
    first_divergence: int | None = metric(names.FIRST_DIVERGENCE)
    expected_length: int = described("Tokens the reference generated.")
    actual_length: int = described("Tokens the target generated.")


@dataclass(frozen=True, kw_only=True)
class PerPosition:
    """Logits metrics at each compared position (lists aligned with LogitsComparison.positions)."""

    kl: list[float] = metric(names.KL)
    top1_agree: list[bool] = metric(names.TOP1_AGREE)
    top5_overlap: list[float] = metric(names.TOP5_OVERLAP)
    expected_margin: list[float] = metric(names.EXPECTED_MARGIN)
    max_abs: list[float] = described("max_v |a_v - e_v| at the position: the largest logit difference.")


@dataclass(frozen=True, kw_only=True)
class Flip:
    """A teacher-forced top-1 disagreement and the near-tie test applied to it (precision.analysis.near_tie)."""

    position: int
    expected_token: int
    actual_token: int
    expected_margin: float = metric(names.EXPECTED_MARGIN)
    flip_margin: float = optional_key("e[i] - e[j], i the reference's top-1 and j the target's: how far the reference prefers its token.")
    other_rms: float = optional_key("RMS of a - e over the position's other tokens (i and j left out): the logit noise.")
    flip_scale: float = optional_key("max(|e_i|, |e_j|): the magnitude whose rounding unit bounds the stored margin's error.")
    logit_noise: float = described("max_v |a_v - e_v| at the position.")
    z: float = optional_key("Phi^-1(1 - alpha_1 / 2) for the run's family of compared positions (see near_tie).")
    alpha: float = optional_key("The run's family-wise false-alarm rate for real flips.")
    family_positions: int = optional_key("Positions compared in the run (the family size n).")
    ulp: float = optional_key("One unit in the last place of the flip's logit magnitude in the reference's dtype.")
    rounding_allowance: float = optional_key("ulp_ref + ulp_target at the flip's logit magnitude.")
    bound: float = optional_key("The near-tie bound the reference's margin is held to.")
    near_tie: bool = metric(names.NEAR_TIE)


@dataclass(frozen=True, kw_only=True)
class LogitsComparison:
    """The full-vocabulary logits of one prompt, position by position."""

    kl_mean: float
    kl_max: float
    top1_agreement: float
    top5_overlap_mean: float
    positions: list[int]
    per_position: PerPosition
    flips: list[Flip]
    non_finite_positions: list[int]


@dataclass(frozen=True, kw_only=True)
class PromptComparison:
    """One prompt: generated tokens, every captured site, and the logits."""

    id: str
    category: str
    prompt_tokens: int
    forced_tokens: int
    tokens: TokenComparison
    sites: list[SiteComparison]
    positions: int = described("Number of positions compared (rows of each tensor).")
    logits: LogitsComparison | None = optional_key("Present when the logits were captured.")


@dataclass(frozen=True, kw_only=True)
class PooledSite:
    """One site pooled over prompts: relative L2 = sqrt(sum_p ||a_p - e_p||^2) / sqrt(sum_p ||e_p||^2)."""

    site: str
    layer: int | None
    relative_l2: float = metric(names.RELATIVE_L2)
    max_abs: float = metric(names.MAX_ABS)
    cosine_min: float = described("The smallest per-prompt cosine (NaN when any prompt's is undefined).")
    ulp_shares: dict[str, float] = metric(names.ULP_SHARES)
    non_finite: int = described("NaN and Inf elements on both sides, summed over prompts.")
    undefined_prompts: int = described("Prompts whose cosine or max |a - e| is undefined (NaN).")
    expected_vs_truth: float | None
    actual_vs_truth: float | None
    R: float | None = metric(names.THREE_WAY_RATIO)


@dataclass(frozen=True, kw_only=True)
class SkippedPrompt:
    id: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class Comparison:
    """comparison.json: the target against the reference (and the FP32 truth), per prompt, per site, pooled,
    with the analysis that explains the differences."""

    schema_version: int
    format: Literal["precision-check-comparison"]
    created_at: str
    expected: CaptureRef
    actual: CaptureRef
    truth: CaptureRef | None
    num_layers: int
    metric_convention: str
    skipped_prompts: list[SkippedPrompt]
    definitions: dict[str, str]
    prompts: list[PromptComparison]
    sites: list[PooledSite]
    analysis: Analysis | None = optional_key("Present once the comparison is explained (run, compare).")
