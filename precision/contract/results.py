"""The documents around a comparison: the verdict and summary.json, run.json, regression.json, a golden store's
store.json and selftest.json."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from precision.contract.capture import ModelRecord, Selection, TokenizerRecord
from precision.contract.comparison import CaptureRef, Flip, PooledSite, SkippedPrompt
from precision.contract.codec import described, optional_key
from precision.contract.performance import PerformanceSummary

Status = Literal["PASS", "WARN", "FAIL"]

SUMMARY_FORMAT, SUMMARY_VERSION = "precision-check-summary", 1
RUN_FORMAT, RUN_VERSION = "precision-check-run", 1
REGRESSION_FORMAT, REGRESSION_VERSION = "precision-check-regression", 2
GOLDEN_FORMAT, GOLDEN_VERSION = "precision-check-golden", 1
SELFTEST_FORMAT, SELFTEST_VERSION = "precision-check-selftest", 1


@dataclass(frozen=True, kw_only=True)
class FindingRecord:
    """One rule's outcome (precision.analysis.verdict: the rules and their thresholds)."""

    rule: str
    status: Status
    message: str
    site: str | None


@dataclass(frozen=True, kw_only=True)
class PromptVerdictRecord:
    id: str
    status: Status
    findings: list[FindingRecord]


@dataclass(frozen=True, kw_only=True)
class VerdictRecord:
    """The verdict: the worst status of any finding, run-level and per prompt."""

    status: Status
    summary: str
    thresholds: dict[str, float] = described("The thresholds the rules were judged with (precision.analysis.verdict.Thresholds).")
    findings: list[FindingRecord] = described("Run-level findings.")
    prompts: list[PromptVerdictRecord] = described("Per-prompt findings.")


@dataclass(frozen=True, kw_only=True)
class PromptSummary:
    id: str
    category: str
    token_match_rate: float
    matching_prefix: int
    first_divergence: int | None
    logits_kl_mean: float | None
    logits_top1_agreement: float | None
    flips: list[Flip]


@dataclass(frozen=True, kw_only=True)
class ServingConfigurationSummary:
    """One serving configuration of the run's serving stage, as its row of the stage document (RUN/serving/summary.json,
    precision.serving.parity) gives it; every figure is the stage's, compared with the run's own eager vLLM target."""

    name: str = described("The configuration's name: its [serving.NAME] table.")
    verdict: Status = described("The configuration's verdict against the eager baseline (the cross-engine rules, precision.serving.parity).")
    level: str = described('The level of detail it was compared at: "layers" (every site), "logits" (final norm and logits, '
                           'taken outside a compiled graph) or "prompt-logprobs" (the engine\'s own top-K prompt logprobs).')
    level_reason: str | None = described("Why the prompt-logprobs level (forced by the table, or the fallback's reason); null at the other levels.")
    largest_metric: str = described('"relative_l2": the pooled relative L2 error ||c-b||/||b|| of the configuration c against the baseline b '
                                    'at the site where it is largest; "topk_logprob_delta": the largest |logprob difference| over the '
                                    "engine's top-K tokens of any teacher-forced position (precision.serving.logprob_compare).")
    largest_value: float = described("The largest difference, in largest_metric's definition (0: bitwise identical at every compared site).")
    largest_site: str | None = described("Where it is largest: a site, or \"prompt_logprobs top-K\" at the prompt-logprobs level.")
    envelope_ratio: float | None = described("The configuration's difference from the baseline divided by the largest difference any "
                                             "implementation variant of the reference makes at the same site, at the site where that "
                                             "ratio is largest (0 when the configuration differs nowhere); null when the run measured no envelope.")
    envelope_ratio_site: str | None = described("The site of envelope_ratio; null when the configuration differs nowhere or no envelope was measured.")
    bitwise_identical: bool | None = described("Whether every compared site equals the baseline bit for bit; null at the prompt-logprobs level.")
    first_differing_site: str | None = described("The first site in model order (embed, decoder layers, final norm, logits) whose state "
                                                 "differs from the baseline's in any bit; null when none does or at the prompt-logprobs level.")
    responsible: dict[str, Any] | None = described("The settings bisection found responsible (the smallest subset of the table's settings that "
                                                   "still fails); null when the configuration did not fail, bisection named none or could not run.")
    bisection: str | None = described("Bisection's own sentence (or why it did not run); null when the configuration did not fail.")
    comparison: str | None = described("The configuration's comparison.json, relative to the run directory; null at the prompt-logprobs level.")


@dataclass(frozen=True, kw_only=True)
class ServingSummary:
    """summary.json's serving section: what the run's serving stage ([serving.NAME] tables) found, from its own document."""

    status: Status = described("The serving stage's status: the worst verdict of its configurations (the stage document's status).")
    overall_status: Status = described("The worst of verdict.status (the cross-engine comparison) and status (the serving stage): what "
                                       "'precision-check run' exits by (FAIL: exit 1).")
    summary: str = described("The stage's own document, relative to the run directory.")
    report: str = described("The stage's report, relative to the run directory.")
    summary_sha256: str = described("sha256 of the stage's document as the stage wrote it; 'precision-check verify' checks the file still has it.")
    configurations: list[ServingConfigurationSummary] = described("One entry per configuration, in the run configuration file's order.")


@dataclass(frozen=True, kw_only=True)
class Summary:
    """summary.json: the verdict, the pooled per-site table and each prompt's key numbers."""

    schema_version: int
    format: Literal["precision-check-summary"]
    created_at: str
    verdict: VerdictRecord
    expected: CaptureRef
    actual: CaptureRef
    truth: CaptureRef | None
    sites: list[PooledSite]
    prompts: list[PromptSummary]
    skipped_prompts: list[SkippedPrompt]
    performance: PerformanceSummary = optional_key("The target's speed per prompt category (not precision: no verdict reads it); "
                                                   "absent from summaries written before it was added.")
    serving: ServingSummary = optional_key("The run's serving stage, present only when the run had [serving.NAME] tables.")


@dataclass(frozen=True, kw_only=True)
class RunRecord:
    """run.json: what a run was asked to do (``run --resume`` holds a resumed run to it)."""

    OPEN_KEYS = True
    schema_version: int
    format: Literal["precision-check-run"]
    prompts: str
    model: str
    target_model: str
    reference: str
    target: str
    truth: str | None
    max_new_tokens: int | None
    selection: Selection
    engine_args: dict[str, Any]
    repeats: int
    metric_convention: str
    command: str | None = described("The command line that started the run (null when started from the Python API).")
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class RegressionSide:
    run: str
    target: str | None
    verdict: Status


@dataclass(frozen=True, kw_only=True)
class RowName:
    prompt: str | None
    site: str
    metric: str


@dataclass(frozen=True, kw_only=True)
class RegressionRow:
    """One metric of one (prompt, site) in both runs (precision.analysis.regress)."""

    prompt: str | None
    site: str
    scope: str
    metric: str
    kind: str
    baseline: float
    candidate: float | None
    limit: float | None
    change: float | str | None
    worse: bool
    missing: bool


@dataclass(frozen=True, kw_only=True)
class Regression:
    """regression.json: a candidate run against a baseline run, metric by metric."""

    schema_version: int
    format: Literal["precision-check-regression"]
    baseline: RegressionSide
    candidate: RegressionSide
    tolerance: dict[str, float]
    run_to_run_noise: float
    run_to_run_measured: bool
    status: Literal["PASS", "FAIL"]
    message: str
    first_worse_scope: str | None
    first_worse: RowName | None
    missing: list[RowName]
    not_compared: list[RowName]
    rows: list[RegressionRow]


@dataclass(frozen=True, kw_only=True)
class StoredCapture:
    dir: str
    manifest_sha256: str


@dataclass(frozen=True, kw_only=True)
class StoreCaptures:
    reference: StoredCapture
    truth: StoredCapture
    envelope: dict[str, StoredCapture]


@dataclass(frozen=True, kw_only=True)
class CompactRecord:
    file: str
    sha256: str
    bytes: int


@dataclass(frozen=True, kw_only=True)
class GoldenStore:
    """store.json: the CPU side of a run stored once (precision.golden; docs/ci-gating.md)."""

    schema_version: int
    format: Literal["precision-check-golden"]
    created_at: str
    model: ModelRecord
    tokenizer: TokenizerRecord
    prompt_ids: list[str]
    captures: StoreCaptures
    envelope_prompts: list[str]
    compact: CompactRecord


@dataclass(frozen=True, kw_only=True)
class SelftestCase:
    name: str
    variants: list[str]
    reference_variants: list[str]
    expected: Status
    verdict: Status
    named_site: str | None
    rule: str | None
    ok: bool
    changed: bool
    real_flips: int = described("Teacher-forced flips that are not near-ties.")
    flips: int = described("Teacher-forced flips, near-ties included.")


@dataclass(frozen=True, kw_only=True)
class Selftest:
    """selftest.json: every planted fault, what the verdict said, and the sensitivity each sweep reached."""

    schema_version: int
    format: Literal["precision-check-selftest"]
    cases: list[SelftestCase]
    sensitivity: dict[str, str]
    created_at: str | None = optional_key()
