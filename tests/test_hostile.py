"""The hostile-input matrix: every bad input is one message and exit 2 (never a traceback, never exit 1), and no
command, with any flag, deletes, overwrites or mixes a directory precision-check did not create.

Each case builds its input inside a fresh ``tmp_path`` (with HOME and the working directory moved there, so the
protected-path cases can never touch the real ones), runs the CLI in-process, and asserts the exit code, a
fragment of the message, and that every decoy the case made is byte for byte unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from precision.cli import main
from tests.conftest import requires_vllm, write_prompts

@pytest.fixture(scope="module")
def world(stories_path, capture_pair):
    """The shared reference and FP16 target captures, their comparison and a run, made once for the module."""
    root, prompts = capture_pair["root"], capture_pair["prompts"]
    assert main(["-q", "compare", str(root / "ref"), str(root / "tgt"), "--out", str(root / "cmp")]) == 0
    assert main(["-q", "run", "--prompts", str(prompts), "--model", str(stories_path), "--target", "hf:cpu:fp16", "--truth", "none",
                 "--envelope", "none", "--no-replay", "--repeats", "1", "--max-new-tokens", "4", "--out", str(root / "run")]) == 0
    return {"root": root, "model": stories_path, "prompts": prompts, "ref": root / "ref", "tgt": root / "tgt", "cmp": root / "cmp", "run": root / "run"}


@dataclass
class Env:
    world: dict
    tmp: Path
    decoys: list[Path]

    def decoy(self, name: str = "decoy", *, forged_marker: bool = False) -> Path:
        """A directory of the user's own (optionally with a marker file the user forged); it must survive."""
        path = self.tmp / name
        path.mkdir(parents=True, exist_ok=True)
        (path / "thesis.tex").write_text("years of work")
        (path / "data").mkdir(exist_ok=True)
        (path / "data" / "table.csv").write_text("1,2,3")
        if forged_marker:
            (path / ".precision-check").write_text(json.dumps({"tool": "precision-check", "kind": "capture"}))
        self.decoys.append(path)
        return path

    def copy(self, key: str, name: str) -> Path:
        target = self.tmp / name
        shutil.copytree(self.world[key], target)
        return target

    def model_copy(self, name: str = "model") -> Path:
        target = self.tmp / name
        shutil.copytree(self.world["model"], target)
        return target

    def capture_args(self, out, *extra, backend="hf:cpu:bf16", model=None) -> list[str]:
        return ["-q", "capture", "--backend", backend, "--model", str(model or self.world["model"]), "--prompts", str(self.world["prompts"]),
                "--max-new-tokens", "4", "--out", str(out), *extra]

    def run_args(self, out, *extra, model=None) -> list[str]:
        return ["-q", "run", "--prompts", str(self.world["prompts"]), "--model", str(model or self.world["model"]), "--target", "hf:cpu:fp16",
                "--truth", "none", "--envelope", "none", "--no-replay", "--repeats", "1", "--max-new-tokens", "4", "--out", str(out), *extra]


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else b"<dir>") for p in sorted(path.rglob("*"))}


def _rewrite_tensor_file(capture: Path, build: Callable[[bytes], bytes]) -> None:
    """Replace prompt 0's tensor file with ``build(old bytes)`` and update the manifest's size and hash, so
    that only the file's content (not its bookkeeping) is hostile."""
    import hashlib

    path = capture / "tensors" / "0000.safetensors"
    data = build(path.read_bytes())
    path.write_bytes(data)
    manifest = json.loads((capture / "manifest.json").read_text())
    manifest["prompts"][0]["bytes"] = len(data)
    manifest["prompts"][0]["sha256"] = hashlib.sha256(data).hexdigest()
    (capture / "manifest.json").write_text(json.dumps(manifest))


def _with_header(data: bytes, header: bytes) -> bytes:
    length = struct.unpack("<Q", data[:8])[0]
    return struct.pack("<Q", len(header)) + header + data[8 + length:]


def _edit_header(capture: Path, edit: Callable[[dict], None]) -> None:
    def build(data: bytes) -> bytes:
        length = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8:8 + length])
        edit(header)
        return _with_header(data, json.dumps(header).encode().ljust(length))
    _rewrite_tensor_file(capture, build)


def _edit_manifest(capture: Path, edit: Callable[[dict], None]) -> None:
    manifest = json.loads((capture / "manifest.json").read_text())
    edit(manifest)
    (capture / "manifest.json").write_text(json.dumps(manifest))


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _fake_store(env: Env, store: dict | None) -> Path:
    path = env.tmp / "store"
    path.mkdir()
    (path / "store.json").write_text(json.dumps(store) if store is not None else "{}")
    return path


def _store_json(**overrides) -> dict:
    entry = {"dir": "captures/reference", "manifest_sha256": "0" * 64}
    store = {"format": "precision-check-golden", "schema_version": 1, "model": {}, "tokenizer": {}, "prompt_ids": [], "compact": {},
             "captures": {"reference": entry, "truth": {"dir": "captures/truth", "manifest_sha256": "0" * 64}, "envelope": {}}}
    store.update(overrides)
    return store


def _config_with(env: Env, **changes) -> Path:
    model = env.model_copy()
    config = json.loads((model / "config.json").read_text())
    config.update(changes)
    (model / "config.json").write_text(json.dumps(config))
    return model


def _chat_prompts(env: Env) -> Path:
    return write_prompts(env.tmp / "chat.jsonl", ['{"id": "c", "category": "chat", "messages": [{"role": "user", "content": "hi"}]}'])


def _sandboxed_template_model(env: Env) -> Path:
    model = env.model_copy()
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    return model


# (name, argv builder, expected exit code, message fragment). Every builder gets a fresh Env.
CASES: list[tuple[str, Callable[[Env], list[str]], int, str]] = [
    # -- data safety: --force, --resume and outputs on or around inputs --------------------------------------------------
    ("run --force into a user's directory", lambda e: e.run_args(e.decoy(), "--force"), 2, "did not create"),
    ("capture --force into a user's directory", lambda e: e.capture_args(e.decoy(), "--force"), 2, "did not create"),
    ("compare --force into a user's directory", lambda e: ["compare", str(e.world["ref"]), str(e.world["tgt"]), "--out", str(e.decoy()), "--force"], 2, "did not create"),
    ("golden create --force into a user's directory", lambda e: ["golden", "create", "--model", str(e.world["model"]), "--prompts", str(e.world["prompts"]), "--out", str(e.decoy()), "--force"], 2, "did not create"),
    ("selftest --force into a user's directory", lambda e: ["selftest", "--model", str(e.world["model"]), "--prompts", str(e.world["prompts"]), "--out", str(e.decoy()), "--force"], 2, "did not create"),
    ("plant-fault --force into a user's directory", lambda e: ["plant-fault", "--model", str(e.world["model"]), "--layer", "1", "--factor", "1.01", "--out", str(e.decoy()), "--force"], 2, "did not create"),
    ("report --out a user's directory", lambda e: ["report", str(e.world["cmp"]), "--out", str(e.decoy())], 2, "did not create"),
    ("regress --out a user's directory", lambda e: ["regress", str(e.world["run"]), str(e.world["run"]), "--out", str(e.decoy())], 2, "did not create"),
    ("a forged marker beside the user's files", lambda e: e.capture_args(e.decoy(forged_marker=True), "--force"), 2, "did not write"),
    ("capture --resume into a user's directory", lambda e: e.capture_args(e.decoy(), "--resume"), 2, "did not create"),
    ("run --resume into a user's directory", lambda e: e.run_args(e.decoy(), "--resume"), 2, "did not create"),
    ("--out a symlink to a user's directory, --force", lambda e: e.capture_args(_symlink(e.tmp / "link", e.decoy()), "--force"), 2, "did not create"),
    ("--out the model directory, --force", lambda e: e.capture_args(e.world["model"], "--force"), 2, "lies in the input"),
    ("--out inside the model directory", lambda e: e.capture_args(e.world["model"] / "captures", "--force"), 2, "lies in the input"),
    ("--out a parent of the model directory", lambda e: e.capture_args(e.world["model"].parent, "--force"), 2, "contains the input"),
    ("plant-fault --out the model directory", lambda e: ["plant-fault", "--model", str(e.world["model"]), "--layer", "1", "--factor", "1.01", "--out", str(e.world["model"])], 2, "lies in the input"),
    ("compare --out onto the reference capture", lambda e: ["compare", str(e.world["ref"]), str(e.world["tgt"]), "--out", str(e.world["ref"]), "--force"], 2, "lies in the input"),
    ("--out . --force", lambda e: e.capture_args(".", "--force"), 2, "working directory"),
    ("--out ~ --force", lambda e: e.capture_args("~", "--force"), 2, "home directory"),
    ("--out / --force", lambda e: e.capture_args("/", "--force"), 2, "filesystem root"),
    ("--out an existing file", lambda e: e.capture_args(_file(e.tmp / "notes.txt")), 2, "not a directory"),
    ("--out a capture of another kind (run into a capture)", lambda e: e.run_args(e.copy("ref", "refcopy"), "--force"), 2, "not a run"),
    # -- resumes that continue only what they started --------------------------------------------------------------------
    ("capture --resume with another model", lambda e: e.capture_args(_interrupted(e), "--resume", model=_scaled_model(e)), 2, "model weights"),
    ("capture --resume with other max-new-tokens", lambda e: [*e.capture_args(_interrupted(e), "--resume")[:-3], "--max-new-tokens", "3", "--out", str(e.tmp / "interrupted"), "--resume"], 2, "max_new_tokens"),
    ("run --resume with another target", lambda e: [a if a != "hf:cpu:fp16" else "hf:cpu:fp32" for a in e.run_args(_interrupted_run(e), "--resume")], 2, "target"),
    ("compare of an unfinished comparison suggests no --resume", lambda e: ["compare", str(e.world["ref"]), str(e.world["tgt"]), "--out", str(_unfinished_comparison(e))], 2, "pass --force to start over"),
    # -- numbers that would switch a gate off ----------------------------------------------------------------------------
    ("--threshold nan", lambda e: ["report", str(e.world["cmp"]), "--threshold", "rel_l2_fail=nan"], 2, "finite number"),
    ("--threshold negative", lambda e: ["report", str(e.world["cmp"]), "--threshold", "rel_l2_fail=-1"], 2, "finite number"),
    ("--threshold inf", lambda e: ["report", str(e.world["cmp"]), "--threshold", "local_r_fail=inf"], 2, "finite number"),
    ("nan in the TOML thresholds", lambda e: ["report", str(e.world["cmp"]), "--config", str(_file(e.tmp / "t.toml", "[thresholds]\nrel_l2_fail = nan\n"))], 2, "finite number"),
    ("--repeats 0", lambda e: e.run_args(e.tmp / "r", "--repeats", "0"), 2, "--repeats 0"),
    ("--repeats -3", lambda e: e.run_args(e.tmp / "r", "--repeats", "-3"), 2, "--repeats -3"),
    ("run --max-new-tokens 0", lambda e: e.run_args(e.tmp / "r", "--max-new-tokens", "0"), 2, "--max-new-tokens 0"),
    ("capture --max-new-tokens -5", lambda e: [*e.capture_args(e.tmp / "c")[:-2], "--max-new-tokens", "-5", "--out", str(e.tmp / "c")], 2, "--max-new-tokens -5"),
    ("--engine-arg that is not JSON", lambda e: e.capture_args(e.tmp / "c", "--engine-arg", "max_model_len=2O48"), 2, "neither JSON nor a plain word"),
    ("--engine-arg for a transformers target", lambda e: e.run_args(e.tmp / "r", "--engine-arg", "max_num_seqs=4"), 2, "apply to the vLLM backend"),
    ("--additional-config not an object", lambda e: e.capture_args(e.tmp / "c", "--additional-config", "[1]"), 2, "must be a JSON object"),
    ("plant-fault --factor nan", lambda e: ["plant-fault", "--model", str(e.world["model"]), "--layer", "1", "--factor", "nan", "--out", str(e.tmp / "f")], 2, "finite number > 0"),
    ("plant-fault --layer 99", lambda e: ["plant-fault", "--model", str(e.world["model"]), "--layer", "99", "--factor", "1.01", "--out", str(e.tmp / "f")], 2, "does not exist"),
    ("variant with a bad value", lambda e: [a if a != "hf:cpu:fp16" else "hf:cpu:bf16" for a in e.run_args(e.tmp / "r", "--target-variant", "fault:scale-weight:1:nan")], 2, "not finite"),
    # -- golden stores ---------------------------------------------------------------------------------------------------
    ("--reference a run directory", lambda e: [*e.run_args(e.tmp / "r"), "--reference", str(e.world["run"])], 2, "not a golden store"),
    ("--reference STORE with --truth none", lambda e: _store_run(e, "--truth", "none"), 2, "--truth cannot be combined"),
    ("--reference STORE with --envelope none", lambda e: _store_run(e, "--envelope", "none"), 2, "--envelope cannot be combined"),
    ("store.json without captures", lambda e: ["golden", "verify", str(_fake_store(e, {k: v for k, v in _store_json().items() if k != "captures"}))], 2, "no valid 'captures'"),
    ("store entry pointing outside the store", lambda e: ["golden", "verify", str(_fake_store(e, _store_json(captures={"reference": {"dir": "../../etc", "manifest_sha256": "0"}, "truth": {"dir": "captures/truth", "manifest_sha256": "0"}, "envelope": {}})))], 2, "was edited"),
    ("a store that is not JSON", lambda e: ["golden", "verify", str(_fake_store(e, None))], 2, "not a golden store"),
    # -- damaged or hostile captures -------------------------------------------------------------------------------------
    ("a tensor file swapped for another prompt's", lambda e: ["-q", "compare", str(_swapped(e)), str(e.world["tgt"]), "--out", str(e.tmp / "o")], 2, "was replaced"),
    ("a tensor of another shape than the model's", lambda e: ["-q", "compare", str(_reshaped(e)), str(e.world["tgt"]), "--out", str(e.tmp / "o")], 2, "a capture of this model has"),
    ("a BF16 file where the manifest says F16", lambda e: ["-q", "compare", str(e.world["ref"]), str(_dtype_swapped(e)), "--out", str(e.tmp / "o")], 2, "in the file"),
    ("a safetensors header that is not JSON", lambda e: ["-q", "compare", str(_header_garbage(e)), str(e.world["tgt"]), "--out", str(e.tmp / "o")], 2, "unreadable safetensors header"),
    ("a safetensors header that is a list", lambda e: ["-q", "compare", str(_header_list(e)), str(e.world["tgt"]), "--out", str(e.tmp / "o")], 2, "not a JSON object"),
    ("a header claiming a huge tensor (sparse file)", lambda e: ["-q", "compare", str(_sparse_claim(e)), str(e.world["tgt"]), "--out", str(e.tmp / "o")], 2, "a capture of this model has"),
    ("a deeply nested manifest.json", lambda e: ["-q", "compare", str(_nested_manifest(e)), str(e.world["tgt"]), "--out", str(e.tmp / "o")], 2, "corrupted"),
    ("a malformed comparison.json given to report", lambda e: ["report", str(_file(e.tmp / "comparison.json", json.dumps({"format": "precision-check-comparison", "prompts": [{}]}))), "--out", str(e.tmp / "rep")], 2, "damaged"),
    ("a summary.json without verdict given to regress", lambda e: ["regress", str(e.world["run"]), str(_no_verdict_run(e))], 2, "verdict"),
    # -- damaged or hostile models and prompts ---------------------------------------------------------------------------
    ("model.safetensors is a directory", lambda e: e.capture_args(e.tmp / "c", model=_weights_dir(e)), 2, "not a regular file"),
    ("an invalid weight file", lambda e: e.capture_args(e.tmp / "c", model=_weights_garbage(e)), 2, "not a readable safetensors"),
    ("weights symlinked to /dev/zero", lambda e: e.capture_args(e.tmp / "c", model=_weights_dev_zero(e)), 2, "not a regular file"),
    ("config sizes that do not match the weights", lambda e: e.capture_args(e.tmp / "c", model=_config_with(e, vocab_size=1_000_000_000)), 2, "does not match the weights"),
    ("config with another layer count", lambda e: e.capture_args(e.tmp / "c", model=_config_with(e, num_hidden_layers=7)), 2, "num_hidden_layers=7"),
    ("a deeply nested config.json", lambda e: e.capture_args(e.tmp / "c", model=_nested_config(e)), 2, "config.json"),
    ("a chat template the Jinja sandbox blocks", lambda e: ["-q", "capture", "--backend", "hf:cpu:bf16", "--model", str(_sandboxed_template_model(e)), "--prompts", str(_chat_prompts(e)), "--out", str(e.tmp / "c")], 2, "chat template"),
    ("a FIFO as the prompts file", lambda e: ["-q", "capture", "--backend", "hf:cpu:bf16", "--model", str(e.world["model"]), "--prompts", str(_fifo(e.tmp / "p.jsonl")), "--out", str(e.tmp / "c")], 2, "not a regular file"),
    ("a dangling prompt symlink in a prompt directory", lambda e: ["-q", "capture", "--backend", "hf:cpu:bf16", "--model", str(e.world["model"]), "--prompts", str(_dangling_prompt_dir(e)), "--out", str(e.tmp / "c")], 2, "link to nothing"),
]


def _store_run(env: Env, *flags: str) -> list[str]:
    store = _fake_store(env, _store_json())
    return ["-q", "run", "--prompts", str(env.world["prompts"]), "--model", str(env.world["model"]), "--reference", str(store), *flags, "--out", str(env.tmp / "r")]


def _symlink(link: Path, target: Path) -> Path:
    link.symlink_to(target)
    return link


def _file(path: Path, text: str = "mine") -> Path:
    path.write_text(text)
    return path


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _dangling_prompt_dir(env: Env) -> Path:
    folder = env.tmp / "prompt-dir"
    folder.mkdir()
    shutil.copy(env.world["prompts"], folder / "a.jsonl")
    (folder / "b.jsonl").symlink_to(env.tmp / "gone.jsonl")
    return folder


def _scaled_model(env: Env) -> Path:
    out = env.tmp / "scaled"
    assert main(["plant-fault", "--model", str(env.world["model"]), "--layer", "1", "--factor", "1.5", "--out", str(out)]) == 0
    return out


def _interrupted(env: Env) -> Path:
    """A capture whose manifest was never written (as after kill -9)."""
    out = env.copy("ref", "interrupted")
    (out / "manifest.json").unlink()
    return out


def _interrupted_run(env: Env) -> Path:
    out = env.copy("run", "interrupted-run")
    (out / "summary.json").unlink()
    return out


def _unfinished_comparison(env: Env) -> Path:
    out = env.copy("cmp", "unfinished")
    (out / "comparison.json").unlink()
    (out / "report.html").write_text("partial")
    return out


def _no_verdict_run(env: Env) -> Path:
    out = env.copy("run", "no-verdict")
    summary = json.loads((out / "summary.json").read_text())
    summary.pop("verdict")
    (out / "summary.json").write_text(json.dumps(summary))
    return out


def _swapped(env: Env) -> Path:
    out = env.copy("ref", "swapped")
    shutil.copy(env.world["tgt"] / "tensors" / "0000.safetensors", out / "tensors" / "0000.safetensors")
    return out


def _reshaped(env: Env) -> Path:
    out = env.copy("ref", "reshaped")
    _edit_manifest(out, lambda m: m["prompts"][0]["tensors"]["embed"].update(shape=[3, 7]))
    return out


def _dtype_swapped(env: Env) -> Path:
    out = env.copy("tgt", "dtype-swapped")
    _edit_header(out, lambda h: h["embed"].update(dtype="BF16"))
    return out


def _header_garbage(env: Env) -> Path:
    out = env.copy("ref", "garbage")
    _rewrite_tensor_file(out, lambda data: _with_header(data, b"{not json" + b" " * 32))
    return out


def _header_list(env: Env) -> Path:
    out = env.copy("ref", "header-list")
    _rewrite_tensor_file(out, lambda data: _with_header(data, b"[1, 2, 3]"))
    return out


def _sparse_claim(env: Env) -> Path:
    """The manifest and header claim a [200000, 200000] float32 tensor; the file is sparse (no disk used)."""
    out = env.copy("ref", "sparse")
    _edit_manifest(out, lambda m: m["prompts"][0]["tensors"]["embed"].update(shape=[200_000, 200_000]))
    return out


def _nested_manifest(env: Env) -> Path:
    out = env.copy("ref", "nested")
    (out / "manifest.json").write_text(_nested(100_000))
    return out


def _weights_dir(env: Env) -> Path:
    model = env.model_copy()
    (model / "model.safetensors").unlink()
    (model / "model.safetensors").mkdir()
    return model


def _weights_garbage(env: Env) -> Path:
    model = env.model_copy()
    (model / "model.safetensors").write_bytes(b"\xff" * 64)
    return model


def _weights_dev_zero(env: Env) -> Path:
    model = env.model_copy()
    (model / "model.safetensors").unlink()
    (model / "model.safetensors").symlink_to("/dev/zero")
    return model


def _nested_config(env: Env) -> Path:
    model = env.model_copy()
    (model / "config.json").write_text(_nested(100_000))
    return model


def test_the_matrix_is_large_enough():
    assert len(CASES) >= 40


@pytest.mark.parametrize("name, build, code, fragment", CASES, ids=[c[0] for c in CASES])
def test_hostile_input(name, build, code, fragment, world, tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cwd-file.txt").write_text("the user's working directory")
    (home / "dotfile").write_text("the user's home")
    env = Env(world, tmp_path, [])
    argv = build(env)
    snapshots = {path: _snapshot(path) for path in env.decoys}
    world_before = {key: _snapshot(world[key]) for key in ("ref", "tgt", "cmp", "run")}
    model_before = _snapshot(world["model"])
    assert main(argv) == code, capsys.readouterr().err
    err = capsys.readouterr().err
    assert fragment in err, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for path, before in snapshots.items():
        assert _snapshot(path) == before, f"{path} was changed"
    assert {key: _snapshot(world[key]) for key in ("ref", "tgt", "cmp", "run")} == world_before
    assert _snapshot(world["model"]) == model_before
    assert (tmp_path / "cwd-file.txt").exists() and (home / "dotfile").exists()


@requires_vllm
def test_unknown_vllm_engine_setting_is_refused_before_any_model_loads(world, tmp_path, capsys):
    argv = ["-q", "capture", "--backend", "vllm", "--model", str(world["model"]), "--prompts", str(world["prompts"]),
            "--engine-arg", "max_num_seqz=2", "--out", str(tmp_path / "c")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "max_num_seqz" in err and "max_num_seqs" in err


def test_a_bug_exits_3_with_one_line_and_a_saved_traceback(world, tmp_path, monkeypatch, capsys):
    import precision.analysis.verdict as verdict

    def broken(*args, **kwargs):
        raise ValueError("a planted bug")

    monkeypatch.setattr(verdict, "judge", broken)
    assert main(["report", str(world["cmp"]), "--out", str(tmp_path / "rep")]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error (ValueError: a planted bug)" in err and "Traceback" not in err
    saved = Path(err.rsplit("traceback is in ", 1)[1].split(":", 1)[0])
    assert "Traceback" in saved.read_text() and "a planted bug" in saved.read_text()
    saved.unlink()


def test_force_replaces_only_what_the_tool_wrote(world, tmp_path):
    """A run directory with a nested capture the tool wrote is replaced whole; one foreign file anywhere in it
    (here deep inside a capture's tensors/) makes --force refuse and remove nothing."""
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    (run / "captures" / "reference" / "tensors" / "notes.txt").write_text("mine")
    before = _snapshot(run)
    env = Env(world, tmp_path, [])
    assert main(env.run_args(run, "--force")) == 2
    assert _snapshot(run) == before
    (run / "captures" / "reference" / "tensors" / "notes.txt").unlink()
    assert main(env.run_args(run, "--force")) == 0
    assert (run / "summary.json").is_file()


def test_a_second_writer_is_told_the_holders_pid(world, tmp_path, capsys):
    import subprocess
    import sys
    import time

    out = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from precision.outputs import claim_output_dir; "
        f"d = claim_output_dir({str(out)!r}, 'capture', complete_marker='manifest.json'); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        env = Env(world, tmp_path, [])
        assert main(env.capture_args(out, "--resume")) == 2
        assert f"in use by another precision-check process (PID {holder.pid})" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    assert main(Env(world, tmp_path, []).capture_args(out, "--resume")) == 0
