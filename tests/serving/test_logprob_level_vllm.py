"""The prompt-logprobs level on vLLM's CPU build with stories260K (slow: one engine per configuration and a
bisection trial): forced by the configuration's own key, a benign configuration (chunked prefill in 8-token chunks)
PASSes and an FP8 KV cache FAILs, with bisection at the same level naming the setting. Every figure asserted was
measured by this run."""

from __future__ import annotations

import json

import pytest

from tests.conftest import requires_vllm

pytestmark = [requires_vllm, pytest.mark.slow]

CONFIGURATIONS = [
    "chunkedlp:max_num_batched_tokens=8,enable_chunked_prefill=true,detail=prompt-logprobs",
    "fp8lp:kv_cache_dtype=fp8,detail=prompt-logprobs",
]


@pytest.fixture(scope="module")
def parity_run(stories_path, short_prompts, tmp_path_factory):
    from precision.cli import main

    out = tmp_path_factory.mktemp("parity-logprobs") / "out"
    argv = ["-q", "parity", "--model", str(stories_path), "--prompts", str(short_prompts), "--max-new-tokens", "8", "--out", str(out)]
    for spec in CONFIGURATIONS:
        argv += ["--serving", spec]
    code = main(argv)
    document = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    return code, out, {row["name"]: row for row in document["configurations"]}


def test_the_level_is_reported_with_its_reason(parity_run):
    code, out, rows = parity_run
    assert code == 1
    for row in rows.values():
        assert row["level"] == "prompt-logprobs" and row["level_reason"].startswith("forced by the configuration")
        assert row["evidence"]["top_k"] == 20 and row["logprob_level"]["positions"] > 0
    markdown = (out / "summary.md").read_text(encoding="utf-8")
    assert "n/a (logprobs only)" in markdown and "prompt-logprobs (forced by the configuration" in markdown


def test_chunked_prefill_passes_at_the_logprob_level(parity_run):
    row = parity_run[2]["chunkedlp"]
    assert row["verdict"] == "PASS", row["findings"]
    assert row["flips"]["real"] == 0
    assert row["envelope_ratio"]["ratio"] <= 2.0


def test_fp8_kv_cache_fails_at_the_logprob_level_and_bisection_names_it(parity_run):
    row = parity_run[2]["fp8lp"]
    assert row["verdict"] == "FAIL"
    assert row["R_topk"] > 1.5  # the r-topk rule fires (measured 6.7; chunked prefill 1.0)
    assert row["envelope_ratio"]["ratio"] > 2.0  # and the envelope rule (measured 3.3x; chunked prefill 1e-6x)
    bisection = row["bisection"]
    assert bisection["responsible"] == {"kv_cache_dtype": "fp8"}
    trials = bisection["trials"]
    assert trials[0]["from"] == "the configuration's own run"  # reused, not run again (known_to_fail)
    assert all(t.get("level") == "prompt-logprobs" for t in trials[1:])  # trials captured at the same level
