"""Fuzzing the capture reader: random damage to a real capture's files must end in a CaptureFormatError (or a
capture that still reads consistently), never in another exception."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from precision.capture.reader import CaptureReader
from precision.errors import CaptureFormatError
from tests.capture.test_reader import Env

FILES = ["manifest.json", "tensors/0000.safetensors", "tensors/0001.safetensors"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return Env(tmp_path_factory.mktemp("fuzz")).base.path


def _read_everything(path: Path) -> None:
    reader = CaptureReader(path)
    for record in reader.prompts:
        with reader.open_tensors(record) as handle:
            for name in record.tensors:
                handle.get_tensor(name)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    target=st.sampled_from(FILES),
    damage=st.sampled_from(["flip", "truncate", "overwrite", "append"]),
    offset=st.floats(min_value=0.0, max_value=1.0),
    data=st.binary(min_size=1, max_size=64),
)
def test_damaged_captures_are_refused_cleanly(base, target, damage, offset, data):
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / "cap"
        shutil.copytree(base, copy)
        path = copy / target
        content = bytearray(path.read_bytes())
        at = min(int(offset * len(content)), len(content) - 1)
        if damage == "flip":
            content[at] ^= data[0] or 1
        elif damage == "truncate":
            del content[at:]
        elif damage == "overwrite":
            content[at:at + len(data)] = data
        else:
            content += data
        path.write_bytes(bytes(content))
        try:
            _read_everything(copy)
        except CaptureFormatError:
            return
        # Reading succeeded: only possible when the damage left the manifest meaning the same (e.g. whitespace)
        assert target == "manifest.json"
