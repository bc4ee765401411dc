"""One real parity run on vLLM's CPU build with stories260K (slow: one engine per configuration and per bisection
trial): benign serving configurations PASS with the evidence that they really served the sequence their way (several
prefill steps, a shared step, positions from the prefix cache), and a configuration that changes the numerics FAILs
with bisection naming the setting responsible. Every figure asserted was measured by this run."""

from __future__ import annotations

import json

import pytest

from tests.conftest import requires_vllm

pytestmark = [requires_vllm, pytest.mark.slow]

CONFIGURATIONS = [
    "chunked:max_num_batched_tokens=8,enable_chunked_prefill=true",
    "cobatch:workload=cobatch,companions=7",
    "warm:workload=warm-prefix,block_size=32",
    # Two changed settings, one of which changes the numerics: bisection must name that one alone.
    "kvfp8:kv_cache_dtype=fp8,max_num_seqs=4",
]


@pytest.fixture(scope="module")
def parity_run(stories_path, short_prompts, tmp_path_factory):
    from precision.cli import main

    out = tmp_path_factory.mktemp("parity") / "out"
    argv = ["-q", "parity", "--model", str(stories_path), "--prompts", str(short_prompts), "--max-new-tokens", "8", "--out", str(out)]
    for spec in CONFIGURATIONS:
        argv += ["--serving", spec]
    code = main(argv)
    document = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    return code, out, {row["name"]: row for row in document["configurations"]}, document


def test_parity_fails_the_run_on_the_numerics_changing_configuration(parity_run):
    code, out, rows, document = parity_run
    assert document["status"] == "FAIL" and code == 1
    assert (out / "report.html").is_file() and (out / "summary.md").is_file()
    markdown = (out / "summary.md").read_text(encoding="utf-8")
    assert "## Serving configurations" in markdown and "kvfp8" in markdown


def test_chunked_prefill_passes_and_took_several_steps(parity_run):
    row = parity_run[2]["chunked"]
    assert row["verdict"] == "PASS" and row["level"] == "layers"
    assert min(row["evidence"]["steps_per_sequence"]) > 1  # the sequence really was prefilled in chunks


def test_cobatching_passes_and_shared_steps(parity_run):
    row = parity_run[2]["cobatch"]
    assert row["verdict"] == "PASS" and row["level"] == "layers"
    assert row["evidence"]["largest_shared_step"] == 8  # the sequence and its 7 companions prefilled in one step
    assert len(row["evidence"]["companion_lengths"]) == 7


def test_warm_prefix_cache_passes_with_positions_from_the_cache(parity_run):
    row = parity_run[2]["warm"]
    assert row["verdict"] == "PASS" and row["level"] == "layers"
    # Blocks of 32: the chat prompt's sequence (38 tokens) hits one full block; the engine's own count agrees.
    assert row["evidence"]["positions_from_cache"] == max(row["evidence"]["cached_tokens_reported"]) > 0
    groups = row["invariance"]["sites"][0]
    assert groups["cached"]["rows"] > 0 and groups["computed"]["rows"] > 0


def test_fp8_kv_cache_fails_and_bisection_names_it(parity_run):
    row = parity_run[2]["kvfp8"]
    assert row["verdict"] == "FAIL"
    assert row["first_bitwise_site"] is not None
    bisection = row["bisection"]
    assert bisection["responsible"] == {"kv_cache_dtype": "fp8"}
    assert "kv_cache_dtype" in bisection["sentence"]
