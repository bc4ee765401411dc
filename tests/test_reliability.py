"""Reliability: interrupted captures, resumes, full disks, long contexts, mismatched models, and no pickle."""

from __future__ import annotations

import ast

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from precision.capture.reader import CaptureReader
from precision.cli import main
from precision.errors import CaptureFormatError
from tests.conftest import GOLDEN, REPO, write_prompts


def _prompts(tmp_path: Path, count: int) -> Path:
    lines = [json.dumps({"id": f"p{i}", "category": "c", "text": f"Once upon a time there was a dog number {i}."}) for i in range(count)]
    return write_prompts(tmp_path / "many.jsonl", lines)


def test_kill_9_leaves_nothing_complete_and_resume_finishes(stories_path, tmp_path):
    prompts = _prompts(tmp_path, 40)
    out = tmp_path / "cap"
    cmd = [sys.executable, "-m", "precision", "-q", "capture", "--backend", "hf:cpu:bf16", "--model", str(stories_path),
           "--prompts", str(prompts), "--max-new-tokens", "24", "--out", str(out)]
    process = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = out / "progress.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not progress.exists() or len(progress.read_text().splitlines()) < 4):
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "manifest.json").exists(), "the capture finished before it could be interrupted"
    with pytest.raises(CaptureFormatError, match="incomplete.*--resume"):
        CaptureReader(out)
    assert main(["-q", "capture", "--backend", "hf:cpu:bf16", "--model", str(stories_path), "--prompts", str(prompts),
                 "--max-new-tokens", "24", "--out", str(out)]) == 2  # refuses to overwrite without --resume / --force
    assert main(["-q", "capture", "--backend", "hf:cpu:bf16", "--model", str(stories_path), "--prompts", str(prompts),
                 "--max-new-tokens", "24", "--out", str(out), "--resume"]) == 0
    resumed = CaptureReader(out)
    fresh_dir = tmp_path / "fresh"
    assert main(["-q", "capture", "--backend", "hf:cpu:bf16", "--model", str(stories_path), "--prompts", str(prompts),
                 "--max-new-tokens", "24", "--out", str(fresh_dir)]) == 0
    fresh = CaptureReader(fresh_dir)
    assert [r.sha256 for r in resumed.prompts] == [r.sha256 for r in fresh.prompts]
    assert not list(out.glob("tensors/.*tmp"))


def test_full_disk_is_a_clear_error_and_leaves_no_complete_capture(stories_path, short_prompts, tmp_path, monkeypatch, capsys):
    import precision.capture.writer as writer

    real_replace = os.replace

    def full_disk(src, dst):
        if str(dst).endswith("0001.safetensors"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(writer.os, "replace", full_disk)
    out = tmp_path / "cap"
    assert main(["capture", "--backend", "hf:cpu:bf16", "--model", str(stories_path), "--prompts", str(short_prompts),
                 "--max-new-tokens", "4", "--out", str(out)]) == 2
    assert "disk full" in capsys.readouterr().err
    assert not (out / "manifest.json").exists()
    assert not list(out.glob("tensors/.*tmp"))


def test_unwritable_output_path(stories_path, short_prompts, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main(["capture", "--backend", "hf:cpu:bf16", "--model", str(stories_path), "--prompts", str(short_prompts),
                 "--out", str(blocker / "cap")]) == 2
    assert str(blocker) in capsys.readouterr().err


def test_unreadable_model_directory(short_prompts, tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{not json")
    assert main(["capture", "--backend", "hf:cpu:bf16", "--model", str(model), "--prompts", str(short_prompts), "--out", str(tmp_path / "o")]) == 2
    assert "config.json" in capsys.readouterr().err


def test_pickle_checkpoints_are_refused(short_prompts, stories_path, tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text((stories_path / "config.json").read_text())
    (model / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    assert main(["capture", "--backend", "hf:cpu:bf16", "--model", str(model), "--prompts", str(short_prompts), "--out", str(tmp_path / "o")]) == 2
    assert "pickle" in capsys.readouterr().err


def test_captures_of_different_models_are_refused(stories_path, builtin_path, short_prompts, tmp_path, capsys):
    for name, model in (("a", stories_path), ("b", builtin_path)):
        assert main(["-q", "capture", "--backend", "hf:cpu:bf16", "--model", str(model), "--prompts", str(short_prompts),
                     "--max-new-tokens", "4", "--out", str(tmp_path / name)]) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "c")]) == 2
    assert "different models" in capsys.readouterr().err


def test_long_context_on_the_builtin_model_with_position_subsampling(builtin_path, tmp_path):
    """The golden long-context prompt (about 13,500 tokens with the built-in byte-level tokenizer), captured every
    64th position and compared, in bounded memory."""
    out = tmp_path / "long"
    code = main(["-q", "run", "--prompts", str(GOLDEN / "long-context.jsonl"), "--model", str(builtin_path), "--target", "hf:cpu:fp16",
                 "--positions", "every:64", "--envelope", "none", "--no-replay", "--repeats", "1", "--out", str(out)])
    assert code == 0
    comparison = json.loads((out / "comparison.json").read_text())
    prompt = comparison["prompts"][0]
    assert prompt["prompt_tokens"] > 8000
    assert prompt["positions"] == len(range(0, prompt["forced_tokens"], 64)) + (1 if (prompt["forced_tokens"] - 1) % 64 else 0)
    assert comparison["analysis"]["local"]["available"] is False and "every position" in comparison["analysis"]["local"]["reason"]


def _torch_load_calls(path: Path) -> list[ast.Call]:
    return [node for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"]


def test_no_pickle_and_no_remote_code_by_default():
    """Never unpickle: no pickle at all, and torch.load only with weights_only=True (msprobe's .pt dumps are read
    that way, which refuses code)."""
    files = sorted((REPO / "precision").rglob("*.py"))
    source = "\n".join(p.read_text() for p in files)
    assert not re.search(r"import pickle|pickle\.loads?\(", source)
    for path in files:
        for call in _torch_load_calls(path):
            weights_only = [k for k in call.keywords if k.arg == "weights_only"]
            assert weights_only and isinstance(weights_only[0].value, ast.Constant) and weights_only[0].value.value is True, \
                f"{path.relative_to(REPO)}:{call.lineno}: torch.load without weights_only=True"
    assert _torch_load_calls(REPO / "precision" / "interop" / "msprobe_dump.py")  # the check above has something to check
    assert "trust_remote_code=True" not in source
    from precision.backends.base import BackendOptions

    assert BackendOptions().trust_remote_code is False
