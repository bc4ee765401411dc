"""Shared fixtures. Tests run the real thing: transformers, vLLM's CPU build, the real stories260K model."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Vendored (MIT, about 1 MB; see its LICENSE and PROVENANCE.md) so a fresh clone tests with nothing beside it.
STORIES = REPO / "tests" / "models" / "stories260K"
GOLDEN = REPO / "golden"

# Keep the built-in model and padded copies out of the user's cache unless CI chose a place.
os.environ.setdefault("PRECISION_CHECK_HOME", str(Path(tempfile.gettempdir()) / "precision-check-tests"))
# vLLM's CPU build: stable threading on small machines and an in-process engine (see vllm-facts).
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def stories_path() -> Path:
    if not (STORIES / "config.json").is_file():
        pytest.fail(f"{STORIES} is missing: the tests use the model vendored in the repository; restore it with "
                    f"`git checkout -- tests/models/stories260K`")
    return STORIES


@pytest.fixture(scope="session")
def builtin_path() -> Path:
    from precision.default_model import default_model_path

    return default_model_path()


def write_prompts(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


SHORT_PROMPTS = [
    '{"id": "story", "category": "raw", "text": "Once upon a time, there was a little girl named Lily."}',
    '{"id": "chat", "category": "chat", "messages": [{"role": "user", "content": "Tell me about a big red ball."}]}',
]


@pytest.fixture(scope="session")
def short_prompts(tmp_path_factory) -> Path:
    return write_prompts(tmp_path_factory.mktemp("prompts") / "short.jsonl", SHORT_PROMPTS)


@pytest.fixture(scope="session")
def stories(stories_path):
    from precision.model import inspect_model

    return inspect_model(stories_path)


@pytest.fixture(scope="session")
def stories_reference(stories, short_prompts, tmp_path_factory):
    """The BF16 reference capture of the short prompts on stories260K (8 new tokens), shared by every module
    that only reads it; modules that need other settings (repeats, selections) capture their own."""
    from precision.backends import create_backend
    from precision.capture.writer import capture
    from precision.planning import plan_from_prompts

    plan = plan_from_prompts(short_prompts, stories, max_new_tokens=8)
    return capture(create_backend("hf:cpu:bf16", stories), plan, tmp_path_factory.mktemp("shared") / "ref", show_progress=False)


@pytest.fixture(scope="session")
def stories_truth(stories, stories_reference, tmp_path_factory):
    """The FP32 truth of ``stories_reference``, teacher-forced."""
    from precision.backends import create_backend
    from precision.capture.writer import CapturePlan, capture

    return capture(create_backend("hf:cpu:fp32", stories), CapturePlan.following(stories_reference),
                   tmp_path_factory.mktemp("shared") / "truth", show_progress=False)


@pytest.fixture(scope="session")
def capture_pair(stories_path, tmp_path_factory):
    """A one-prompt BF16 reference and an FP16 target capture of it (4 new tokens), made through the CLI."""
    from precision.cli import main

    root = tmp_path_factory.mktemp("pair")
    prompts = write_prompts(root / "prompts.jsonl", [SHORT_PROMPTS[0]])
    common = ["-q", "capture", "--model", str(stories_path), "--max-new-tokens", "4"]
    assert main([*common, "--backend", "hf:cpu:bf16", "--prompts", str(prompts), "--out", str(root / "ref")]) == 0
    assert main([*common, "--backend", "hf:cpu:fp16", "--teacher-forcing", str(root / "ref"), "--out", str(root / "tgt")]) == 0
    return {"root": root, "prompts": prompts, "ref": root / "ref", "tgt": root / "tgt"}


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


# CI sets PRECISION_REQUIRE_VLLM=1, so a broken vLLM install fails the vLLM tests instead of skipping them.
requires_vllm = pytest.mark.skipif(
    not vllm_available() and os.environ.get("PRECISION_REQUIRE_VLLM") != "1",
    reason="vLLM's CPU build is not installed (scripts/install.sh installs it)",
)


# CI (the environment variable CI set, as .ci/run and CI services do) runs every test: a skip there fails the session
# unless a pattern here (fnmatch over the test id) names it, with the reason the skip is acceptable (tests/ci_policy.py).
CI_SKIP_ALLOWLIST: dict[str, str] = {}


def pytest_configure(config):
    from tests.ci_policy import register_skip_policy

    register_skip_policy(config, CI_SKIP_ALLOWLIST)


# Every document any test writes (in this process or a CLI subprocess) is listed here and, at the end of the session,
# validated against the published JSON Schemas in docs/schema/ (tests/schema_check.py).
# Test modules also import this file as tests.conftest, which runs it a second time under that name: the second run
# must keep the first one's log, or every document goes to a log nobody checks and the validation passes vacuously.
if "PRECISION_CHECK_DOCUMENT_LOG" not in os.environ:
    os.environ["PRECISION_CHECK_DOCUMENT_LOG"] = str(Path(tempfile.mkdtemp(prefix="precision-check-documents-")) / "written.txt")
DOCUMENT_LOG = Path(os.environ["PRECISION_CHECK_DOCUMENT_LOG"])


def pytest_sessionfinish(session, exitstatus):
    from tests.schema_check import check_logged_documents

    problems, counts = check_logged_documents(DOCUMENT_LOG)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and counts:
        reporter.ensure_newline()
        reporter.write_line("documents validated against docs/schema/: " + ", ".join(f"{n} {fmt}" for fmt, n in sorted(counts.items())))
    if problems:
        if reporter is not None:
            reporter.write_line("DOCUMENTS THAT DO NOT MATCH THE PUBLISHED SCHEMA:\n" + "\n".join(problems[:20]), red=True)
        session.exitstatus = 1
