"""Reading tensors of a safetensors file into numpy with plain file reads, a tensor or a block of rows at a time.

Why not safetensors' own loader here: it memory-maps the whole file, and every page it touches counts in the
process's memory for as long as the file is open (about 1 GB for one 2048-position prompt of a 32-layer model).
Explicit reads keep the comparison's memory at the arrays it holds. bf16 and fp16 become float32 (exactly);
float32 and float64 stay as they are. The header is checked against the file's size before any offset is used.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from precision.errors import CaptureFormatError

_DTYPES = {"BF16": (np.uint16, 2), "F16": (np.float16, 2), "F32": (np.float32, 4), "F64": (np.float64, 8), "I64": (np.int64, 8), "I32": (np.int32, 4)}


class TensorFile:
    """Random access to the tensors of one safetensors file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CaptureFormatError(f"{self.path} is too short for a safetensors file; capture again")
            length = int.from_bytes(prefix, "little")
            if length <= 0 or 8 + length > size:
                raise CaptureFormatError(f"{self.path}: safetensors header length {length} does not fit the file; it is truncated or damaged")
            try:
                header = json.loads(handle.read(length))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise CaptureFormatError(f"{self.path}: unreadable safetensors header ({exc}); capture again") from exc
        self._base = 8 + length
        self._tensors = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype, width = _DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                start, stop = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as exc:
                raise CaptureFormatError(f"{self.path}: tensor {name!r} has an unsupported or damaged header entry ({exc})") from exc
            if stop - start != width * int(np.prod(shape, dtype=np.int64)) or self._base + stop > size or start < 0:
                raise CaptureFormatError(f"{self.path}: tensor {name!r} lies outside the file or has the wrong size; capture again")
            self._tensors[name] = (dtype, width, shape, self._base + start)

    def names(self) -> set[str]:
        return set(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._tensors[name][2]

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) along the first axis, as float32 for bf16/fp16 tensors."""
        dtype, width, shape, offset = self._tensors[name]
        row_elements = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
        stop = min(stop, shape[0]) if shape else 1
        count = max(stop - start, 0) * row_elements
        raw = np.empty(count, dtype=dtype)
        with open(self.path, "rb", buffering=0) as handle:
            handle.seek(offset + start * row_elements * width)
            read = handle.readinto(memoryview(raw).cast("B"))
        if read != count * width:
            raise CaptureFormatError(f"{self.path}: tensor {name!r} is cut short; capture again")
        array = _widen(raw, dtype)
        return array.reshape((max(stop - start, 0),) + tuple(shape[1:])) if shape else array.reshape(())

    def array(self, name: str) -> np.ndarray:
        shape = self.shape(name)
        return self.rows(name, 0, shape[0]) if shape else self.rows(name, 0, 1)


def _widen(raw: np.ndarray, dtype) -> np.ndarray:
    if dtype is np.uint16:  # bf16: the top half of a float32
        return (raw.astype(np.uint32) << 16).view(np.float32)
    if dtype is np.float16:
        return raw.astype(np.float32)
    return raw

