"""The CLI end to end: through main(argv) and as a subprocess; exit codes 0 / 1 / 2 with clear messages."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from precision.analysis.envelope import DEFAULT_MEMBERS as DEFAULT_ENVELOPE, member_name
from precision.cli import main
from tests.conftest import REPO, requires_vllm, write_prompts


@pytest.fixture(scope="module")
def run_dir(stories_path, short_prompts, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    code = main(["-q", "run", "--prompts", str(short_prompts), "--model", str(stories_path), "--target", "hf:cpu:fp16",
                 "--max-new-tokens", "8", "--out", str(out)])
    assert code == 0
    return out


def test_run_writes_every_artifact(run_dir):
    for name in ("report.html", "summary.md", "summary.json", "comparison.json", "run.json"):
        assert (run_dir / name).is_file(), name
    for role in ("reference", "truth", "target"):
        assert (run_dir / "captures" / role / "manifest.json").is_file()
    run = json.loads((run_dir / "run.json").read_text())
    assert (run["format"], run["schema_version"]) == ("precision-check-run", 1)
    assert (run["reference"], run["truth"]) == ("hf:cpu:bf16", "hf:cpu:fp32")


def test_report_numbers_are_the_comparison_numbers(run_dir):
    comparison = json.loads((run_dir / "comparison.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    html = (run_dir / "report.html").read_text()
    markdown = (run_dir / "summary.md").read_text()
    assert summary["sites"] == comparison["sites"]
    for site in comparison["sites"]:
        assert f"{site['relative_l2']:.3e}" in html
        assert f"{site['relative_l2']:.3e}" in markdown
        assert f"{site['R']:.2f}" in html
    for prompt in comparison["prompts"]:
        assert f"{prompt['logits']['kl_mean']:.3e}" in html


def test_help_imports_neither_torch_nor_vllm():
    code = "import sys; from precision.cli import main; main(['--help']); print('torch' in sys.modules, 'vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.stdout.strip().splitlines()[-1] == "False False"


def test_subprocess_compare_and_report_from_captures(run_dir, tmp_path):
    captures = run_dir / "captures"
    out = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "precision", "compare", str(captures / "reference"), str(captures / "target"), "--truth", str(captures / "truth"), "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    original = json.loads((run_dir / "comparison.json").read_text())
    again = json.loads((out / "comparison.json").read_text())
    assert again["sites"] == original["sites"]
    result = subprocess.run([sys.executable, "-m", "precision", "report", str(out)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "PASS" in result.stdout and (out / "report.html").is_file()


def test_failed_verdict_exits_1(run_dir, tmp_path):
    config = tmp_path / "strict.toml"
    config.write_text("[thresholds]\nrel_l2_fail = 1e-6\n")
    out = tmp_path / "strict"
    assert main(["report", str(run_dir / "comparison.json"), "--out", str(out), "--config", str(config)]) == 1
    assert json.loads((out / "summary.json").read_text())["verdict"]["status"] == "FAIL"


def _bad(argv, capsys, *fragments):
    assert main(argv) == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_malformed_prompt_file_names_the_line(stories_path, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "bad.jsonl", ['{"id": "a", "category": "c", "text": "ok"}', '{"id": "b", "category": '])
    _bad(["run", "--prompts", str(prompts), "--model", str(stories_path), "--out", str(tmp_path / "o")], capsys, "bad.jsonl:2", "invalid JSON")
    assert not (tmp_path / "o").exists()


def test_unknown_backend_suggests_the_right_name(stories_path, short_prompts, tmp_path, capsys):
    _bad(["run", "--prompts", str(short_prompts), "--model", str(stories_path), "--target", "vlm", "--out", str(tmp_path / "o")], capsys, "unknown backend 'vlm'", "Did you mean 'vllm'")


def test_missing_model_directory(short_prompts, tmp_path, capsys):
    _bad(["run", "--prompts", str(short_prompts), "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")], capsys, "nowhere", "does not exist")


def test_prompt_too_long_for_the_model(stories_path, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "long.jsonl", [json.dumps({"id": "long", "category": "c", "text": "Once upon a time " * 300})])
    _bad(["run", "--prompts", str(prompts), "--model", str(stories_path), "--out", str(tmp_path / "o")], capsys, "too long", "context is 512", "skip_if_too_long")


def test_existing_run_is_not_overwritten(run_dir, stories_path, short_prompts, capsys):
    _bad(["run", "--prompts", str(short_prompts), "--model", str(stories_path), "--target", "hf:cpu:fp16", "--out", str(run_dir)], capsys, "--force")


def test_truncated_capture_is_refused(run_dir, tmp_path, capsys):
    broken = tmp_path / "target"
    shutil.copytree(run_dir / "captures" / "target", broken)
    tensor = broken / "tensors" / "0000.safetensors"
    tensor.write_bytes(tensor.read_bytes()[:-100])
    _bad(["compare", str(run_dir / "captures" / "reference"), str(broken), "--out", str(tmp_path / "c")], capsys, "truncated")
    assert not (tmp_path / "c" / "comparison.json").exists()


def test_mismatched_captures_are_refused(run_dir, stories_path, tmp_path, capsys):
    other_prompts = write_prompts(tmp_path / "other.jsonl", ['{"id": "story", "category": "raw", "text": "The dog ran to the park."}', '{"id": "chat", "category": "raw", "text": "A cat sat."}'])
    other = tmp_path / "other"
    assert main(["-q", "capture", "--backend", "hf:cpu:bf16", "--model", str(stories_path), "--prompts", str(other_prompts), "--max-new-tokens", "8", "--out", str(other)]) == 0
    capsys.readouterr()
    _bad(["compare", str(run_dir / "captures" / "reference"), str(other), "--out", str(tmp_path / "c")], capsys, "different token ids", "--teacher-forcing")


@requires_vllm
@pytest.mark.vllm
def test_main_job_on_stories260k_with_vllm_as_default_target(stories_path, tmp_path):
    """The issue's acceptance command, as a subprocess: vLLM is the default target when installed."""
    out = tmp_path / "r"
    cmd = [sys.executable, "-m", "precision", "-q", "run", "--prompts", str(REPO / "golden"), "--model", str(stories_path), "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["target"] == "vllm"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verdict"]["status"] == "PASS"
    assert [s["id"] for s in summary["skipped_prompts"]] == ["long-context-01"]  # 3,000+ tokens > 512
    # every layer explained: local errors within the implementation envelope, R near 1
    assert [f["rule"] for f in summary["verdict"]["findings"]] == ["explained"]
    analysis = json.loads((out / "comparison.json").read_text())["analysis"]
    assert analysis["local"]["available"] and analysis["envelope"]["members"] == [member_name(m) for m in DEFAULT_ENVELOPE]
    assert all(step["local_R"] < 1.5 for step in analysis["local"]["steps"])
    logits = next(s for s in summary["sites"] if s["site"] == "logits")
    assert 0.5 < logits["R"] < 1.5


def test_run_without_truth_envelope_or_replay(stories_path, short_prompts, tmp_path):
    out = tmp_path / "bare"
    assert main(["-q", "run", "--prompts", str(short_prompts), "--model", str(stories_path), "--target", "hf:cpu:fp16", "--truth", "none",
                 "--envelope", "none", "--no-replay", "--repeats", "1", "--max-new-tokens", "4", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["truth"] is None and all(site["R"] is None for site in summary["sites"])
    html = (out / "report.html").read_text()
    assert "No layer replay" in html and "Why do they differ?" in html
