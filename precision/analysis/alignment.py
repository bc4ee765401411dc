"""Checks that two captures can be compared position by position; refusals name the difference and the fix.

Sites: by default ("same") both captures must hold the same sites, as two captures of this tool made with the same
--layers do; a difference means one was captured with other settings, and comparing a subset would hide it.
"shared" (the msprobe path, precision.interop.msprobe_compare) accepts captures that hold different sites, as
msprobe dumps of two sides often do (another module list, no lm_head): the sites both hold are compared and the
ones only one side holds are returned, to be reported.
"""

from __future__ import annotations

from dataclasses import dataclass

from precision.capture.reader import CaptureReader
from precision.errors import MismatchedCapturesError

SITE_POLICIES = ("same", "shared")


@dataclass(frozen=True)
class SiteAlignment:
    """Per prompt id, in capture order: the sites both captures hold, and those only one of them holds."""

    shared: dict[str, tuple[str, ...]]
    only_expected: dict[str, tuple[str, ...]]
    only_actual: dict[str, tuple[str, ...]]

    @property
    def one_sided(self) -> bool:
        return any(self.only_expected.values()) or any(self.only_actual.values())


def check_comparable(expected: CaptureReader, actual: CaptureReader, *, role: str = "actual", prompt_ids: list[str] | None = None,
                     sites: str = "same") -> SiteAlignment:
    """Raise MismatchedCapturesError unless both captures ran the same model shape on the same token ids
    (restricted to ``prompt_ids`` when given) and, with ``sites`` "same", hold the same sites; with "shared", at
    least one site of every prompt is held by both (see the module docstring). Returns how the sites align."""
    if sites not in SITE_POLICIES:
        raise ValueError(f"sites must be one of {SITE_POLICIES}, not {sites!r}")
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
    e_selection, a_selection = expected.manifest["selection"], actual.manifest["selection"]
    if sites == "shared":  # the layers may differ; the rows must not
        e_selection, a_selection = e_selection.get("positions"), a_selection.get("positions")
    if e_selection != a_selection:
        raise MismatchedCapturesError(f"{where} kept different positions or layers ({expected.manifest['selection']} vs {actual.manifest['selection']}); capture both with the same --positions and --layers")
    shared, only_expected, only_actual = {}, {}, {}
    for e, a in zip(expected.records(prompt_ids), actual.records(prompt_ids)):
        if e.forced_ids != a.forced_ids:
            first = next((i for i, (x, y) in enumerate(zip(e.forced_ids, a.forced_ids)) if x != y), min(len(e.forced_ids), len(a.forced_ids)))
            raise MismatchedCapturesError(
                f"{where}: prompt {e.id!r} was run on different token ids (first difference at position {first}); "
                "capture the target with --teacher-forcing REFERENCE_CAPTURE so it is fed the reference's tokens"
            )
        if e.sites != a.sites and sites == "same":
            raise MismatchedCapturesError(f"{where}: prompt {e.id!r} has sites {e.sites} vs {a.sites}; capture both with the same --layers")
        shared[e.id] = tuple(s for s in e.sites if s in a.sites)
        only_expected[e.id] = tuple(s for s in e.sites if s not in a.sites)
        only_actual[e.id] = tuple(s for s in a.sites if s not in e.sites)
        if not shared[e.id]:
            raise MismatchedCapturesError(f"{where}: prompt {e.id!r} has no site on both sides ({e.sites} vs {a.sites}); "
                                          "dump or capture at least one common module (embedding, a decoder layer, the final norm or lm_head)")
    return SiteAlignment(shared, only_expected, only_actual)
