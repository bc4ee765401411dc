"""The vLLM target's performance record (precision.backends.vllm_performance) on real vLLM CPU captures of
stories260K, and its "Performance (not precision)" section in report.html and summary.md, with and without it."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from precision.backends.vllm_performance import DEFINITIONS, SOURCE_METRICS, SOURCE_WALL_CLOCK
from precision.cli import main
from precision.contract.performance import prompt_digest
from precision.report.performance import NOT_MEASURED
from tests.conftest import requires_vllm


def _vllm_capture(stories, stories_reference, out, engine_args=None):
    from precision.backends import BackendOptions, create_backend
    from precision.capture.writer import CapturePlan, capture

    backend = create_backend("vllm", stories, BackendOptions(engine_args=engine_args or {}))
    return capture(backend, CapturePlan.following(stories_reference), out, show_progress=False)


@pytest.fixture(scope="module")
def vllm_target(stories, stories_reference, tmp_path_factory):
    return _vllm_capture(stories, stories_reference, tmp_path_factory.mktemp("perf") / "vllm")


def _report(reference, target, out) -> tuple[str, str]:
    assert main(["-q", "compare", str(reference), str(target), "--out", str(out)]) == 0
    assert main(["-q", "report", str(out)]) in (0, 1)  # the verdict is not what these tests judge
    return (out / "summary.md").read_text(encoding="utf-8"), (out / "report.html").read_text(encoding="utf-8")


@requires_vllm
@pytest.mark.vllm
def test_vllm_capture_records_its_performance_with_definitions(vllm_target, stories_reference):
    record = vllm_target.manifest["backend"]["performance"]  # the reader checked it against the typed contract
    assert record["definitions"] == DEFINITIONS and "hooks removed" in record["method"]
    assert len(record["prompts"]) == len(vllm_target.prompts) == len(stories_reference.prompts)
    for timing, prompt in zip(record["prompts"], vllm_target.prompts):
        assert timing["prompt_sha256"] == prompt_digest(prompt.prompt_ids)
        assert timing["prompt_tokens"] == len(prompt.prompt_ids) and timing["new_tokens"] == len(prompt.continuation_ids)
        # vLLM's offline LLM keeps no request metrics unless asked (disable_log_stats defaults to True there).
        assert timing["source"] == SOURCE_WALL_CLOCK
        assert 0 < timing["ttft_s"] < 600
        assert timing["prefill_tokens_per_s"] == pytest.approx(timing["prompt_tokens"] / timing["ttft_s"])
        assert math.isfinite(timing["decode_tokens_per_s"]) and timing["decode_tokens_per_s"] > 0
    # The plain pass left the capture hooks in place: every layer was still captured afterwards.
    assert all(f"layer.{i}" in prompt.sites for prompt in vllm_target.prompts for i in range(vllm_target.num_layers))


@requires_vllm
@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_request_metrics_are_used_where_the_engine_keeps_them(stories, stories_reference, tmp_path):
    target = _vllm_capture(stories, stories_reference, tmp_path / "vllm", {"disable_log_stats": False})
    timings = target.manifest["backend"]["performance"]["prompts"]
    assert {t["source"] for t in timings} == {SOURCE_METRICS}
    for timing, prompt in zip(timings, target.prompts):
        assert timing["new_tokens"] == len(prompt.continuation_ids)
        assert 0 < timing["ttft_s"] < 600 and timing["prefill_tokens_per_s"] > 0 and timing["decode_tokens_per_s"] > 0


@requires_vllm
@pytest.mark.vllm
def test_report_shows_the_performance_table_from_the_target_manifest(vllm_target, stories_reference, tmp_path):
    summary, html = _report(stories_reference.path, vllm_target.path, tmp_path / "cmp")
    timings = vllm_target.manifest["backend"]["performance"]["prompts"]
    median_ttft = f"{1000 * statistics.median(t['ttft_s'] for t in timings):.1f}"
    pooled_prefill = f"{sum(t['prompt_tokens'] for t in timings) / sum(t['ttft_s'] for t in timings):.1f}"
    for text in (summary, html):
        assert "Performance (not precision)" in text and NOT_MEASURED not in text
        assert median_ttft in text and pooled_prefill in text
        assert "bfloat16" in text and "enforce" in text  # labelled with the engine settings
    all_row = next(line for line in summary.splitlines() if line.startswith("| all prompts |"))
    assert f"| {len(timings)} |" in all_row and median_ttft in all_row and pooled_prefill in all_row
    for category in {p.category for p in vllm_target.prompts}:
        assert any(line.startswith(f"| {category} |") for line in summary.splitlines())
    assert "time to first token" in summary and "(n - 1) / (t\\_n - t\\_1)" in summary
    assert html.index("Performance (not precision)") > html.index("Verdict")
    worker = vllm_target.manifest["backend"]["worker"]  # the preflight read in the engine's worker, shown beside the CPU side
    assert "engine worker (preflight" in html and f"worker_class={worker['engine']['worker_class']}" in html


def test_report_says_performance_was_not_measured_for_a_transformers_target(capture_pair, tmp_path):
    summary, html = _report(capture_pair["ref"], capture_pair["tgt"], tmp_path / "cmp")
    for text in (summary, html):
        assert "Performance (not precision)" in text and f"{NOT_MEASURED} (hf:cpu:fp16)" in text
        assert "TTFT (ms" not in text


def _summary_performance(out) -> dict:
    from precision.contract import load

    assert load(out / "summary.json").performance  # the typed document holds it (checked against the contract)
    return json.loads((out / "summary.json").read_text(encoding="utf-8"))["performance"]


@requires_vllm
@pytest.mark.vllm
def test_summary_json_holds_the_performance_section_with_its_definitions(vllm_target, stories_reference, tmp_path):
    """summary.json's performance: the report table's numbers, recomputed here from the manifest's timings."""
    _report(stories_reference.path, vllm_target.path, tmp_path / "cmp")
    performance = _summary_performance(tmp_path / "cmp")
    timings = vllm_target.manifest["backend"]["performance"]["prompts"]
    assert performance["measured"] is True and performance["reason"] is None
    assert performance["definitions"] == DEFINITIONS and "hooks removed" in performance["method"] and "bfloat16" in performance["label"]
    everything = performance["all_prompts"]
    assert everything["prompts"] == len(timings) and everything["category"] == "all prompts"
    assert everything["ttft_ms"] == pytest.approx(1000 * statistics.median(t["ttft_s"] for t in timings), rel=1e-12)
    assert everything["prefill_tokens_per_s"] == pytest.approx(sum(t["prompt_tokens"] for t in timings) / sum(t["ttft_s"] for t in timings), rel=1e-12)
    decode_seconds = sum((t["new_tokens"] - 1) / t["decode_tokens_per_s"] for t in timings)
    assert everything["decode_tokens_per_s"] == pytest.approx(sum(t["new_tokens"] - 1 for t in timings) / decode_seconds, rel=1e-12)
    assert {row["category"] for row in performance["categories"]} == {p.category for p in vllm_target.prompts}
    assert sum(row["prompts"] for row in performance["categories"]) == len(timings)


def test_summary_json_says_performance_was_not_measured_for_a_transformers_target(capture_pair, tmp_path):
    _report(capture_pair["ref"], capture_pair["tgt"], tmp_path / "cmp")
    performance = _summary_performance(tmp_path / "cmp")
    assert performance["measured"] is False and performance["reason"].startswith(f"{NOT_MEASURED} (hf:cpu:fp16)")
    assert (performance["categories"], performance["all_prompts"], performance["definitions"]) == ([], None, {})
