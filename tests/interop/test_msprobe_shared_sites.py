"""An msprobe import that holds other sites than the capture it is compared with: compared on the sites both hold,
the others listed (msprobe_compare.csv rows with the missing side "N/A"); captures of this tool that hold different
sites are still refused. On real msprobe dumps of transformers running stories260K (tests/interop/conftest.py)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from precision.analysis.compare import compare_captures
from precision.analysis.verdict import judge
from precision.capture.reader import CaptureReader
from precision.errors import MismatchedCapturesError
from precision.interop.msprobe_compare import comparable_captures
from precision.interop.msprobe_export import CSV_NAME, write_msprobe_csv
from precision.names import EMBED, FINAL_NORM, LOGITS, layer_site
from precision.pipeline import analysed_comparison
from tests.interop.conftest import import_dump

DROPPED_LAYER = 2


@pytest.fixture(scope="module")
def partial_import(bf16_dump, stories_path, stories_reference, tmp_path_factory) -> Path:
    """msprobe's BF16 dump without lm_head and without decoder layer 2 (as a dump scoped to other modules holds),
    imported against the reference capture."""
    root = tmp_path_factory.mktemp("partial")
    dump = root / "dump"
    shutil.copytree(bf16_dump, dump)
    for path in dump.glob("step*/*/dump.json"):
        data = json.loads(path.read_text())
        data["data"] = {k: v for k, v in data["data"].items() if ".lm_head." not in k and f".layers.{DROPPED_LAYER}." not in k}
        path.write_text(json.dumps(data))
    return import_dump(dump, stories_path, root / "imported", "--teacher-forcing", str(stories_reference.path))


def test_an_import_is_compared_on_the_shared_sites_and_the_others_are_listed(stories_reference, partial_import):
    imported = CaptureReader(partial_import)
    with pytest.raises(MismatchedCapturesError, match="--layers"):  # the strict policy, as before
        compare_captures(stories_reference, imported)
    captures = comparable_captures(stories_reference, imported)
    alignment = captures.alignment
    first = stories_reference.prompts[0].id
    assert alignment.only_expected[first] == (layer_site(DROPPED_LAYER), LOGITS) and alignment.only_actual[first] == ()
    assert EMBED in alignment.shared[first] and FINAL_NORM in alignment.shared[first]
    lines = captures.one_sided_lines()
    assert len(lines) == len(stories_reference.prompts) and f"only the reference holds {layer_site(DROPPED_LAYER)}, {LOGITS}" in lines[0]
    comparison = compare_captures(captures.expected, captures.actual)
    for prompt in comparison["prompts"]:
        assert [s["site"] for s in prompt["sites"]] == list(alignment.shared[prompt["id"]])
        # The same transformers BF16 run on both sides: every shared site is bit for bit the same.
        assert all(s["metrics"]["relative_l2"] == 0.0 for s in prompt["sites"])
    assert judge(comparison).status.value == "PASS"


def test_the_csv_lists_the_sites_only_one_side_holds(stories_reference, partial_import, tmp_path):
    captures = comparable_captures(stories_reference, CaptureReader(partial_import))
    comparison = analysed_comparison(captures.expected, captures.actual, None, replay=False, show_progress=False)
    write_msprobe_csv(tmp_path, comparison, judge(comparison))
    with open(tmp_path / CSV_NAME, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    first = stories_reference.prompts[0].id
    names = [row["Bench Name"] for row in rows if row["Bench Name"].startswith(first + ".")]
    assert names == [f"{first}.{s}" for s in (EMBED, *(layer_site(i) for i in range(5)), FINAL_NORM, LOGITS)]
    one_sided = {row["Bench Name"]: row for row in rows if row["NPU Name"] == "N/A"}
    assert set(one_sided) == {f"{p.id}.{s}" for p in stories_reference.prompts for s in (layer_site(DROPPED_LAYER), LOGITS)}
    row = one_sided[f"{first}.{LOGITS}"]
    assert (row["Result"], row["Cosine"], row["NPU Dtype"], json.loads(row["Err_message"])) == ("N/A", "N/A", "N/A", ["No NPU data matched."])
    logits = stories_reference.arrays(stories_reference.prompts[0]).array(LOGITS).astype("float64")
    assert float(row["Bench max"]) == logits.max() and row["Bench Tensor Shape"] == str(list(logits.shape))
    compared = [row for row in rows if row["NPU Name"] != "N/A"]
    assert compared and {row["Result"] for row in compared} == {"pass"}


def test_captures_of_this_tool_with_other_sites_are_still_refused(stories, stories_reference, tmp_path):
    from precision.backends import create_backend
    from precision.capture.sites import CaptureSelection
    from precision.capture.writer import CapturePlan, capture

    fewer = capture(create_backend("hf:cpu:bf16", stories), CapturePlan.following(stories_reference), tmp_path / "fewer",
                    selection=CaptureSelection(layers=(0, 1)), show_progress=False)
    captures = comparable_captures(stories_reference, fewer)
    assert captures.alignment is None and captures.expected is stories_reference
    with pytest.raises(MismatchedCapturesError, match="--layers"):
        compare_captures(captures.expected, captures.actual)


def test_the_compare_command_compares_an_import_on_the_shared_sites(stories_reference, partial_import, tmp_path, caplog):
    """Through the CLI: the import is not refused, the sites only the reference holds are named, the CSV lists them."""
    from precision.cli import main

    out = tmp_path / "cmp"
    with caplog.at_level("WARNING"):
        code = main(["-q", "compare", str(stories_reference.path), str(partial_import), "--out", str(out)])
    assert code == 0
    comparison = json.loads((out / "comparison.json").read_text())
    assert all(LOGITS not in [s["site"] for s in p["sites"]] for p in comparison["prompts"])
    assert any(f"only the reference holds {layer_site(DROPPED_LAYER)}, {LOGITS}" in r.getMessage() for r in caplog.records)
    with (out / CSV_NAME).open(newline="") as f:
        results = [row["Result"] for row in csv.DictReader(f)]
    assert "N/A" in results
