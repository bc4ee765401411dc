"""manifest.json and progress.jsonl of a capture directory. Producer: precision.capture.writer; reader:
precision.capture.reader (which also checks the tensor listing against the model's sizes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from precision.contract.codec import described, optional_key
from precision.contract.performance import PerformanceRecord

CAPTURE_FORMAT = "precision-check-capture"
CAPTURE_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class BackendRecord:
    """What ran: the backend spec and its effective settings (engine-specific keys are kept as they are)."""

    OPEN_KEYS = True
    name: str
    spec: str
    engine: str
    dtype: str
    device: str | None = optional_key()
    performance: PerformanceRecord = optional_key("The vLLM target's speed on a plain pass (precision.backends.vllm_performance); absent for other backends.")
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class ModelRecord:
    """The model directory and the hashes that pin it (precision.model.ModelInfo)."""

    path: str
    architecture: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    max_position_embeddings: int | None
    stop_token_ids: list[int]
    config_sha256: str
    weights_sha256: dict[str, str]


@dataclass(frozen=True, kw_only=True)
class TokenizerRecord:
    OPEN_KEYS = True
    vocab_size: int | None = optional_key()
    bos_token_id: int | None = optional_key()
    eos_token_id: int | None = optional_key()
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Selection:
    positions: str = described('"all", "last" or "every:K".')
    layers: str | list[int] = described('"all" or the captured decoder-layer indices.')


@dataclass(frozen=True, kw_only=True)
class TeacherForcing:
    source: Literal["self", "reference"]
    reference_capture: str | None
    reference_manifest_sha256: str | None


@dataclass(frozen=True, kw_only=True)
class TensorListing:
    shape: list[int]
    dtype: str


@dataclass(frozen=True, kw_only=True)
class RepeatRecord:
    """With repeated runs: how the runs of one prompt agreed."""

    runs: int
    tokens_identical: bool
    tensors_identical: bool
    max_relative_l2: float


@dataclass(frozen=True, kw_only=True)
class PromptEntry:
    """One captured prompt and its tensor file (precision.capture.reader.PromptRecord)."""

    index: int
    id: str
    category: str
    rendering: str
    prompt_ids: list[int]
    continuation_ids: list[int] = described("The teacher-forced continuation: the reference's greedy tokens, fed to every backend.")
    generated_ids: list[int] = described("This backend's own free-running greedy continuation.")
    file: str = described("The tensor file, relative to the capture directory.")
    sha256: str = described("sha256 of the tensor file.")
    bytes: int = described("Size of the tensor file.")
    tensors: dict[str, TensorListing] = described("Every tensor of the file: site name (and \"positions\") to shape and dtype.")
    determinism: RepeatRecord | None


@dataclass(frozen=True, kw_only=True)
class CaptureIdentity:
    """What ``--resume`` must match: the settings and inputs a capture was started with."""

    OPEN_KEYS = True
    backend: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class SkippedEntry:
    id: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class CaptureManifest:
    """manifest.json of a capture directory: what ran, on which model and prompts, and every tensor file."""

    schema_version: int
    format: Literal["precision-check-capture"]
    created_at: str
    backend: BackendRecord
    model: ModelRecord
    tokenizer: TokenizerRecord
    environment: dict[str, Any]
    selection: Selection
    teacher_forcing: TeacherForcing
    prompts: list[PromptEntry]
    skipped: list[SkippedEntry]
    runtime_seconds: float
    repeats: int = optional_key("Runs per prompt (above 1: each prompt's determinism record); absent in the first captures, which ran once.")
    identity: CaptureIdentity | None = optional_key("What --resume must match (precision.capture.writer.capture_identity).")


@dataclass(frozen=True, kw_only=True)
class ProgressHeader:
    """First line of progress.jsonl: {"header": CaptureIdentity}; every further line is a PromptEntry."""

    header: CaptureIdentity
