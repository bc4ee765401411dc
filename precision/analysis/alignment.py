"""Checks that two captures can be compared position by position; refusals name the difference and the fix."""

from __future__ import annotations

from precision.capture.reader import CaptureReader
from precision.errors import MismatchedCapturesError


def check_comparable(expected: CaptureReader, actual: CaptureReader, *, role: str = "actual", prompt_ids: list[str] | None = None) -> None:
    """Raise MismatchedCapturesError unless both captures ran the same model shape on the same token ids
    (restricted to ``prompt_ids`` when given)."""
    e_model, a_model = expected.manifest["model"], actual.manifest["model"]
    where = f"{expected.path} (expected) and {actual.path} ({role})"
    for key, what in (("vocab_size", "vocabulary size"), ("num_layers", "layer count"), ("hidden_size", "hidden size")):
        if e_model[key] != a_model[key]:
            raise MismatchedCapturesError(f"{where} differ in {what}: {e_model[key]} vs {a_model[key]}; they are captures of different models")
    e_tok, a_tok = expected.manifest["tokenizer"], actual.manifest["tokenizer"]
    for key in ("vocab_size", "tokenizer_json_sha256", "chat_template_sha256"):
        if e_tok.get(key) != a_tok.get(key):
            raise MismatchedCapturesError(f"{where} were tokenized differently ({key}: {e_tok.get(key)} vs {a_tok.get(key)}); capture the {role} side with --teacher-forcing pointing at the reference capture")
    if prompt_ids is not None:
        for capture, name in ((expected, "expected"), (actual, role)):
            missing = set(prompt_ids) - {r.id for r in capture.prompts}
            if missing:
                raise MismatchedCapturesError(f"{capture.path} ({name}) lacks prompt(s) {sorted(missing)}")
    e_ids, a_ids = [r.id for r in expected.records(prompt_ids)], [r.id for r in actual.records(prompt_ids)]
    if e_ids != a_ids:
        raise MismatchedCapturesError(f"{where} hold different prompts ({e_ids[:5]} vs {a_ids[:5]}); capture both from the same prompt set")
    if expected.manifest["selection"] != actual.manifest["selection"]:
        raise MismatchedCapturesError(f"{where} kept different positions or layers ({expected.manifest['selection']} vs {actual.manifest['selection']}); capture both with the same --positions and --layers")
    for e, a in zip(expected.records(prompt_ids), actual.records(prompt_ids)):
        if e.forced_ids != a.forced_ids:
            first = next((i for i, (x, y) in enumerate(zip(e.forced_ids, a.forced_ids)) if x != y), min(len(e.forced_ids), len(a.forced_ids)))
            raise MismatchedCapturesError(
                f"{where}: prompt {e.id!r} was run on different token ids (first difference at position {first}); "
                "capture the target with --teacher-forcing REFERENCE_CAPTURE so it is fed the reference's tokens"
            )
        if e.sites != a.sites:
            raise MismatchedCapturesError(f"{where}: prompt {e.id!r} has sites {e.sites} vs {a.sites}; capture both with the same --layers")
