"""The ``analysis`` section of comparison.json: theory band, envelope, determinism, first non-finite value and
the local (replayed) error of every step. Producer: precision.analysis.explain."""

from __future__ import annotations

from dataclasses import dataclass

from precision.contract.codec import described, optional_key


@dataclass(frozen=True, kw_only=True)
class TheoryBand:
    """Relative errors BF16 rounding predicts at one site (precision.analysis.theory)."""

    site: str
    roundings: int
    vs_truth_low: float
    vs_truth_high: float
    between_engines_low: float
    between_engines_high: float


@dataclass(frozen=True, kw_only=True)
class EnvelopeSite:
    """The target's pooled relative L2 at one site beside every envelope member's (precision.analysis.envelope)."""

    site: str
    target: float
    members: dict[str, float]
    max: float
    ratio: float = described("target / max, with 0/0 = 1 and x/0 = Infinity.")
    percentile: float = described("Share of members whose error is below the target's.")


@dataclass(frozen=True, kw_only=True)
class Envelope:
    """How far legitimate implementation choices alone move the reference."""

    members: list[str]
    prompts: list[str]
    sites: list[EnvelopeSite]


@dataclass(frozen=True, kw_only=True)
class Determinism:
    """Repeated runs of the target on the same inputs."""

    runs: int
    prompts: int
    tokens_identical: int
    tensors_identical: int
    max_relative_l2: float


@dataclass(frozen=True, kw_only=True)
class FirstNonFinite:
    """The first prompt and site, in model order, where either side holds NaN or Inf."""

    prompt: str
    site: str
    index: list[int] | None
    position: int | None
    side: str


@dataclass(frozen=True, kw_only=True)
class LocalStep:
    """One replayed step: the reference's layer run on the target's input, so its own (local) error is separated
    from what it inherited (precision.analysis.replay, precision.analysis.envelope.local_envelope)."""

    site: str
    input_site: str
    local: float
    inherited: float
    input: float
    amplification: float | None
    local_R: float
    rounding_floor: float = optional_key("The step's rounding floor u / sqrt(3): local error and local R are taken against at least it.")
    local_gain: float | None
    rounding_gain: float | None = optional_key("The same gain of the reference's own BF16 rounding against FP32.")
    local_ulp_shares: dict[str, float]
    envelope_local_max: float
    local_ratio: float | None
    envelope_gain_max: float | None


@dataclass(frozen=True, kw_only=True)
class LocalAnalysis:
    available: bool
    reason: str | None
    steps: list[LocalStep]


@dataclass(frozen=True, kw_only=True)
class Analysis:
    """Findings that explain the comparison (precision.analysis.explain)."""

    theory: list[TheoryBand]
    theory_source: str
    envelope: Envelope | None
    determinism: Determinism | None
    first_non_finite: FirstNonFinite | None
    local: LocalAnalysis
