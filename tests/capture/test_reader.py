"""Tests of precision/capture: writing a real capture of stories260K, reading it back, and refusing damaged ones."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from precision.capture import SCHEMA_VERSION, CaptureReader, CaptureSelection
from precision.capture import manifest as schema
from precision.errors import CaptureFormatError, PrecisionError
from precision.outputs import claim_output_dir

MODEL = Path(__file__).resolve().parents[1] / "models" / "stories260K"  # vendored with the tests
SPEC = "hf:cpu:bf16"
MAX_NEW = 8

# Two chat prompts of the same token length (24 tokens with the plain-chat rendering) but different tokens,
# so their tensor files have the same size and different contents.
PROMPTS = [
    {"id": "story", "category": "raw-continuation", "messages": [{"role": "user", "content": "Tell me a story"}]},
    {"id": "tale", "category": "raw-continuation", "messages": [{"role": "user", "content": "Tell me a tale"}]},
]


class Env:
    def __init__(self, root: Path) -> None:
        from precision.model import inspect_model
        from precision.planning import plan_from_prompts

        self.root = root
        self.prompts_file = root / "prompts.jsonl"
        self.prompts_file.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS), encoding="utf-8")
        self.model = inspect_model(MODEL)
        self.plan = plan_from_prompts(self.prompts_file, self.model, max_new_tokens=MAX_NEW)
        self.base = self.capture(root / "base")

    def capture(self, out: Path, **kwargs) -> CaptureReader:
        from precision.backends import create_backend
        from precision.capture.writer import capture

        return capture(create_backend(SPEC, self.model), self.plan, out, show_progress=False, **kwargs)


@pytest.fixture(scope="session")
def env(tmp_path_factory) -> Env:
    return Env(tmp_path_factory.mktemp("capture-env"))


@pytest.fixture
def cap(env, tmp_path) -> Path:
    """A private copy of the reference capture that a test may damage."""
    target = tmp_path / "cap"
    shutil.copytree(env.base.path, target)
    return target


def read_manifest(path: Path) -> dict:
    return json.loads((path / schema.MANIFEST).read_text(encoding="utf-8"))


def write_manifest(path: Path, data) -> None:
    (path / schema.MANIFEST).write_text(json.dumps(data), encoding="utf-8")


def tensor(path: Path, index: int) -> Path:
    return path / schema.tensor_file_name(index)


def header_length(path: Path) -> int:
    with open(path, "rb") as handle:
        return int.from_bytes(handle.read(8), "little")


def records_json(reader: CaptureReader) -> list[dict]:
    return [r.to_json() for r in reader.prompts]


def assert_same_tensors(a: CaptureReader, b: CaptureReader) -> None:
    import torch

    assert len(a.prompts) == len(b.prompts)
    for ra, rb in zip(a.prompts, b.prompts):
        assert ra.sha256 == rb.sha256
        with a.open_tensors(ra) as ta, b.open_tensors(rb) as tb:
            assert set(ta.keys()) == set(tb.keys())
            for name in ta.keys():
                x, y = ta.get_tensor(name), tb.get_tensor(name)
                assert x.dtype == y.dtype and torch.equal(x, y), name


def refuse(path: Path, *fragments: str) -> str:
    with pytest.raises(CaptureFormatError) as info:
        CaptureReader(path)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# ---------------------------------------------------------------------------------------------------------------
# The capture itself
# ---------------------------------------------------------------------------------------------------------------


def test_capture_error_is_precision_error():
    assert issubclass(CaptureFormatError, PrecisionError)


def test_capture_layout_and_manifest(env):
    reader = env.base
    path = reader.path
    assert sorted(p.name for p in path.iterdir()) == [".precision-check", ".precision-check.lock", schema.MANIFEST, schema.PROGRESS, schema.TENSOR_DIR]
    assert sorted(p.name for p in (path / schema.TENSOR_DIR).iterdir()) == ["0000.safetensors", "0001.safetensors"]
    m = reader.manifest
    assert m["schema_version"] == SCHEMA_VERSION == 1 and m["format"] == schema.FORMAT_NAME
    assert m["selection"] == {"positions": "all", "layers": "all"}
    assert m["teacher_forcing"]["source"] == "self" and m["skipped"] == []
    assert m["model"]["path"] == str(MODEL.resolve()) and m["tokenizer"]["has_chat_template"] is False
    assert reader.num_layers == 5 and reader.vocab_size == 512
    assert reader.backend_spec == SPEC and reader.dtype == "bfloat16"
    assert reader.manifest_sha256() == hashlib.sha256((path / schema.MANIFEST).read_bytes()).hexdigest()
    assert [r.id for r in reader.prompts] == ["story", "tale"]
    for index, (record, planned) in enumerate(zip(reader.prompts, env.plan.prompts)):
        assert record.index == index and record.file == schema.tensor_file_name(index)
        assert record.rendering == "plain-chat" and record.prompt_ids == planned.prompt_ids
        assert record.prompt_ids[0] == 1
        assert record.continuation_ids == record.generated_ids and len(record.continuation_ids) == MAX_NEW
        assert record.forced_ids == record.prompt_ids + record.continuation_ids
        assert record.sites == ["embed", "layer.0", "layer.1", "layer.2", "layer.3", "layer.4", "final_norm", "logits"]
        n = len(record.forced_ids)
        assert record.tensors["positions"] == {"shape": [n], "dtype": "I64"}
        assert record.tensors["logits"] == {"shape": [n, 512], "dtype": "BF16"}
        assert record.tensors["layer.3"] == {"shape": [n, 64], "dtype": "BF16"}
        tensor_file = reader.tensor_path(record)
        assert record.bytes == tensor_file.stat().st_size
        assert record.sha256 == hashlib.sha256(tensor_file.read_bytes()).hexdigest()
        reader.verify(record)
    lines = (path / schema.PROGRESS).read_text().splitlines()
    assert json.loads(lines[0])["header"]["backend"] == SPEC
    assert [json.loads(x) for x in lines[1:]] == records_json(reader)
    # The swap test below relies on these two files having the same size but different contents.
    a, b = reader.prompts
    assert a.bytes == b.bytes and a.sha256 != b.sha256


def test_open_tensors_reads_listed_tensors(env):
    import torch

    reader = env.base
    record = reader.prompts[0]
    with reader.open_tensors(record) as handle:
        assert set(handle.keys()) == set(record.tensors)
        for name, info in record.tensors.items():
            t = handle.get_tensor(name)
            assert list(t.shape) == info["shape"]
        assert handle.get_tensor("embed").dtype == torch.bfloat16
        assert torch.equal(handle.get_tensor("positions"), torch.arange(len(record.forced_ids)))


def test_two_captures_are_bit_identical(env, tmp_path):
    again = env.capture(tmp_path / "again")
    assert [r.sha256 for r in again.prompts] == [r.sha256 for r in env.base.prompts]
    assert records_json(again) == records_json(env.base)
    assert_same_tensors(env.base, again)


@pytest.fixture(scope="module")
def hf_model():
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(MODEL), dtype=torch.bfloat16).eval()


def test_hidden_states_and_logits_equal_transformers(env, hf_model):
    import torch

    reader = env.base
    layers = hf_model.model.layers
    L = len(layers)
    assert L == reader.num_layers
    for record in reader.prompts:
        ids = torch.tensor([list(record.forced_ids)])
        hooked = {}

        def hook(_module, _inputs, output):
            hooked["last"] = (output[0] if isinstance(output, (tuple, list)) else output)[0].clone()

        handle = layers[-1].register_forward_hook(hook)
        try:
            with torch.no_grad():
                out = hf_model(ids, output_hidden_states=True)
        finally:
            handle.remove()
        hs = out.hidden_states
        assert len(hs) == L + 1
        with reader.open_tensors(record) as t:
            assert torch.equal(t.get_tensor("embed"), hs[0][0])
            for k in range(1, L):
                assert torch.equal(t.get_tensor(f"layer.{k - 1}"), hs[k][0]), f"layer.{k - 1}"
            assert torch.equal(t.get_tensor("final_norm"), hs[L][0])
            assert torch.equal(t.get_tensor(f"layer.{L - 1}"), hooked["last"])
            logits = t.get_tensor("logits")
            assert logits.dtype == out.logits.dtype == torch.bfloat16
            assert torch.equal(logits, out.logits[0]), f"max |diff| {(logits.float() - out.logits[0].float()).abs().max()}"
            # the stored continuation is the model's greedy choice at each position (teacher forcing on itself)
            n = len(record.prompt_ids)
            greedy = out.logits[0, n - 1:-1].float().argmax(-1).tolist()
            assert tuple(greedy) == record.continuation_ids


# ---------------------------------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def selected(env, tmp_path_factory):
    root = tmp_path_factory.mktemp("selected")
    return {
        "last": env.capture(root / "last", selection=CaptureSelection.parse("last", "all")),
        "every4": env.capture(root / "every4", selection=CaptureSelection.parse("every:4", "0,2")),
    }


def test_selection_last_keeps_one_row(env, selected):
    import torch

    reader = selected["last"]
    assert reader.manifest["selection"] == {"positions": "last", "layers": "all"}
    for full, rec in zip(env.base.prompts, reader.prompts):
        n = len(rec.forced_ids)
        assert rec.tensors["positions"]["shape"] == [1]
        assert rec.tensors["logits"]["shape"] == [1, 512]
        with env.base.open_tensors(full) as a, reader.open_tensors(rec) as b:
            assert b.get_tensor("positions").tolist() == [n - 1]
            for name in full.sites:
                assert torch.equal(b.get_tensor(name), a.get_tensor(name)[-1:]), name


def test_selection_every_k_and_layers(env, selected):
    import torch

    reader = selected["every4"]
    assert reader.manifest["selection"] == {"positions": "every:4", "layers": [0, 2]}
    for full, rec in zip(env.base.prompts, reader.prompts):
        n = len(rec.forced_ids)
        expected = list(range(0, n, 4))
        if expected[-1] != n - 1:
            expected.append(n - 1)
        assert set(rec.tensors) == {"positions", "embed", "layer.0", "layer.2", "final_norm", "logits"}
        assert rec.sites == ["embed", "layer.0", "layer.2", "final_norm", "logits"]
        with env.base.open_tensors(full) as a, reader.open_tensors(rec) as b:
            positions = b.get_tensor("positions")
            assert positions.dtype == torch.int64 and positions.tolist() == expected
            for name in rec.sites:
                assert torch.equal(b.get_tensor(name), a.get_tensor(name)[positions]), name


@pytest.mark.parametrize("length, spelling, expected", [
    (10, "all", list(range(10))),
    (10, "last", [9]),
    (1, "last", [0]),
    (9, "every:4", [0, 4, 8]),
    (10, "every:4", [0, 4, 8, 9]),
    (3, "every:100", [0, 2]),
    (1, "every:1", [0]),
])
def test_position_indices(length, spelling, expected):
    assert CaptureSelection.parse(spelling).position_indices(length) == expected


def test_parse_layers():
    sel = CaptureSelection.parse("all", "2, 0,2")
    assert sel.layers == (0, 2) and sel.layer_indices(5) == [0, 2]
    assert sel.to_json() == {"positions": "all", "layers": [0, 2]}
    assert CaptureSelection.parse("all", "all").layer_indices(3) == [0, 1, 2]
    assert CaptureSelection.parse("all", "").layers is None


@pytest.mark.parametrize("positions", ["first", "Last", "every", "every:", "every:0", "every:-2", "every:x", "every:4.5", "every4", ""])
def test_parse_bad_positions(positions):
    with pytest.raises(PrecisionError, match="--positions"):
        CaptureSelection.parse(positions, "all")


@pytest.mark.parametrize("layers", ["a", "0,,2", "1;2", "0-3", "first", "1.5"])
def test_parse_bad_layers(layers):
    with pytest.raises(PrecisionError, match="--layers"):
        CaptureSelection.parse("all", layers)


@pytest.mark.parametrize("layers", ["5", "0,7", "-1"])
def test_out_of_range_layers(layers):
    sel = CaptureSelection.parse("all", layers)
    with pytest.raises(PrecisionError, match=r"--layers asks for .*0\.\.4"):
        sel.layer_indices(5)


def test_capture_with_out_of_range_layers_fails(env, tmp_path):
    with pytest.raises(PrecisionError, match="--layers"):
        env.capture(tmp_path / "bad", selection=CaptureSelection.parse("all", "0,5"))
    assert not (tmp_path / "bad" / schema.MANIFEST).exists()


# ---------------------------------------------------------------------------------------------------------------
# Damaged captures
# ---------------------------------------------------------------------------------------------------------------


def test_missing_directory(tmp_path):
    refuse(tmp_path / "nowhere", "does not exist")


def test_no_manifest_with_progress_suggests_resume(cap):
    (cap / schema.MANIFEST).unlink()
    refuse(cap, "incomplete", "--resume")


def test_no_manifest_no_progress(cap, tmp_path):
    (cap / schema.MANIFEST).unlink()
    (cap / schema.PROGRESS).unlink()
    refuse(cap, "not a capture directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    message = refuse(empty, "not a capture directory")
    assert "--resume" not in message


@pytest.mark.parametrize("content", [b"{not json", b"", b'{"schema_version": 1,', b"\xff\xfe\x00garbage"])
def test_manifest_not_json(cap, content):
    (cap / schema.MANIFEST).write_bytes(content)
    refuse(cap, str(cap / schema.MANIFEST), "corrupted")


@pytest.mark.parametrize("data", [[1, 2], "text", 3, None])
def test_manifest_not_an_object(cap, data):
    write_manifest(cap, data)
    refuse(cap, "not a JSON object")


def test_schema_version_99(cap):
    data = read_manifest(cap)
    data["schema_version"] = 99
    write_manifest(cap, data)
    message = refuse(cap, "schema version 99")
    assert f"reads version {SCHEMA_VERSION}" in message and "newer precision-check: upgrade" in message


def test_schema_version_as_string_refused(cap):
    data = read_manifest(cap)
    data["schema_version"] = "1"
    write_manifest(cap, data)
    refuse(cap, "schema version '1'")


def test_wrong_format(cap):
    data = read_manifest(cap)
    data["format"] = "some-other-tool"
    write_manifest(cap, data)
    refuse(cap, "not a precision-check capture manifest", "'some-other-tool'")


@pytest.mark.parametrize("key", schema.REQUIRED_KEYS)
def test_required_key_removed(cap, key):
    data = read_manifest(cap)
    del data[key]
    write_manifest(cap, data)
    refuse(cap, key)


@pytest.mark.parametrize("key", schema.PROMPT_KEYS)
def test_prompt_entry_key_removed(cap, key):
    data = read_manifest(cap)
    del data["prompts"][1][key]
    write_manifest(cap, data)
    refuse(cap, "prompts[1]", f"'{key}'", "damaged")


@pytest.mark.parametrize("key, value", [("prompt_ids", ["a"]), ("prompt_ids", None), ("bytes", "many"), ("tensors", 5), ("index", None)])
def test_prompt_entry_wrong_type(cap, key, value):
    data = read_manifest(cap)
    data["prompts"][0][key] = value
    write_manifest(cap, data)
    refuse(cap, f"prompts[0].{key}", "expected", "damaged")


@pytest.mark.parametrize("value", [None, 5])
def test_prompts_not_a_list(cap, value):
    data = read_manifest(cap)
    data["prompts"] = value
    write_manifest(cap, data)
    refuse(cap, "prompts")


@pytest.mark.parametrize("index, file", [
    (0, "../../etc/passwd"),
    (0, "/etc/passwd"),
    (0, "tensors/../../../etc/passwd"),
    (0, "tensors/0001.safetensors"),
    (1, "tensors/0000.safetensors"),
    (0, "tensors/0000.safetensors/"),
    (0, "./tensors/0000.safetensors"),
])
def test_tensor_path_escape_refused(cap, index, file):
    data = read_manifest(cap)
    data["prompts"][index]["file"] = file
    write_manifest(cap, data)
    refuse(cap, repr(file), f"expected {schema.tensor_file_name(index)!r}")


def test_prompt_index_out_of_order_refused(cap):
    data = read_manifest(cap)
    data["prompts"].reverse()
    write_manifest(cap, data)
    refuse(cap, "'tale'")


def test_prompt_index_mismatch_message_names_the_problem(cap):
    data = read_manifest(cap)
    data["prompts"].reverse()
    write_manifest(cap, data)
    message = refuse(cap, "'tale'").replace(str(cap), "<capture>")  # the tmp path itself contains "index"
    assert "index" in message or "position" in message, message


def test_tensor_file_deleted(cap):
    tensor(cap, 1).unlink()
    refuse(cap, str(tensor(cap, 1)), "missing")


def test_tensor_file_truncated(cap):
    path = tensor(cap, 0)
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(size - 10)
    refuse(cap, str(path), f"{size - 10:,} bytes", f"{size:,}", "truncated")


def test_tensor_file_grown(cap):
    path = tensor(cap, 1)
    size = path.stat().st_size
    with open(path, "ab") as handle:
        handle.write(b"\0")
    refuse(cap, str(path), f"{size + 1:,} bytes")


def test_byte_flipped_in_data_fails_verification(env, cap):
    import torch

    path = tensor(cap, 0)
    data = bytearray(path.read_bytes())
    offset = 8 + header_length(path) + (len(data) - 8 - header_length(path)) // 2
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    reader = CaptureReader(cap)  # same size: the cheap checks pass
    damaged, intact = reader.prompts
    with pytest.raises(CaptureFormatError, match="sha256.*differs"):
        reader.verify(damaged)
    with pytest.raises(CaptureFormatError, match=str(path)):
        with reader.open_tensors(damaged):
            pass
    reader.verify(intact)
    with reader.open_tensors(intact) as handle:
        assert handle.get_tensor("logits").shape[1] == 512
    # without verification the flipped file still reads, and exactly one tensor differs from the original
    with reader.open_tensors(damaged, verify=False) as a, env.base.open_tensors(env.base.prompts[0]) as b:
        changed = [n for n in damaged.tensors if not torch.equal(a.get_tensor(n), b.get_tensor(n))]
    assert len(changed) == 1


def test_tensor_file_replaced_by_other_prompts_file(cap):
    shutil.copyfile(tensor(cap, 1), tensor(cap, 0))
    reader = CaptureReader(cap)
    with pytest.raises(CaptureFormatError, match=r"0000\.safetensors: sha256 .* differs"):
        reader.verify(reader.prompts[0])
    with pytest.raises(CaptureFormatError, match="differs"):
        with reader.open_tensors(reader.prompts[0]):
            pass


def test_corrupted_header_not_readable(cap):
    path = tensor(cap, 0)
    data = bytearray(path.read_bytes())
    assert data[8:9] == b"{"
    data[8] = ord("X")
    path.write_bytes(bytes(data))
    reader = CaptureReader(cap)
    with pytest.raises(CaptureFormatError, match="not a readable safetensors file"):
        with reader.open_tensors(reader.prompts[0], verify=False):
            pass
    with pytest.raises(CaptureFormatError, match="differs"):
        with reader.open_tensors(reader.prompts[0]):
            pass


def test_header_length_corrupted_not_readable(cap):
    path = tensor(cap, 1)
    data = bytearray(path.read_bytes())
    data[0:8] = (len(data) * 4).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    reader = CaptureReader(cap)
    with pytest.raises(CaptureFormatError, match="not a readable safetensors file"):
        with reader.open_tensors(reader.prompts[1], verify=False):
            pass


def test_header_tensor_renamed_is_refused(cap):
    path = tensor(cap, 0)
    data = path.read_bytes()
    assert data.count(b'"embed"') == 1
    path.write_bytes(data.replace(b'"embed"', b'"embad"'))
    reader = CaptureReader(cap)
    with pytest.raises(CaptureFormatError, match="embad"):
        with reader.open_tensors(reader.prompts[0], verify=False):
            pass


# ---------------------------------------------------------------------------------------------------------------
# Output directories: --force, --resume, permissions
# ---------------------------------------------------------------------------------------------------------------


def test_existing_complete_capture_needs_force(env, cap):
    before = read_manifest(cap)
    with pytest.raises(PrecisionError, match="--force"):
        env.capture(cap)
    assert read_manifest(cap) == before
    with pytest.raises(PrecisionError, match="--force"):
        claim_output_dir(cap, "capture", force=False, complete_marker=schema.MANIFEST)
    # --resume does not reopen a finished capture either
    with pytest.raises(PrecisionError, match="--force"):
        env.capture(cap, resume=True)


def test_force_overwrites_complete_capture(env, cap):
    reader = env.capture(cap, force=True)
    assert records_json(reader) == records_json(env.base)


def test_force_refuses_a_capture_holding_a_file_it_did_not_write(env, cap):
    (cap / "stray.txt").write_text("the user's own notes")
    before = sorted(p.name for p in cap.rglob("*"))
    with pytest.raises(PrecisionError, match="did not write.*stray.txt.*nothing there is changed"):
        env.capture(cap, force=True)
    assert sorted(p.name for p in cap.rglob("*")) == before and (cap / "stray.txt").read_text() == "the user's own notes"


def test_incomplete_capture_needs_resume(env, cap):
    (cap / schema.MANIFEST).unlink()
    with pytest.raises(PrecisionError, match="--resume"):
        env.capture(cap)
    assert not (cap / schema.MANIFEST).exists()
    with pytest.raises(PrecisionError, match="--resume"):
        claim_output_dir(cap, "capture", force=False, complete_marker=schema.MANIFEST)


def test_output_path_is_a_file(env, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(PrecisionError, match="not a directory"):
        env.capture(target)


def test_output_parent_is_a_file(env, tmp_path):
    parent = tmp_path / "file"
    parent.write_text("x")
    with pytest.raises(PrecisionError, match=str(parent / "out")):
        env.capture(parent / "out")


# Runs in a child process with the permission rules of an ordinary user: as root (CI runs as root) the child drops
# the capabilities that let root write anywhere (setpriv, util-linux), and first proves the rules hold, so the test
# can neither skip nor pass vacuously. The capture goes through the CLI: exit 2 and a message, never a traceback.
READ_ONLY_SCENARIO = """
import sys
from pathlib import Path

parent, model, prompts = sys.argv[1:4]
probe = Path(parent) / "probe"
try:
    probe.mkdir()
except PermissionError:
    pass
else:
    probe.rmdir()
    print("PERMISSIONS NOT ENFORCED: this process may write into a read-only directory", file=sys.stderr)
    sys.exit(10)
from precision.cli import main

sys.exit(main(["-q", "capture", "--model", model, "--backend", "hf:cpu:bf16", "--prompts", prompts,
               "--max-new-tokens", "2", "--out", str(Path(parent) / "out")]))
"""


def as_ordinary_user(argv: list[str]) -> list[str]:
    if not (hasattr(os, "geteuid") and os.geteuid() == 0):
        return argv
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.fail("running as root, this test needs setpriv (util-linux) to drop root's permission override")
    drop = "-dac_override,-dac_read_search"
    return [setpriv, f"--inh-caps={drop}", f"--bounding-set={drop}", "--", *argv]


def test_read_only_output_directory(env, tmp_path):
    import subprocess
    import sys

    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        result = subprocess.run(as_ordinary_user([sys.executable, "-c", READ_ONLY_SCENARIO, str(parent), str(MODEL),
                                                  str(env.prompts_file)]),
                                capture_output=True, text=True, timeout=300)
    finally:
        parent.chmod(0o700)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"no permission for creating {parent / 'out'}" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert list(parent.iterdir()) == []


def _interrupt(path: Path) -> None:
    """Make a finished capture look interrupted while its last prompt was being written."""
    (path / schema.MANIFEST).unlink()
    progress = path / schema.PROGRESS
    lines = progress.read_text().splitlines(keepends=True)
    last = json.loads(lines[-1])
    progress.write_text("".join(lines[:-1]))
    (path / last["file"]).unlink()


def test_resume_finishes_interrupted_capture(env, cap):
    _interrupt(cap)
    kept = tensor(cap, 0).stat()
    reader = env.capture(cap, resume=True)
    assert records_json(reader) == records_json(env.base)
    assert_same_tensors(env.base, reader)
    after = tensor(cap, 0).stat()
    assert (after.st_ino, after.st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns), "the finished prompt was captured again"
    lines = (cap / schema.PROGRESS).read_text().splitlines()
    assert [json.loads(x) for x in lines[1:]] == records_json(env.base)


def test_resume_redoes_prompt_with_cut_progress_line(env, cap):
    (cap / schema.MANIFEST).unlink()
    progress = cap / schema.PROGRESS
    text = progress.read_text()
    progress.write_text(text[: len(text) - 40])  # the last record cut mid-line; its tensor file stays
    reader = env.capture(cap, resume=True)
    assert records_json(reader) == records_json(env.base)
    assert_same_tensors(env.base, reader)


def test_resume_redoes_prompt_whose_tensor_file_changed(env, cap):
    (cap / schema.MANIFEST).unlink()
    with open(tensor(cap, 0), "ab") as handle:
        handle.write(b"junk")
    reader = env.capture(cap, resume=True)
    assert records_json(reader) == records_json(env.base)


def test_resume_with_other_selection_refused(env, cap):
    _interrupt(cap)
    with pytest.raises(PrecisionError, match="another --positions/--layers selection"):
        env.capture(cap, resume=True, selection=CaptureSelection.parse("last", "all"))


def test_resume_of_new_directory_is_a_fresh_capture(env, tmp_path):
    reader = env.capture(tmp_path / "fresh", resume=True)
    assert records_json(reader) == records_json(env.base)
