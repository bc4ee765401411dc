"""The data contract: typed documents, their published JSON Schemas, versioning, and one spelling per name."""

from __future__ import annotations

import ast
import dataclasses
import json
import math
from pathlib import Path

import pytest

from precision import contract, names
from precision.cli import main
from precision.contract import DOCUMENTS, ContractError, publish
from precision.contract.codec import decode, encode, optional_key
from precision.io import DocumentWriteError, read_result_json, write_json_atomic
from tests.conftest import REPO
from tests.schema_check import schema_errors


@pytest.fixture(scope="module")
def run_dir(stories_path, short_prompts, tmp_path_factory):
    """One real run (FP16 target, truth, envelope, replay) and a regression of it against itself."""
    out = tmp_path_factory.mktemp("contract") / "run"
    assert main(["-q", "run", "--prompts", str(short_prompts), "--model", str(stories_path), "--target", "hf:cpu:fp16",
                 "--max-new-tokens", "4", "--out", str(out)]) == 0
    assert main(["-q", "regress", str(out), str(out), "--out", str(out.parent / "regression")]) == 0
    return out


def test_published_schemas_match_the_types():
    assert publish.problems() == []


def test_every_document_a_run_writes_validates_against_the_published_schema(run_dir):
    documents = [p for p in run_dir.parent.rglob("*.json") if json.loads(p.read_text()).get("format")]
    seen = {}
    for path in documents:
        document_format, errors = schema_errors(path)
        assert errors == [], errors
        seen[document_format] = seen.get(document_format, 0) + 1
    assert {"precision-check-capture", "precision-check-comparison", "precision-check-summary", "precision-check-run",
            "precision-check-regression"} <= set(seen), seen
    assert seen["precision-check-capture"] >= 3  # reference, truth, target (and the envelope members)
    unformatted = [p for p in run_dir.parent.rglob("*.json") if p.name in {d.file for d in DOCUMENTS.values()}
                   and p not in documents]
    assert unformatted == []


def test_a_schema_change_without_a_version_bump_fails(monkeypatch):
    summary = DOCUMENTS["precision-check-summary"]

    @dataclasses.dataclass(frozen=True)
    class ChangedSummary(summary.type):  # one field more, same version
        new_field: int = optional_key()

    ChangedSummary.__name__ = summary.type.__name__
    monkeypatch.setitem(DOCUMENTS, summary.format, dataclasses.replace(summary, type=ChangedSummary))
    assert any("changed but its version is still 1" in p for p in publish.problems())
    monkeypatch.setitem(DOCUMENTS, summary.format, dataclasses.replace(summary, type=ChangedSummary, version=2, readable=(2,)))
    assert any("version 2 is not published" in p for p in publish.problems())


def test_publishing_refuses_to_change_a_released_version(monkeypatch, tmp_path):
    publish.publish(tmp_path)
    assert publish.problems(tmp_path) == []
    summary = DOCUMENTS["precision-check-summary"]

    @dataclasses.dataclass(frozen=True)
    class ChangedSummary(summary.type):
        new_field: int = optional_key()

    monkeypatch.setitem(DOCUMENTS, summary.format, dataclasses.replace(summary, type=ChangedSummary))
    with pytest.raises(ContractError, match="bump its version"):
        publish.publish(tmp_path)


def test_a_newer_major_version_is_refused_with_a_message(run_dir, tmp_path, capsys):
    comparison = json.loads((run_dir / "comparison.json").read_text())
    comparison["schema_version"] = 7
    path = tmp_path / "comparison.json"
    path.write_text(json.dumps(comparison))
    with pytest.raises(ContractError, match="schema version 7; this precision-check reads version 1 .*newer precision-check: upgrade"):
        read_result_json(path)
    assert main(["report", str(path), "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err
    assert "schema version 7" in err and "Traceback" not in err


def test_a_malformed_document_is_refused_naming_the_value(run_dir, tmp_path):
    comparison = json.loads((run_dir / "comparison.json").read_text())
    comparison["prompts"][0]["sites"][1]["metrics"]["cosine"] = "high"
    path = tmp_path / "comparison.json"
    path.write_text(json.dumps(comparison))
    with pytest.raises(ContractError, match=r"prompts\[0\]\.sites\[1\]\.metrics\.cosine: expected a number, got str"):
        read_result_json(path)
    comparison["prompts"][0]["sites"][1]["metrics"]["cosine"] = 1.0
    comparison["prompts"][0]["surprise"] = 1
    path.write_text(json.dumps(comparison))
    with pytest.raises(ContractError, match=r"prompts\[0\]: unknown key 'surprise' in PromptComparison"):
        read_result_json(path)


def test_writing_a_document_off_its_schema_is_an_internal_error(run_dir, tmp_path):
    summary = read_result_json(run_dir / "summary.json")
    del summary["verdict"]
    with pytest.raises(DocumentWriteError, match="lacks the required key 'verdict'"):
        write_json_atomic(tmp_path / "summary.json", summary)
    assert not (tmp_path / "summary.json").exists()


def test_load_returns_the_typed_document(run_dir):
    comparison = contract.load(run_dir / "comparison.json", "precision-check-comparison")
    assert isinstance(comparison, contract.Comparison)
    first = comparison.prompts[0].sites[0]
    assert first.site == names.EMBED and first.metrics.relative_l2 >= 0.0
    assert comparison.analysis.local.available
    assert encode(comparison) == json.loads((run_dir / "comparison.json").read_text())  # the codec round-trips


def test_non_finite_floats_are_written_one_documented_way():
    @dataclasses.dataclass(frozen=True)
    class Numbers:
        values: list[float]
        note: str

    encoded = encode(Numbers([math.nan, math.inf, -math.inf, 1.5], "NaN"))
    assert encoded == {"values": ["NaN", "Infinity", "-Infinity", 1.5], "note": "NaN"}
    decoded = decode(Numbers, encoded)
    assert math.isnan(decoded.values[0]) and decoded.values[1:] == [math.inf, -math.inf, 1.5]
    assert decoded.note == "NaN"  # a string field stays a string, whatever it spells
    with pytest.raises(ContractError, match=r"values\[0\]: expected a number"):
        decode(Numbers, {"values": ["nan"], "note": ""})


def _string_literals(path: Path) -> set[str]:
    """Every string constant of a module (f-string parts included), except the names listed in ``__all__``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    exported = {id(node) for stmt in ast.walk(tree) if isinstance(stmt, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "__all__" for t in stmt.targets) for node in ast.walk(stmt.value)}
    return {node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in exported}


def test_site_and_metric_names_are_spelled_in_one_module():
    spelled = set(names.METRIC_NAMES) | set(names.SITE_NAMES)
    where: dict[str, list[str]] = {}
    for path in sorted((REPO / "precision").rglob("*.py")):
        for literal in _string_literals(path) & spelled:
            where.setdefault(literal, []).append(str(path.relative_to(REPO)))
    offenders = {name: files for name, files in where.items() if files != ["precision/names.py"]}
    assert offenders == {}


def test_the_literal_check_can_fail(tmp_path):
    module = tmp_path / "offender.py"
    module.write_text('row = {"relative_l2": 1.0}\nlabel = f"{row}"\n')
    assert names.RELATIVE_L2 in _string_literals(module)


def test_documents_of_the_same_version_written_before_a_key_existed_still_read(run_dir, tmp_path):
    """Keys added to schema version 1 after files of that version were written are optional: an older
    comparison.json (no per-element non-finite counts, no local rounding gain) reads, and is judged."""
    from precision.analysis.verdict import judge

    comparison = json.loads((run_dir / "comparison.json").read_text())
    for prompt in comparison["prompts"]:
        for entry in prompt["sites"]:
            for key in ("actual_only", "actual_only_first_index", "mismatched", "mismatched_first_index"):
                del entry["metrics"]["non_finite"][key]
    for step in comparison["analysis"]["local"]["steps"]:
        del step["rounding_gain"]
    path = tmp_path / "comparison.json"
    path.write_text(json.dumps(comparison))
    older = read_result_json(path)
    assert "actual_only" not in older["prompts"][0]["sites"][0]["metrics"]["non_finite"]
    assert judge(older).status.value == json.loads((run_dir / "summary.json").read_text())["verdict"]["status"]


def test_a_run_started_from_the_python_api_has_no_command_line(run_dir):
    record = json.loads((run_dir / "run.json").read_text())
    record["command"] = None
    assert contract.validate(record, "run.json").command is None


def test_the_session_check_finds_an_off_schema_document_and_skips_one_changed_after_writing(run_dir, tmp_path):
    import hashlib

    from tests.schema_check import check_logged_documents

    good = run_dir / "summary.json"
    bad = tmp_path / "summary.json"
    summary = json.loads(good.read_text())
    summary["verdict"]["status"] = "MAYBE"
    bad.write_text(json.dumps(summary))
    changed = tmp_path / "changed" / "summary.json"
    changed.parent.mkdir()
    changed.write_text(good.read_text())
    log = tmp_path / "written.txt"
    log.write_text("".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}\t{p}\n" for p in (good, bad, changed)))
    changed.write_text(json.dumps(summary))  # damaged after it was written: the writer validated it then
    problems, counts = check_logged_documents(log)
    assert counts == {"precision-check-summary": 2}
    assert len(problems) == 1 and str(bad) in problems[0] and "verdict/status" in problems[0]
