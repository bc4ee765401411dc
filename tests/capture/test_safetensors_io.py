"""The package's one safetensors reader (precision.safetensors_io) against safetensors' own loader, and its refusals
of damaged or hostile files, each with the caller's error class and advice."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from precision import safetensors_io
from precision.capture.arrays import TensorFile
from precision.errors import CaptureFormatError, ModelError
from precision.model import weight_file
from precision.safetensors_io import SafetensorsFile, write_tensors

torch = pytest.importorskip("torch")


def every_dtype() -> dict:
    gen = torch.Generator().manual_seed(0)
    floats = torch.randn(3, 5, generator=gen)
    return {
        "bf16": floats.bfloat16(), "f16": floats.half(), "f32": floats, "f64": floats.double(),
        "f8_e4m3": floats.to(torch.float8_e4m3fn), "f8_e5m2": floats.to(torch.float8_e5m2),
        "i64": torch.arange(-7, 8, dtype=torch.int64).reshape(3, 5), "i32": torch.arange(4, dtype=torch.int32),
        "i16": torch.tensor([-3, 9], dtype=torch.int16), "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4),
    }


@pytest.fixture
def written(tmp_path) -> Path:
    path = tmp_path / "all.safetensors"
    write_tensors(path, every_dtype(), metadata={"format": "pt"})
    return path


def test_reads_what_safetensors_reads(written):
    from safetensors.torch import load_file

    theirs = load_file(str(written))
    ours = SafetensorsFile(written).tensors()
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and ours[name].shape == tensor.shape, name
        assert torch.equal(ours[name].view(torch.uint8) if tensor.dtype.is_floating_point and tensor.element_size() == 1 else ours[name],
                           tensor.view(torch.uint8) if tensor.dtype.is_floating_point and tensor.element_size() == 1 else tensor), name


def test_numpy_rows_widen_bf16_and_fp16_exactly(written):
    file = SafetensorsFile(written)
    reference = every_dtype()
    for name in ("bf16", "f16", "f32", "f64", "i64"):
        expected = reference[name].to(torch.float32 if name in ("bf16", "f16") else reference[name].dtype).numpy()
        np.testing.assert_array_equal(file.array(name), expected)
        np.testing.assert_array_equal(file.rows(name, 1, 3), expected[1:3])
    assert file.array("scalar").shape == () and file.array("scalar") == 2.5
    assert file.array("empty").shape == (0, 4)
    assert file.dtype_name("bf16") == "BF16" and file.shape("bf16") == (3, 5)
    with pytest.raises(Exception, match="read as torch only"):
        file.array("u8")


def test_reads_longer_than_one_read_call(written, monkeypatch):
    monkeypatch.setattr(safetensors_io, "MAX_READ_BYTES", 7)  # many short reads per tensor
    np.testing.assert_array_equal(SafetensorsFile(written).array("f64"), every_dtype()["f64"].numpy())


# ------------------------------------------------------------------------------------------------ refusals


def _rewrite(path: Path, header: bytes | None = None, data: bytes | None = None, length: int | None = None) -> None:
    raw = path.read_bytes()
    old = int.from_bytes(raw[:8], "little")
    header = raw[8:8 + old] if header is None else header
    data = raw[8 + old:] if data is None else data
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)


def _edit(path: Path, edit) -> None:
    raw = path.read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    edit(header)
    _rewrite(path, json.dumps(header).encode())


REFUSALS = [
    ("too short", lambda p: p.write_bytes(b"\x01\x00"), "too short"),
    ("header length beyond the file", lambda p: _rewrite(p, length=10**9), "does not fit the file"),
    ("header length over the cap", lambda p: _rewrite(p, length=(100 << 20) + 1), "does not fit the file"),
    ("header not JSON", lambda p: _rewrite(p, b"{not json"), "unreadable safetensors header"),
    ("header a list", lambda p: _rewrite(p, b"[1, 2]"), "not a JSON object"),
    ("unknown dtype", lambda p: _edit(p, lambda h: h["f32"].update(dtype="F33")), "unsupported or damaged header entry"),
    ("entry not an object", lambda p: _edit(p, lambda h: h.update(f32=[1, 2])), "unsupported or damaged header entry"),
    ("float in a shape", lambda p: _edit(p, lambda h: h["f32"].update(shape=[3.0, 5])), "unsupported or damaged header entry"),
    ("negative dimension", lambda p: _edit(p, lambda h: h["f32"].update(shape=[-3, -5])), "wrong size"),
    ("shape against byte range", lambda p: _edit(p, lambda h: h["f32"].update(shape=[5, 5])), "wrong size"),
    ("dtype against byte range", lambda p: _edit(p, lambda h: h["f32"].update(dtype="F64")), "wrong size"),
    ("two tensors on one range", lambda p: _edit(p, lambda h: h["i16"].update(data_offsets=h["u8"]["data_offsets"], dtype="U8")),
     "overlaps another or leaves a gap"),
    ("data cut short", lambda p: p.write_bytes(p.read_bytes()[:-1]), "cut short or has extra bytes"),
    ("extra bytes after the data", lambda p: p.write_bytes(p.read_bytes() + b"\x00" * 8), "cut short or has extra bytes"),
]


@pytest.mark.parametrize("damage, message", [(d, m) for _, d, m in REFUSALS], ids=[i for i, _, _ in REFUSALS])
def test_damage_is_refused_with_the_callers_error_and_advice(written, damage, message):
    damage(written)
    with pytest.raises(CaptureFormatError, match=message) as refused:
        TensorFile(written)
    assert str(refused.value).startswith(f"{written} is not a readable safetensors file: ")
    assert str(refused.value).endswith("; capture again")
    with pytest.raises(ModelError, match="replace it with an intact copy of the checkpoint"):
        weight_file(written)


def test_the_intact_file_is_not_refused(written):
    # the refusals above come from the damage, not from the reader refusing everything
    assert TensorFile(written).names() == set(every_dtype())
    assert weight_file(written).shapes()["bf16"] == (3, 5)


def test_a_directory_is_refused(tmp_path):
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(ModelError, match="cannot be read"):
        weight_file(tmp_path / "d.safetensors")


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(at=st.integers(0, 10**6), value=st.integers(0, 255))
def test_any_single_byte_of_the_header_changed_is_refused_or_reads_consistently(tmp_path_factory, at, value):
    path = tmp_path_factory.mktemp("fuzz") / "f.safetensors"
    write_tensors(path, every_dtype())
    raw = bytearray(path.read_bytes())
    end = 8 + int.from_bytes(raw[:8], "little")
    raw[at % end] = value
    path.write_bytes(bytes(raw))
    try:
        file = TensorFile(path)
    except CaptureFormatError:
        return
    for name in file.names():  # a change the checks let through must still read without another exception
        file.get_tensor(name)
