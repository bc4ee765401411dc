"""``run --config run.toml`` with a [serving.NAME] table, end to end on vLLM's CPU build with stories260K (slow: one
run with a vLLM target and its serving stage, then the stage again on the same run's captures with a configuration
that changes the numerics, and two resumes of a copy of the run).

One run shows the stage runs, writes RUN/serving/ with its report, prints its line and exits 0 on a benign
configuration (chunked prefill), and that the run's own engine argument reached the configuration's engine. The
failing configuration (an FP8 KV cache) is checked on the same run's captures through the stage itself instead of a
second run: the CPU side and the baseline are what they would be, and only the stage's engines run again; the
command's exit code for a failing stage is then checked with that real document in place of a run."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from precision.cli import main
from tests.conftest import SHORT_PROMPTS, requires_vllm, write_prompts

pytestmark = [requires_vllm, pytest.mark.slow]

RUN_TOML = """\
[run]
prompts = "prompts/short.jsonl"
model = "{model}"
out = "runs/served"
target = "vllm"
max_new_tokens = 8
repeats = 1
replay = false

[run.engine_args]
disable_log_stats = false          # not the capture backend's default: seen in the configuration's engine, it came from here

[serving.chunked]
max_num_batched_tokens = {chunk}
enable_chunked_prefill = true
"""


def _main(argv: list[str]) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(argv)
    return code, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def served(stories_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    (root / "prompts").mkdir()
    write_prompts(root / "prompts" / "short.jsonl", SHORT_PROMPTS)
    config = root / "run.toml"
    config.write_text(RUN_TOML.format(model=stories_path, chunk=8), encoding="utf-8")
    code, stdout, stderr = _main(["-q", "run", "--config", str(config)])
    return SimpleNamespace(root=root, config=config, out=root / "runs" / "served", code=code, stdout=stdout, stderr=stderr)


def _document(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_the_run_runs_its_serving_stage_and_exits_0_on_a_benign_configuration(served):
    assert served.code == 0, served.stderr[-3000:]
    stage = served.out / "serving"
    assert f"serving configurations: PASS ({stage / 'summary.md'})" in served.stdout
    document = _document(stage / "summary.json")
    assert document["status"] == "PASS"
    assert document["baseline"]["capture"] == str(served.out / "captures" / "target")  # the run's own target is the baseline
    (row,) = document["configurations"]
    assert (row["name"], row["verdict"], row["level"]) == ("chunked", "PASS", "layers")
    assert min(row["evidence"]["steps_per_sequence"]) > 1  # really prefilled in chunks of 8
    assert (stage / "report.html").is_file() and "chunked" in (stage / "summary.md").read_text(encoding="utf-8")
    assert (stage / "configuration-chunked" / "comparison.json").is_file()
    assert _document(served.out / "summary.json")["verdict"]["status"] in ("PASS", "WARN")  # the run's own report is there too


def test_the_runs_own_summaries_carry_the_serving_section(served):
    """RUN/summary.json, summary.md and report.html say what the stage found, every figure the stage document's."""
    import hashlib

    summary = _document(served.out / "summary.json")
    stage_bytes = (served.out / "serving" / "summary.json").read_bytes()
    stage = json.loads(stage_bytes)
    section = summary["serving"]
    assert section["status"] == stage["status"] == "PASS"
    assert section["overall_status"] == summary["verdict"]["status"]  # a passing stage leaves the outcome the comparison's
    assert (section["summary"], section["report"]) == ("serving/summary.json", "serving/report.html")
    assert section["summary_sha256"] == hashlib.sha256(stage_bytes).hexdigest()  # the file as the stage wrote it
    (entry,), (row,) = section["configurations"], stage["configurations"]
    assert (entry["name"], entry["verdict"], entry["level"]) == ("chunked", row["verdict"], row["level"])
    assert (entry["largest_value"], entry["largest_site"]) == (row["largest"]["relative_l2"], row["largest"]["site"])
    assert entry["first_differing_site"] == row["first_bitwise_site"] and entry["bitwise_identical"] == row["bitwise_identical"]
    assert entry["comparison"] == "serving/configuration-chunked/comparison.json" and (served.out / entry["comparison"]).is_file()
    markdown = (served.out / "summary.md").read_text(encoding="utf-8")
    assert f"**Overall: {summary['verdict']['status']}.**" in markdown and "### Serving configurations: PASS" in markdown
    assert "| chunked |" in markdown and "[serving/report.html](serving/report.html)" in markdown
    html = (served.out / "report.html").read_text(encoding="utf-8")
    assert '<section id="serving">' in html and '<a href="serving/report.html">' in html


def test_verify_passes_on_the_run_with_its_stage_and_fails_when_the_stage_document_is_edited(served):
    copy = served.root / "verified"
    shutil.copytree(served.out, copy, ignore=shutil.ignore_patterns(".precision-check.lock"))
    code, stdout, _ = _main(["verify", str(copy)])
    assert code == 0, stdout[-3000:]
    assert "serving stage's configurations were not captured again" in stdout  # what verify cannot recompute, said
    comparison_path = copy / "serving" / "configuration-chunked" / "comparison.json"
    stored = comparison_path.read_bytes()
    comparison = json.loads(stored)
    comparison["sites"][0]["relative_l2"] = 0.5  # the configuration's own comparison no longer gives its row
    comparison_path.write_text(json.dumps(comparison, indent=1) + "\n", encoding="utf-8")
    code, stdout, _ = _main(["verify", str(copy)])
    assert code == 1 and "is 0.5 in serving/configuration-chunked/comparison.json, the captures give" in stdout, stdout[-3000:]
    comparison_path.write_bytes(stored)
    report = copy / "serving" / "configuration-chunked" / "summary.md"
    kept = report.read_bytes()
    report.write_bytes(kept.replace(b"PASS", b"FAIL"))
    code, stdout, _ = _main(["verify", str(copy)])
    assert code == 1 and "MISMATCH: serving/configuration-chunked/summary.md differs from what its comparison renders to" in stdout
    report.write_bytes(kept)
    stage = copy / "serving" / "summary.json"
    document = _document(stage)
    document["configurations"][0]["verdict"] = "FAIL" if document["configurations"][0]["verdict"] != "FAIL" else "PASS"
    stage.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    code, stdout, _ = _main(["verify", str(copy)])
    assert code == 1 and "MISMATCH: serving/summary.json" in stdout and "not the document the serving stage wrote" in stdout
    stage.unlink()
    code, stdout, _ = _main(["verify", str(copy)])
    assert code == 1 and "serving/summary.json is missing" in stdout


def test_report_renders_the_run_again_with_its_serving_section(served):
    """precision-check report RUN re-renders the run's own files with their serving section (summary.json and
    summary.md the same bytes; report.html differs only in the command it names as its producer); without the
    stage document the re-render is refused, naming it."""
    copy = served.root / "rerendered"
    shutil.copytree(served.out, copy, ignore=shutil.ignore_patterns(".precision-check.lock"))
    before = {name: (copy / name).read_bytes() for name in ("summary.json", "summary.md")}
    code, stdout, stderr = _main(["-q", "report", str(copy)])
    assert code == 0, stderr[-2000:]
    assert {name: (copy / name).read_bytes() for name in before} == before
    html = (copy / "report.html").read_text(encoding="utf-8")
    assert '<section id="serving">' in html and "precision-check -q report" in html
    (copy / "serving" / "summary.json").unlink()
    code, _, stderr = _main(["-q", "report", str(copy)])
    assert code == 2 and "serving/summary.json is missing" in stderr


def test_verify_computes_the_stage_rows_again_from_their_captures(served):
    """A forgery consistent across the stage document and the run's report (the sha256 recorded anew) is caught by
    computing the configuration's row again from its stored capture, as is a capture whose tensors were changed."""
    from precision.analysis.verdict import judge
    from precision.io import write_json_atomic
    from precision.report import write_report

    copy = served.root / "forged"
    shutil.copytree(served.out, copy, ignore=shutil.ignore_patterns(".precision-check.lock"))
    document = _document(copy / "serving" / "summary.json")
    document["configurations"][0]["largest"]["relative_l2"] = 0.0123
    write_json_atomic(copy / "serving" / "summary.json", document)
    comparison = _document(copy / "comparison.json")
    write_report(copy, comparison, judge(comparison), command=_document(copy / "run.json")["command"], serving=document)
    code, stdout, _ = _main(["verify", str(copy)])
    assert code == 1, stdout[-3000:]
    assert "MISMATCH: configurations[0] (chunked).largest.relative_l2 is 0.0123 in serving/summary.json, the captures give" in stdout
    tensors = sorted((served.out / "serving" / "captures" / "serving-chunked").rglob("*.safetensors"))
    changed = copy / tensors[0].relative_to(served.out)
    data = bytearray(changed.read_bytes())
    data[-1] ^= 1
    changed.write_bytes(bytes(data))
    code, stdout, _ = _main(["verify", str(copy)])
    assert code == 1 and f"{changed}: sha256" in stdout and "differs from the manifest's" in stdout


def test_run_json_records_the_serving_tables(served):
    run = _document(served.out / "run.json")
    assert run["serving"] == {"chunked": {"max_num_batched_tokens": 8, "enable_chunked_prefill": True}}
    assert run["engine_args"] == {"disable_log_stats": False}


def test_the_runs_engine_argument_reached_the_configurations_engine(served):
    recorded = _document(served.out / "serving" / "run.json")["engine_kwargs"]["chunked"]
    assert recorded["disable_log_stats"] is False and recorded["max_num_batched_tokens"] == 8
    # What the engine was started with (its capture's manifest), and the baseline's: the same run setting in both.
    engine = _document(served.out / "serving" / "captures" / "serving-chunked" / "manifest.json")["backend"]["settings"]
    target = _document(served.out / "captures" / "target" / "manifest.json")["backend"]["settings"]
    assert engine["disable_log_stats"] is False and target["disable_log_stats"] is False
    assert engine["max_model_len"] == target["max_model_len"]
    assert (engine["max_num_batched_tokens"], engine["enable_chunked_prefill"]) == (8, True)


@pytest.fixture(scope="module")
def failing_stage(served, tmp_path_factory):
    """The stage with an FP8 KV cache table, on the finished run's CPU side and target capture."""
    from precision.analysis.envelope import envelope_prompt_ids
    from precision.backends import BackendOptions
    from precision.capture.reader import CaptureReader
    from precision.model import inspect_model
    from precision.reference_side import CpuSide
    from precision.run_file import load_run_config
    from precision.serving.run_stage import run_serving_stage

    config = dataclasses.replace(load_run_config(served.config), serving={"kvfp8": {"kv_cache_dtype": "fp8"}}, show_progress=False)
    captures = served.out / "captures"
    reference = CaptureReader(captures / "reference")
    members = {path.name: CaptureReader(path) for path in sorted((captures / "envelope").iterdir())}
    cpu = CpuSide(reference, CaptureReader(captures / "truth"), members, envelope_prompt_ids(reference))
    out = tmp_path_factory.mktemp("failing") / "serving"
    model = inspect_model(config.model)
    document = run_serving_stage(config, model, BackendOptions(engine_args=config.engine_args), cpu, CaptureReader(captures / "target"), out)
    return SimpleNamespace(document=document, out=out)


def test_an_fp8_kv_cache_configuration_fails_the_stage_and_bisection_names_it(failing_stage):
    document = failing_stage.document
    assert document["status"] == "FAIL"
    (row,) = document["configurations"]
    assert row["verdict"] == "FAIL" and row["first_bitwise_site"] is not None
    assert row["bisection"]["responsible"] == {"kv_cache_dtype": "fp8"}
    assert _document(failing_stage.out / "run.json")["engine_kwargs"]["kvfp8"]["disable_log_stats"] is False


def test_the_runs_report_with_a_failing_stage_says_fail_overall(served, failing_stage, tmp_path):
    """The run's report rendered with the real failing stage document: its comparison still passes, the outcome fails."""
    from precision.analysis.verdict import judge
    from precision.report import write_report

    comparison = _document(served.out / "comparison.json")
    verdict = judge(comparison)
    write_report(tmp_path, comparison, verdict, serving=failing_stage.document)
    summary = _document(tmp_path / "summary.json")
    assert summary["verdict"]["status"] == verdict.status.value != "FAIL"
    assert (summary["serving"]["status"], summary["serving"]["overall_status"]) == ("FAIL", "FAIL")
    (entry,) = summary["serving"]["configurations"]
    assert entry["responsible"] == {"kv_cache_dtype": "fp8"} and entry["first_differing_site"] == failing_stage.document["configurations"][0]["first_bitwise_site"]
    assert "**Overall: FAIL.**" in (tmp_path / "summary.md").read_text(encoding="utf-8")


def test_a_failing_stage_makes_run_exit_1(served, failing_stage, monkeypatch):
    import precision
    from precision.analysis.verdict import judge
    from precision.pipeline import RunResult

    comparison = _document(served.out / "comparison.json")
    verdict = judge(comparison)
    assert verdict.status.value != "FAIL"  # the run itself passes: only the stage can make this exit 1
    result = RunResult(out=served.out, verdict=verdict, comparison=comparison, files={}, serving=failing_stage.document)
    monkeypatch.setattr(precision, "run", lambda config, junit=None: result)
    code, stdout, _ = _main(["-q", "run", "--config", str(served.config)])
    assert code == 1
    assert "serving configurations: FAIL" in stdout


def _interrupted_copy(served, name: str) -> Path:
    """A copy of the run as if it had stopped before its report (summary.json is written last)."""
    copy = served.root / name
    shutil.copytree(served.out, copy, ignore=shutil.ignore_patterns(".precision-check.lock"))
    os.remove(copy / "summary.json")
    return copy


def test_resume_with_changed_serving_tables_is_refused(served, stories_path):
    copy = _interrupted_copy(served, "changed")
    changed = served.root / "changed.toml"
    changed.write_text(RUN_TOML.format(model=stories_path, chunk=16), encoding="utf-8")
    before = (copy / "run.json").read_bytes()
    code, _, stderr = _main(["-q", "run", "--config", str(changed), "--out", str(copy), "--resume"])
    assert code == 2
    assert "other [serving.NAME] tables" in stderr and "'max_num_batched_tokens': 8" in stderr and "--force" in stderr
    assert (copy / "run.json").read_bytes() == before and not (copy / "summary.json").exists()


def test_resume_with_the_same_serving_tables_continues_and_runs_the_stage_again(served):
    copy = _interrupted_copy(served, "same")
    os.remove(copy / "serving" / "summary.json")
    code, stdout, stderr = _main(["-q", "run", "--config", str(served.config), "--out", str(copy), "--resume"])
    assert code == 0, stderr[-3000:]
    assert f"serving configurations: PASS ({copy / 'serving' / 'summary.md'})" in stdout
    assert _document(copy / "serving" / "summary.json")["baseline"]["capture"] == str(copy / "captures" / "target")
    assert (copy / "summary.json").is_file()
