"""The side a target is judged against: the reference, its FP32 truth and the implementation envelope.

It comes from a *reference source*: captured now from backends (``CapturedReference``, here), or read from a
golden store (``precision.golden.GoldenStore``). The pipeline receives a source and never asks which kind it is,
so the golden store can use this module to create itself without importing the pipeline (one direction only:
pipeline -> reference_side <- golden).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from precision.analysis.envelope import DEFAULT_MAX_TOKENS, DEFAULT_MEMBERS, envelope_prompt_ids, member_name
from precision.backends import BackendOptions, create_backend, parse_spec
from precision.capture.reader import CaptureReader
from precision.capture.sites import CaptureSelection
from precision.capture.writer import CapturePlan, capture, capture_identity, check_finished_capture
from precision.errors import PrecisionError
from precision.model import ModelInfo, inspect_model

log = logging.getLogger(__name__)

DEFAULT_REFERENCE = "hf:cpu:bf16"
DEFAULT_TRUTH = "hf:cpu:fp32"


@dataclass(frozen=True)
class CaptureSettings:
    """How every capture of one job is taken: which sites and positions, and whether to continue a capture."""

    selection: CaptureSelection = field(default_factory=CaptureSelection)
    trust_remote_code: bool = False
    resume: bool = False
    show_progress: bool = True


def resolve_model(model: Path | None) -> ModelInfo:
    """The model at ``model``, or the built-in synthetic Llama when none is given."""
    if model is None:
        from precision.default_model import default_model_path

        model = default_model_path()
    return inspect_model(model)


def capture_role(role: str, spec: str, model: ModelInfo, plan: CapturePlan, run_dir: Path, settings: CaptureSettings, *,
                 options: BackendOptions | None = None, repeats: int = 1) -> CaptureReader:
    """Capture backend ``spec`` into ``run_dir/captures/<role>`` (reusing a finished capture of the same settings
    when ``settings.resume``)."""
    out = run_dir / "captures" / role
    options = options or BackendOptions(trust_remote_code=settings.trust_remote_code)
    if options.max_model_len is None:
        # +1: an engine's capture pass asks for one token after the whole teacher-forced sequence
        options = replace(options, max_model_len=min(plan.max_tokens_needed + 1, model.max_position_embeddings))
    backend = create_backend(parse_spec(spec), model, options)
    if settings.resume and (out / "manifest.json").is_file():
        reader = CaptureReader(out)
        check_finished_capture(reader, capture_identity(backend, plan, settings.selection, repeats))
        log.info("reusing the finished %s capture in %s (same settings)", role, out)
        return reader
    return capture(backend, plan, out, selection=settings.selection, resume=settings.resume, show_progress=settings.show_progress,
                   repeats=repeats)


@dataclass(frozen=True)
class CpuSide:
    """The reference, FP32 truth and envelope captures a target is judged against."""

    reference: CaptureReader
    truth: CaptureReader | None
    members: dict[str, CaptureReader]
    envelope_prompts: list[str]

    @property
    def following(self) -> CapturePlan:
        return CapturePlan.following(self.reference)


class ReferenceSource(Protocol):
    """Where the CPU side of a run comes from."""

    stored_at: Path | None
    """The directory the side is read from (recorded in run.json, kept apart from the outputs); None: captured."""

    def check_specs(self) -> None:
        """Refuse a misspelled backend before any model loads."""

    def open(self, model: ModelInfo, plan: CapturePlan, out: Path, settings: CaptureSettings) -> CpuSide:
        """The side for ``plan`` on ``model``; a captured one is written under ``out``."""

    def record(self) -> dict:
        """What run.json says about this side: its "reference", "truth" and "envelope"."""


def teacher_forced_spec(reference: str) -> str:
    """The backend that runs the truth and the envelope's members, which follow the reference's tokens: a CPU
    transformers spec runs layer by layer (precision.backends.layerwise: the same arithmetic as ``hf``, bit for bit,
    without free generation, which a teacher-forced capture does not use; the members share one loaded model)."""
    spec = parse_spec(reference)
    if spec.name == "hf" and spec.device in (None, "cpu"):
        return str(replace(spec, name="hf-layers"))
    return reference


def streamed_spec(spec: str) -> str:
    """``spec`` run layer-streamed (precision.backends.layerwise): one step's weights in memory at a time."""
    parsed = parse_spec(spec)
    if parsed.name in ("hf", "hf-layers", "hf-streamed") and parsed.device in (None, "cpu"):
        return str(replace(parsed, name="hf-streamed"))
    raise PrecisionError(f"--layer-streamed runs the CPU transformers reference and truth one layer at a time; {spec} is not one of them "
                         "(use hf:cpu:bf16 and hf:cpu:fp32, or drop --layer-streamed)")


def _finished(out: Path, name: str, settings: CaptureSettings) -> bool:
    return settings.resume and (out / "captures" / "envelope" / name / "manifest.json").is_file()


@dataclass(frozen=True)
class CapturedReference:
    """The CPU side captured now: the reference backend, then the truth and the envelope fed its tokens."""

    reference: str = DEFAULT_REFERENCE
    truth: str | None = DEFAULT_TRUTH
    envelope: tuple[tuple[str, ...], ...] = DEFAULT_MEMBERS
    envelope_max_tokens: int = DEFAULT_MAX_TOKENS
    stored_at: Path | None = None

    def check_specs(self) -> None:
        if (Path(self.reference) / "store.json").is_file():
            raise PrecisionError(f"--reference {self.reference} is a golden store, not a backend spec: open it with "
                                 "precision.golden.GoldenStore and pass it as the run's reference source (precision.run does)")
        if Path(self.reference).is_dir():
            raise PrecisionError(f"--reference {self.reference} is a directory but not a golden store (no store.json); "
                                 "pass a backend spec such as hf:cpu:bf16, or a store made by 'precision-check golden create'")
        if self.envelope_max_tokens < 1:
            raise PrecisionError(f"envelope_max_tokens {self.envelope_max_tokens} must be at least 1")
        parse_spec(self.reference)  # the truth's spec is the run's setting: the pipeline checks it

    def open(self, model: ModelInfo, plan: CapturePlan, out: Path, settings: CaptureSettings) -> CpuSide:
        reference = capture_role("reference", self.reference, model, plan, out, settings)
        following = CapturePlan.following(reference)
        truth = capture_role("truth", teacher_forced_spec(self.truth), model, following, out, settings) if self.truth else None
        members, envelope_ids = self.capture_envelope(reference, model, following, out, settings)
        return CpuSide(reference, truth, members, envelope_ids)

    def capture_envelope(self, reference: CaptureReader, model: ModelInfo, following: CapturePlan, out: Path,
                         settings: CaptureSettings) -> tuple[dict[str, CaptureReader], list[str]]:
        """The reference re-run with each envelope member, on the prompts short enough for all of them."""
        from precision.backends.layerwise import lending
        from precision.backends.model_steps import ModelSteps

        ids = envelope_prompt_ids(reference, self.envelope_max_tokens)
        if not self.envelope or not ids:
            return {}, ids
        spec = teacher_forced_spec(self.reference)
        members, lent = {}, False
        with contextlib.ExitStack() as shared:
            for member in self.envelope:
                name = member_name(member)
                options = BackendOptions(trust_remote_code=settings.trust_remote_code, variants=member)
                if spec != self.reference and not lent and not _finished(out, name, settings):
                    lent = True
                    shared.enter_context(lending(ModelSteps(model.path, parse_spec(spec).torch_dtype_name,
                                                            trust_remote_code=settings.trust_remote_code)))
                members[name] = capture_role(f"envelope/{name}", spec, model, following.subset(ids), out, settings, options=options)
        return members, ids

    def record(self) -> dict:
        """What run.json says about this side."""
        return {"reference": self.reference, "truth": self.truth, "envelope": [member_name(m) for m in self.envelope]}
