"""Real runs of stories260K shared by the report tests (package scope: each is made once per test session).

- ``run_dir``: the default run (FP32 truth, implementation envelope, layer replay, repeats), a transformers target
  with eager attention, and a hostile category (HTML and script) for the browser test.
- ``fp16_no_envelope_run``: a transformers FP16 target with ``--envelope none`` (truth and replay kept).
- ``fp16_subset_run``: ``--envelope none --layers 0,2 --truth none`` (so no replay either), with hostile categories,
  Markdown-special ids and a model directory whose name holds Markdown and HTML.
"""

from __future__ import annotations

import json
import shutil

import pytest

from precision.cli import main
from tests.conftest import SHORT_PROMPTS, write_prompts

HOSTILE_CATEGORY = "<b>bold</b><script>document.title='PWNED'</script>"
HOSTILE_SUMMARY_CATEGORIES = ("<script>alert(1)</script>", "a|b **x** `y` [l](http://e) _u_ &amp; ~s~\nsecond line")
HOSTILE_SUMMARY_IDS = ("__bold__", "a.b-c")
HOSTILE_MODEL_DIR = "m|d <i>x</i> **y** `z` [w](u) _v_ &amp;"


@pytest.fixture(scope="package")
def run_dir(stories_path, tmp_path_factory):
    prompts = write_prompts(tmp_path_factory.mktemp("rp") / "hostile.jsonl", [
        json.dumps({"id": "hostile", "category": HOSTILE_CATEGORY, "text": "Lily said <img src=x onerror=\"document.title='PWNED2'\"> & </pre> hello"}),
        json.dumps({"id": "plain", "category": "story", "messages": [{"role": "user", "content": "Tell me a story about a cat."}]}),
    ])
    out = tmp_path_factory.mktemp("rp") / "run"
    assert main(["-q", "run", "--prompts", str(prompts), "--model", str(stories_path), "--target", "hf:cpu:bf16",
                 "--target-variant", "attn:eager", "--max-new-tokens", "8", "--out", str(out)]) == 0
    return out


def _fp16_run(model, prompts, out, *flags: str):
    """A real run; its exit code is the verdict's (0 or 1), which these tests do not judge: they read what it wrote."""
    code = main(["-q", "run", "--prompts", str(prompts), "--model", str(model), "--target", "hf:cpu:fp16",
                 "--max-new-tokens", "8", "--out", str(out), *flags])
    assert code in (0, 1) and (out / "comparison.json").is_file() and (out / "summary.md").is_file()
    return out


@pytest.fixture(scope="package")
def fp16_no_envelope_run(stories_path, short_prompts, tmp_path_factory):
    return _fp16_run(stories_path, short_prompts, tmp_path_factory.mktemp("fp16") / "run", "--envelope", "none", "--repeats", "2")


@pytest.fixture(scope="package")
def fp16_subset_run(stories_path, tmp_path_factory):
    base = tmp_path_factory.mktemp("fp16-subset")
    model = base / HOSTILE_MODEL_DIR
    shutil.copytree(stories_path, model)
    lines = [json.dumps({"id": i, "category": c, **{k: v for k, v in json.loads(p).items() if k not in ("id", "category")}})
             for i, c, p in zip(HOSTILE_SUMMARY_IDS, HOSTILE_SUMMARY_CATEGORIES, SHORT_PROMPTS)]
    prompts = write_prompts(base / "hostile.jsonl", lines)
    return _fp16_run(model, prompts, base / "run", "--envelope", "none", "--layers", "0,2", "--truth", "none", "--repeats", "1")


@pytest.fixture(scope="package")
def nan_fault_run(stories_path, short_prompts, tmp_path_factory):
    """A target with a NaN planted in layer 1 at position 3 (precision.backends.variants), bare otherwise."""
    return _bare_fault_run(stories_path, short_prompts, tmp_path_factory.mktemp("nan") / "run", "fault:nan:1:3")


@pytest.fixture(scope="package")
def logit_bias_run(stories_path, short_prompts, tmp_path_factory):
    """A target whose lm_head adds 30 to token 400's logit: every position flips to it (real flips)."""
    return _bare_fault_run(stories_path, short_prompts, tmp_path_factory.mktemp("bias") / "run", "fault:logit-bias:400:30")


def _bare_fault_run(model, prompts, out, variant: str):
    assert main(["-q", "run", "--prompts", str(prompts), "--model", str(model), "--target", "hf:cpu:bf16", "--target-variant", variant,
                 "--truth", "none", "--envelope", "none", "--no-replay", "--repeats", "1", "--max-new-tokens", "4", "--out", str(out)]) == 1
    return out
