"""Reading tensors of a safetensors file into numpy with plain file reads, a tensor or a block of rows at a time.

Why not safetensors' own loader here: it memory-maps the whole file, and every page it touches counts in the
process's memory for as long as the file is open (about 1 GB for one 2048-position prompt of a 32-layer model).
Explicit reads keep the comparison's memory at the arrays it holds. bf16 and fp16 become float32 (exactly);
float32 and float64 stay as they are. The header is checked against the file's size before any offset is used.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from precision.errors import CaptureFormatError

_MAX_HEADER_BYTES = 100 << 20
"""safetensors' own limit on the JSON header; a longer length field means a damaged or hostile file."""
_MAX_READ_BYTES = 1 << 30
"""Linux returns at most 2,147,479,552 bytes from one read(); tensors are read in pieces of at most this size."""
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
            if length <= 0 or length > _MAX_HEADER_BYTES or 8 + length > size:
                raise CaptureFormatError(f"{self.path}: safetensors header length {length} does not fit the file; it is truncated or damaged")
            try:
                header = json.loads(handle.read(length))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
                raise CaptureFormatError(f"{self.path}: unreadable safetensors header ({exc}); capture again") from exc
        if not isinstance(header, dict):
            raise CaptureFormatError(f"{self.path}: the safetensors header is not a JSON object; capture again")
        self._base = 8 + length
        self._tensors = {}
        self._dtype_names: dict[str, str] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype_name = info["dtype"]
                dtype, width = _DTYPES[dtype_name]
                shape = tuple(int(d) for d in info["shape"])
                start, stop = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as exc:
                raise CaptureFormatError(f"{self.path}: tensor {name!r} has an unsupported or damaged header entry ({exc})") from exc
            if any(d < 0 for d in shape) or stop - start != width * math.prod(shape) or self._base + stop > size or start < 0:
                raise CaptureFormatError(f"{self.path}: tensor {name!r} lies outside the file or has the wrong size; capture again")
            self._tensors[name] = (dtype, width, shape, self._base + start)
            self._dtype_names[name] = dtype_name

    def names(self) -> set[str]:
        return set(self._tensors)

    def dtype_name(self, name: str) -> str:
        """The tensor's safetensors dtype, e.g. "BF16"."""
        return self._dtype_names[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._tensors[name][2]

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) along the first axis, as float32 for bf16/fp16 tensors."""
        dtype, width, shape, offset = self._tensors[name]
        row_elements = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
        stop = min(stop, shape[0]) if shape else 1
        count = max(stop - start, 0) * row_elements
        raw = np.empty(count, dtype=dtype)
        buffer = memoryview(raw).cast("B")
        with open(self.path, "rb", buffering=0) as handle:
            handle.seek(offset + start * row_elements * width)
            done = 0
            while done < len(buffer):
                read = handle.readinto(buffer[done:done + _MAX_READ_BYTES])
                if not read:
                    raise CaptureFormatError(f"{self.path}: tensor {name!r} is cut short; capture again")
                done += read
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

