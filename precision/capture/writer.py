"""Running a backend over a prompt plan and writing a capture directory, atomically and resumably.

Each prompt: the backend generates greedily on its own (stored for token agreement), then runs one forward pass
over prompt + continuation, where the continuation is the reference's greedy output (teacher forcing), so hidden
states and logits are compared at every position without divergence compounding. A reference capture uses its
own greedy output as the continuation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from precision.backends.base import Backend
from precision.capture import manifest as schema
from precision.capture.reader import CaptureReader, PromptRecord
from precision.capture.sites import CaptureSelection
from precision.environment import environment_record, utc_now
from precision.errors import CaptureFormatError, PrecisionError
from precision.io import os_error_message, write_json_atomic
from precision.model import sha256_file
from precision.outputs import claim_output_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlannedPrompt:
    """What one backend is asked to do for one prompt."""

    id: str
    category: str
    rendering: str
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    continuation_ids: tuple[int, ...] | None = None
    """The reference's continuation to teacher-force; None for the reference itself (it uses its own)."""


@dataclass(frozen=True)
class CapturePlan:
    prompts: tuple[PlannedPrompt, ...]
    tokenizer: dict[str, Any]
    skipped: tuple[dict[str, str], ...] = ()
    teacher_capture: str | None = None
    teacher_manifest_sha256: str | None = None

    def subset(self, prompt_ids: list[str]) -> "CapturePlan":
        wanted = set(prompt_ids)
        return CapturePlan(prompts=tuple(p for p in self.prompts if p.id in wanted), tokenizer=self.tokenizer, skipped=self.skipped,
                           teacher_capture=self.teacher_capture, teacher_manifest_sha256=self.teacher_manifest_sha256)

    def teacher_forcing_record(self) -> dict:
        """The manifest's ``teacher_forcing``: where the continuations a capture of this plan follows come from."""
        return {
            "source": "self" if self.teacher_capture is None else "reference",
            "reference_capture": self.teacher_capture,
            "reference_manifest_sha256": self.teacher_manifest_sha256,
        }

    @property
    def max_tokens_needed(self) -> int:
        return max(len(p.prompt_ids) + (len(p.continuation_ids) if p.continuation_ids is not None else p.max_new_tokens) for p in self.prompts)

    @classmethod
    def following(cls, reference: CaptureReader) -> "CapturePlan":
        """The plan for a target: the reference's stored token ids and continuations, fed unchanged."""
        prompts = tuple(
            PlannedPrompt(r.id, r.category, r.rendering, r.prompt_ids, max(len(r.continuation_ids), 1), r.continuation_ids)
            for r in reference.prompts
        )
        return cls(
            prompts=prompts,
            tokenizer=reference.manifest["tokenizer"],
            skipped=tuple(reference.manifest.get("skipped", [])),
            teacher_capture=str(reference.path.resolve()),
            teacher_manifest_sha256=reference.manifest_sha256(),
        )


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


def prompts_sha256(plan: CapturePlan) -> str:
    """sha256 of the JSON list [id, prompt token ids, max_new_tokens, teacher-forced continuation or null] per prompt:
    the ``prompts_sha256`` of a capture identity."""
    return _sha256_json([[p.id, list(p.prompt_ids), p.max_new_tokens, None if p.continuation_ids is None else list(p.continuation_ids)]
                         for p in plan.prompts])


def tokenizer_sha256(plan: CapturePlan) -> str:
    """sha256 of the plan's tokenizer record: the ``tokenizer_sha256`` of a capture identity."""
    return _sha256_json(plan.tokenizer)


def capture_identity(backend: Backend, plan: CapturePlan, selection: CaptureSelection, repeats: int = 1) -> dict:
    """Everything that decides what a capture holds. A resumed capture continues only when every field is equal,
    and ``run --resume`` reuses a finished capture only on the same condition (its manifest records this)."""
    options = backend.options
    return {
        "backend": str(backend.spec),
        "engine_args": options.engine_args,
        "variants": list(options.variants),
        "trust_remote_code": options.trust_remote_code,
        "model_config_sha256": backend.model.config_sha256,
        "model_weights_sha256": _sha256_json(backend.model.weights_sha256),
        "tokenizer_sha256": tokenizer_sha256(plan),
        "prompts_sha256": prompts_sha256(plan),
        "selection": selection.to_json(),
        "teacher_manifest_sha256": plan.teacher_manifest_sha256,
        "repeats": repeats,
    }


_IDENTITY_WORDS = {
    "backend": "backend spec", "engine_args": "engine arguments", "variants": "implementation variants",
    "trust_remote_code": "--trust-remote-code", "model_config_sha256": "model config.json", "model_weights_sha256": "model weights",
    "tokenizer_sha256": "tokenizer or chat template", "prompts_sha256": "prompt set, token ids or max_new_tokens",
    "selection": "--positions/--layers selection", "teacher_manifest_sha256": "teacher-forcing reference capture", "repeats": "--repeats",
}


def identity_differences(stored: Any, wanted: dict) -> list[str]:
    """The fields (in words) in which a stored identity differs from ``wanted``; every field when none is stored."""
    if not isinstance(stored, dict):
        return ["everything (it was written by an older precision-check, which did not record its settings)"]
    return [_IDENTITY_WORDS.get(key, key) for key in wanted if stored.get(key) != wanted[key]]


def check_finished_capture(reader: CaptureReader, identity: dict) -> None:
    """Refuse to reuse a finished capture made with other settings than ``identity``, naming what differs."""
    differences = identity_differences(reader.manifest.get("identity"), identity)
    if differences:
        raise PrecisionError(f"the finished capture in {reader.path} was made with another {', '.join(differences)} than this run asks for; "
                             "it cannot be reused: rerun without --resume (with --force) to capture again")


def _resume_records(out_dir: Path, header: dict, plan: CapturePlan) -> list[PromptRecord]:
    progress = out_dir / schema.PROGRESS
    if not progress.exists():
        return []
    lines = [line for line in progress.read_text(encoding="utf-8").splitlines() if line.strip()]
    records: list[PromptRecord] = []
    try:
        first = json.loads(lines[0]) if lines else None
    except (json.JSONDecodeError, RecursionError):
        first = None
    stored = first.get("header") if isinstance(first, dict) else None
    differences = identity_differences(stored, header)
    if differences:
        raise PrecisionError(f"{out_dir} was started with another {', '.join(differences)}; it cannot be resumed with these settings: "
                             "use the original settings, or --force to start over")
    for number, line in enumerate(lines[1:], start=2):
        try:
            record = PromptRecord.from_json(json.loads(line), f"{progress}:{number}")
        except (json.JSONDecodeError, RecursionError, CaptureFormatError):
            break  # a line cut by the interruption: that prompt is redone
        planned = plan.prompts[record.index] if record.index < len(plan.prompts) else None
        path = out_dir / record.file
        if planned is None or planned.id != record.id or planned.prompt_ids != record.prompt_ids or not path.is_file() or sha256_file(path) != record.sha256:
            break
        records.append(record)
    return records


def capture(backend: Backend, plan: CapturePlan, out_dir: str | Path, *, selection: CaptureSelection = CaptureSelection(),
            resume: bool = False, force: bool = False, show_progress: bool = True, repeats: int = 1) -> CaptureReader:
    """Run ``backend`` over ``plan`` and write a complete capture directory at ``out_dir``.

    ``repeats`` > 1 runs every prompt that many times on the same inputs (generation and capture) and records in
    the manifest whether the runs were bitwise identical, and how far apart they were if not."""
    out_dir = Path(out_dir)
    inputs = [backend.model.path, plan.teacher_capture]
    with claim_output_dir(out_dir, "capture", force=force, resume=resume, complete_marker=schema.MANIFEST, inputs=inputs) as claimed:
        return _capture_into(backend, plan, out_dir, selection, claimed.resumed, show_progress, repeats)


def _capture_into(backend: Backend, plan: CapturePlan, out_dir: Path, selection: CaptureSelection, resume: bool,
                  show_progress: bool, repeats: int) -> CaptureReader:
    from tqdm import tqdm

    (out_dir / schema.TENSOR_DIR).mkdir(exist_ok=True)
    header = capture_identity(backend, plan, selection, repeats)
    records = _resume_records(out_dir, header, plan) if resume else []
    if records:
        log.info("resuming %s: %d of %d prompts already captured", out_dir, len(records), len(plan.prompts))
    progress_path = out_dir / schema.PROGRESS
    started = time.perf_counter()
    with backend, open(progress_path, "w", encoding="utf-8") as progress:
        progress.write(json.dumps({"header": header}) + "\n")
        for record in records:
            progress.write(json.dumps(record.to_json()) + "\n")
        progress.flush()
        todo = plan.prompts[len(records):]
        backend.prepare([(p.prompt_ids, p.continuation_ids, p.max_new_tokens) for p in todo], selection)
        for index, planned in enumerate(tqdm(todo, desc=f"capture {backend.spec}", unit="prompt", disable=not show_progress), start=len(records)):
            record = _capture_one(backend, planned, index, out_dir, selection, repeats)
            records.append(record)
            progress.write(json.dumps(record.to_json()) + "\n")
            progress.flush()
            os.fsync(progress.fileno())
        description = backend.describe()
    manifest = {
        "schema_version": schema.SCHEMA_VERSION,
        "format": schema.FORMAT_NAME,
        "created_at": utc_now(),
        "backend": description,
        "model": backend.model.to_json(),
        "tokenizer": plan.tokenizer,
        "environment": environment_record(),
        "selection": selection.to_json(),
        "teacher_forcing": plan.teacher_forcing_record(),
        "prompts": [r.to_json() for r in records],
        "skipped": list(plan.skipped),
        "runtime_seconds": round(time.perf_counter() - started, 3),
        "repeats": repeats,
        "identity": header,
    }
    write_json_atomic(out_dir / schema.MANIFEST, manifest)
    return CaptureReader(out_dir)


def _capture_one(backend: Backend, planned: PlannedPrompt, index: int, out_dir: Path, selection: CaptureSelection, repeats: int) -> PromptRecord:
    generated = tuple(backend.generate(planned.prompt_ids, planned.max_new_tokens))
    continuation = generated if planned.continuation_ids is None else planned.continuation_ids
    name = schema.tensor_file_name(index)
    final = out_dir / name
    tmp = final.with_name(f".{final.name}.tmp")
    try:
        backend.capture(planned.prompt_ids + continuation, selection, tmp)
        os.replace(tmp, final)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise PrecisionError(os_error_message(exc, final, "writing")) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tensors = _tensor_listing(final)
    determinism = _repeat(backend, planned, continuation, generated, final, selection, repeats) if repeats > 1 else None
    return PromptRecord(
        index=index, id=planned.id, category=planned.category, rendering=planned.rendering,
        prompt_ids=planned.prompt_ids, continuation_ids=tuple(continuation), generated_ids=generated,
        file=name, sha256=sha256_file(final), bytes=final.stat().st_size, tensors=tensors, determinism=determinism,
    )


def _repeat(backend: Backend, planned: PlannedPrompt, continuation: tuple[int, ...], generated: tuple[int, ...],
            first: Path, selection: CaptureSelection, repeats: int) -> dict:
    """Run the prompt again ``repeats - 1`` times; compare tokens and every tensor with the first run."""
    import torch

    from precision.capture.arrays import TensorFile
    from precision.metrics import relative_l2_error

    reference = TensorFile(first).tensors()
    tokens_identical, tensors_identical, worst = True, True, 0.0
    scratch = first.with_name(f".{first.name}.repeat")
    try:
        for _ in range(repeats - 1):
            tokens_identical &= tuple(backend.generate(planned.prompt_ids, planned.max_new_tokens)) == generated
            backend.capture(planned.prompt_ids + continuation, selection, scratch)
            again = TensorFile(scratch).tensors()
            for name, tensor in reference.items():
                if not torch.equal(tensor, again[name]):
                    tensors_identical = False
                    if tensor.is_floating_point():
                        worst = max(worst, relative_l2_error(tensor.double().numpy(), again[name].double().numpy()))
    finally:
        scratch.unlink(missing_ok=True)
    return {"runs": repeats, "tokens_identical": tokens_identical, "tensors_identical": tensors_identical, "max_relative_l2": worst}


def _tensor_listing(path: Path) -> dict[str, dict[str, Any]]:
    """Names, shapes and dtypes from the safetensors header (no tensor data read)."""
    from precision.capture.arrays import TensorFile

    handle = TensorFile(path)
    return {name: {"shape": list(handle.shape(name)), "dtype": handle.dtype_name(name)} for name in handle.keys()}
