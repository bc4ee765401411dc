"""Comparing an msprobe import with other captures: the sites both sides hold, and the ones only one side holds.

msprobe dumps of two sides often hold different module lists (a dump without lm_head, a scope of a few layers).
Captures of this tool are compared only when they hold the same sites (precision.analysis.alignment: a difference
means other --layers, and a subset would hide it); when either side is an msprobe import the comparison is made on
the sites both hold (alignment's "shared" policy), and the sites only one side holds are returned to be reported
(msprobe_compare.csv lists them as msprobe lists unmatched modules: the other side's columns "N/A").

``comparable_captures`` is that choice, and the one place that makes it: the captures unchanged when neither is an
import (compare_captures then refuses differing sites as before), else views of them restricted to the shared
sites (``SharedSitesView``), so that compare_captures, the envelope and the explanation see two captures of the
same sites.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

from precision.analysis.alignment import SiteAlignment, check_comparable
from precision.capture.reader import CaptureReader, PromptRecord
from precision.capture.sites import layer_index
from precision.names import POSITIONS

IMPORTED_BACKEND = "msprobe"
"""backend.name of a capture written by import-msprobe (precision.interop.msprobe_import)."""


def is_msprobe_import(reader: CaptureReader | None) -> bool:
    return reader is not None and reader.manifest["backend"].get("name") == IMPORTED_BACKEND


class SharedSitesView:
    """A capture as if it held only ``sites[prompt id]`` (with its positions): records, manifest selection and
    tensor reads; every other attribute is the capture's. Reads go to the capture's own records and files, so
    their hashes are checked as recorded."""

    def __init__(self, reader: CaptureReader, sites: dict[str, tuple[str, ...]], layers: list[int] | str):
        self._reader = reader
        self._originals = {r.id: r for r in reader.prompts}
        self.prompts = [dataclasses.replace(r, tensors={name: info for name, info in r.tensors.items() if name in sites[r.id] or name == POSITIONS})
                        for r in reader.prompts if r.id in sites]
        self.manifest = copy.copy(reader.manifest)
        self.manifest["selection"] = {**reader.manifest["selection"], "layers": layers}

    def __getattr__(self, name: str):
        return getattr(self._reader, name)

    def records(self, prompt_ids: list[str] | None = None) -> list[PromptRecord]:
        return list(self.prompts) if prompt_ids is None else [r for r in self.prompts if r.id in set(prompt_ids)]

    def arrays(self, record: PromptRecord, *, verify: bool = True):
        return self._reader.arrays(self._originals[record.id], verify=verify)

    def open_tensors(self, record: PromptRecord, *, verify: bool = True):
        return self._reader.open_tensors(self._originals[record.id], verify=verify)


@dataclass(frozen=True)
class ComparableCaptures:
    expected: CaptureReader
    actual: CaptureReader
    truth: CaptureReader | None
    members: dict[str, CaptureReader]
    alignment: SiteAlignment | None
    """How the sites of the expected and actual captures align; None when neither is an msprobe import."""

    def one_sided_lines(self) -> list[str]:
        """What was not compared, one line per prompt that has such sites (empty when every site is on both sides)."""
        if self.alignment is None:
            return []
        lines = []
        for prompt_id, shared in self.alignment.shared.items():
            only_e, only_a = self.alignment.only_expected[prompt_id], self.alignment.only_actual[prompt_id]
            if only_e or only_a:
                lines.append(f"prompt {prompt_id}: compared {len(shared)} site(s) both sides hold; only the reference holds "
                             f"{', '.join(only_e) or 'none'}; only the target holds {', '.join(only_a) or 'none'}")
        return lines


def comparable_captures(expected: CaptureReader, actual: CaptureReader, truth: CaptureReader | None = None, *,
                        members: dict[str, CaptureReader] | None = None, prompt_ids: list[str] | None = None) -> ComparableCaptures:
    """The captures to compare (see the module docstring). The truth and the envelope members are restricted to the
    same sites; one that lacks a shared site is refused by compare_captures, naming it."""
    members = dict(members or {})
    if not (is_msprobe_import(expected) or is_msprobe_import(actual)):
        return ComparableCaptures(expected, actual, truth, members, None)
    alignment = check_comparable(expected, actual, prompt_ids=prompt_ids, sites="shared")
    if not alignment.one_sided and expected.manifest["selection"] == actual.manifest["selection"]:
        return ComparableCaptures(expected, actual, truth, members, alignment)
    layers = sorted({layer_index(s) for sites in alignment.shared.values() for s in sites if layer_index(s) is not None})
    selection = "all" if layers == list(range(expected.num_layers)) else layers

    def view(reader: CaptureReader | None) -> SharedSitesView | None:
        return None if reader is None else SharedSitesView(reader, alignment.shared, selection)

    return ComparableCaptures(view(expected), view(actual), view(truth), {name: view(m) for name, m in members.items()}, alignment)
