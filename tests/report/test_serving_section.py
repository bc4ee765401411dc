"""The run's own report on its serving stage (precision.report.serving): summary.json's serving section and the
"Serving configurations" section of summary.md and report.html, rendered from stage documents stored from real
parity runs of stories260K on vLLM CPU (tests/report/data: tensor parallel 2, compiled mode and an FP8 KV cache that
fails and is bisected; the prompt-logprobs level; a passing stage), with a real run's comparison; and what verify
makes of a run directory's stage document. The run with a real stage end to end: tests/serving/test_run_stage_vllm.py."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from precision.analysis.verdict import judge
from precision.io import read_result_json
from precision.report import write_report
from precision.serving.report import write_parity_report
from precision.verify import verify_run
from tests.schema_check import schema_errors

DATA = Path(__file__).parent / "data"


def _stage_path(name: str) -> Path:
    return DATA / f"parity-stories260k-{name}.json"


def _stage(name: str) -> dict:
    return read_result_json(_stage_path(name))


def _render(run: Path, out: Path, document: dict | None):
    comparison = read_result_json(run / "comparison.json")
    verdict = judge(comparison)
    out.mkdir(parents=True, exist_ok=True)
    command = read_result_json(run / "run.json")["command"]
    write_report(out, comparison, verdict, command=command, serving=document)
    return verdict, read_result_json(out / "summary.json"), (out / "summary.md").read_text(encoding="utf-8"), (out / "report.html").read_text(encoding="utf-8")


def test_the_runs_comparison_passes_so_only_the_stage_can_fail_it(fp16_subset_run):
    assert judge(read_result_json(fp16_subset_run / "comparison.json")).status.value != "FAIL"


def test_summary_json_holds_the_stage_documents_figures_per_configuration(fp16_subset_run, tmp_path):
    document = _stage("fail")
    verdict, summary, _, _ = _render(fp16_subset_run, tmp_path, document)
    section = summary["serving"]
    assert summary["verdict"]["status"] == verdict.status.value  # the run's status stays the comparison's
    assert (section["status"], section["overall_status"]) == ("FAIL", "FAIL")
    assert (section["summary"], section["report"]) == ("serving/summary.json", "serving/report.html")
    assert section["summary_sha256"] == hashlib.sha256(_stage_path("fail").read_bytes()).hexdigest()  # the file as the stage wrote it
    assert [e["name"] for e in section["configurations"]] == ["compiled", "tp2", "kvfp8"]
    for entry, row in zip(section["configurations"], document["configurations"]):
        assert (entry["verdict"], entry["level"]) == (row["verdict"], row["level"])
        assert (entry["largest_metric"], entry["largest_value"], entry["largest_site"]) == ("relative_l2", row["largest"]["relative_l2"], row["largest"]["site"])
        assert (entry["envelope_ratio"], entry["envelope_ratio_site"]) == (row["envelope_ratio"]["ratio"], row["envelope_ratio"]["site"])
        assert (entry["first_differing_site"], entry["bitwise_identical"]) == (row["first_bitwise_site"], row["bitwise_identical"])
        assert entry["comparison"] == f"serving/{row['comparison']}"
    compiled, tp2, kvfp8 = section["configurations"]
    assert (compiled["level"], tp2["level"], kvfp8["level"]) == ("logits", "layers", "layers")
    assert (compiled["responsible"], compiled["bisection"]) == (None, None)  # it passed: nothing to bisect
    assert kvfp8["responsible"] == {"kv_cache_dtype": "fp8"} and kvfp8["envelope_ratio"] > 2
    assert kvfp8["bisection"] == document["configurations"][2]["bisection"]["sentence"]
    assert schema_errors(tmp_path / "summary.json")[1] == []


def test_a_passing_stage_leaves_the_outcome_the_comparisons(fp16_subset_run, tmp_path):
    verdict, summary, markdown, _ = _render(fp16_subset_run, tmp_path, _stage("pass"))
    assert (summary["serving"]["status"], summary["serving"]["overall_status"]) == ("PASS", verdict.status.value)
    assert f"**Overall: {verdict.status.value}.** The cross-engine comparison below is {verdict.status.value}; the serving configurations are PASS (0 of 2 configurations fail)." in markdown


def test_the_prompt_logprobs_level_names_its_metric_and_no_layer(fp16_subset_run, tmp_path):
    document = _stage("prompt-logprobs")
    _, summary, markdown, _ = _render(fp16_subset_run, tmp_path, document)
    entries = {e["name"]: e for e in summary["serving"]["configurations"]}
    for row in document["configurations"]:
        entry = entries[row["name"]]
        assert (entry["level"], entry["level_reason"]) == ("prompt-logprobs", row["level_reason"])
        assert (entry["largest_metric"], entry["largest_value"]) == ("topk_logprob_delta", row["largest"]["topk_logprob_delta"])
        assert (entry["first_differing_site"], entry["bitwise_identical"], entry["comparison"]) == (None, None, None)
    assert entries["fp8lp"]["responsible"] == {"kv_cache_dtype": "fp8"} and entries["fp8lp"]["verdict"] == "FAIL"
    assert "n/a (logprobs only)" in markdown
    assert schema_errors(tmp_path / "summary.json")[1] == []


@pytest.mark.parametrize("name", ["fail", "prompt-logprobs"])
def test_summary_md_puts_the_outcome_first_and_the_parity_reports_rows_in_its_table(fp16_subset_run, tmp_path, name):
    document = _stage(name)
    verdict, _, markdown, _ = _render(fp16_subset_run, tmp_path / "run", document)
    lines = markdown.splitlines()
    assert lines[0] == f"## Numerical precision: {verdict.status.value}"
    failing = sum(r["verdict"] == "FAIL" for r in document["configurations"])
    assert lines[2].startswith(f"**Overall: FAIL.** The cross-engine comparison below is {verdict.status.value}; the serving configurations are FAIL ({failing} of ")
    assert "### Serving configurations: FAIL" in markdown and "[serving/report.html](serving/report.html)" in markdown
    # The same cells as the stage's own report (precision.serving.report words them; the columns are the same).
    write_parity_report(tmp_path, document)
    parity_rows = [line for line in (tmp_path / "summary.md").read_text(encoding="utf-8").splitlines()
                   if any(line.startswith(f"| {r['name'].replace('_', chr(92) + '_')} |") for r in document["configurations"])]
    assert len(parity_rows) == len(document["configurations"])
    assert all(row in lines for row in parity_rows)
    assert markdown.index("### Serving configurations") < markdown.index("### Performance (not precision)")


def test_report_html_links_the_stage_report_and_shows_every_configuration(fp16_subset_run, tmp_path):
    document = _stage("fail")
    _, _, _, html = _render(fp16_subset_run, tmp_path, document)
    assert '<p class="overall"><b>Overall: FAIL.</b>' in html and '<a href="#serving">Serving configurations</a>' in html
    section = html[html.index('<section id="serving">'):html.index('<section id="performance">')]
    assert '<a href="serving/report.html">serving/report.html</a>' in section
    for row in document["configurations"]:
        assert f"<tr><td>{row['name']}</td>" in section and f'<td class="status-{row["verdict"].lower()}">{row["verdict"]}</td>' in section
    assert "kv_cache_dtype=&#39;fp8&#39; (first at layer.0)" in section


def test_a_run_without_a_stage_renders_no_serving_section(fp16_subset_run, tmp_path):
    _, summary, markdown, html = _render(fp16_subset_run, tmp_path, None)
    assert "serving" not in summary and "Overall" not in markdown and "Serving configurations" not in markdown
    assert 'id="serving"' not in html and "Overall" not in html
    for name in ("summary.json", "summary.md", "report.html"):  # as the run itself wrote them
        assert (tmp_path / name).read_bytes() == (fp16_subset_run / name).read_bytes()


@pytest.fixture
def run_with_foreign_stage(fp16_subset_run, tmp_path):
    """A copy of a real run whose report was rendered with a real stage document of another run."""
    copy = tmp_path / "run"
    shutil.copytree(fp16_subset_run, copy, ignore=shutil.ignore_patterns(".precision-check.lock"))
    (copy / "serving").mkdir()
    shutil.copyfile(_stage_path("fail"), copy / "serving" / "summary.json")
    _render(copy, copy, _stage("fail"))
    return copy


def test_verify_refuses_a_stage_document_whose_baseline_is_not_the_runs_target(run_with_foreign_stage):
    problems = verify_run(run_with_foreign_stage)
    assert any("serving/summary.json's baseline" in p and "is not this run's target capture" in p for p in problems), problems


def test_verify_detects_an_edited_or_removed_stage_document(run_with_foreign_stage):
    stage = run_with_foreign_stage / "serving" / "summary.json"
    document = json.loads(stage.read_text(encoding="utf-8"))
    document["configurations"][2]["verdict"] = "PASS"
    stage.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    problems = verify_run(run_with_foreign_stage)
    assert any("is not the document the serving stage wrote" in p for p in problems), problems
    stage.unlink()
    problems = verify_run(run_with_foreign_stage)
    assert problems == ["serving/summary.json is missing: the run had a serving stage, whose document its report summarizes"]


def test_junit_has_one_case_per_serving_configuration_and_fails_the_failing_one(fp16_subset_run, tmp_path):
    import xmlschema

    from precision.report.junit import write_junit

    document = _stage("fail")
    comparison = read_result_json(fp16_subset_run / "comparison.json")
    path = tmp_path / "junit.xml"
    write_junit(path, judge(comparison), serving=document, timestamp=comparison["created_at"])
    xmlschema.XMLSchema(str(Path(__file__).parents[1] / "data" / "junit.xsd")).validate(str(path))
    text = path.read_text(encoding="utf-8")
    suite = text[text.index('<testsuite name="precision-check.serving"'):]
    assert 'tests="3" failures="1"' in suite
    for row in document["configurations"]:
        assert f'classname="serving.{row["name"]}" name="parity"' in suite
    failure = suite[suite.index('classname="serving.kvfp8"'):]
    assert "<failure" in failure.split("</testcase>")[0] and "bisection: setting kv_cache_dtype='fp8' alone" in failure.split("</testcase>")[0]
