"""The package's one safetensors reader: header parsing and checks, and tensor reads, with plain file reads.

Why not safetensors' own loader: it memory-maps the whole file, and every page it touches counts in the process's
memory for as long as the file is open (about 1 GB for one 2048-position prompt of a 32-layer model). Explicit
reads keep memory at the arrays a caller holds. Writing stays with safetensors' ``save_file``.

The header is checked as safetensors checks it before any offset is used: a length that fits the file and its
100 MB cap, a JSON object, a known dtype, a non-negative shape whose size matches its byte range, and byte ranges
that tile the data section exactly. Every refusal raises the caller's error class (capture or model) with
"<path> is not a readable safetensors file: <what>; <how to fix>".
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from precision.errors import PrecisionError

MAX_HEADER_BYTES = 100 << 20
"""safetensors' own limit on the JSON header; a longer length field means a damaged or hostile file."""
MAX_READ_BYTES = 1 << 30
"""Linux returns at most 2,147,479,552 bytes from one read(); tensors are read in pieces of at most this size."""
STORAGE = {
    "BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "F8_E4M3": np.uint8, "F8_E5M2": np.uint8,
    "I16": np.int16, "U16": np.uint16, "F16": np.float16, "BF16": np.uint16,
    "I32": np.int32, "U32": np.uint32, "F32": np.float32,
    "I64": np.int64, "U64": np.uint64, "F64": np.float64,
}
"""safetensors dtype -> the numpy dtype its bytes are read into (bf16 and fp8, which numpy lacks, as raw bits)."""
NUMPY_READABLE = {"BF16", "F16", "F32", "F64", "I64", "I32"}
"""Dtypes ``rows`` and ``array`` return as numpy (bf16 and fp16 widened to float32, exactly): a capture's."""
_TORCH_BITS = {"BF16": ("bfloat16", np.int16), "F8_E4M3": ("float8_e4m3fn", np.uint8), "F8_E5M2": ("float8_e5m2", np.uint8)}
"""Dtypes numpy has no type for: their bits become a torch tensor of this dtype."""


class SafetensorsFile:
    """Random access to the tensors of one safetensors file, checked on opening.

    ``error`` is the exception class raised for a damaged or hostile file and ``fix`` the advice that ends its
    message ("capture again" for a capture, "replace it with an intact copy of the checkpoint" for a model)."""

    def __init__(self, path: str | Path, *, error: type[PrecisionError] = PrecisionError, fix: str = "replace the file") -> None:
        self.path = Path(path)
        self._error, self._fix = error, fix
        header, self._base, size = self._read_header()
        self._tensors: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            if name != "__metadata__":
                self._tensors[name] = self._entry(name, info)
        self._check_tiling(size - self._base)

    def _refuse(self, problem: str) -> PrecisionError:
        return self._error(f"{self.path} is not a readable safetensors file: {problem}; {self._fix}")

    def _read_header(self) -> tuple[dict, int, int]:
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as handle:
                prefix = handle.read(8)
                if len(prefix) < 8:
                    raise self._refuse("it is too short for a safetensors file")
                length = int.from_bytes(prefix, "little")
                if length <= 0 or length > MAX_HEADER_BYTES or 8 + length > size:
                    raise self._refuse(f"safetensors header length {length} does not fit the file (it is truncated or damaged)")
                raw = handle.read(length)
        except OSError as exc:
            raise self._refuse(f"it cannot be read ({exc})") from exc
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise self._refuse(f"unreadable safetensors header ({exc})") from exc
        if not isinstance(header, dict):
            raise self._refuse("the safetensors header is not a JSON object")
        return header, 8 + length, size

    def _entry(self, name: str, info) -> tuple[str, tuple[int, ...], int, int]:
        try:
            dtype_name = info["dtype"]
            width = np.dtype(STORAGE[dtype_name]).itemsize
            shape = tuple(_integer(d) for d in info["shape"])
            start, stop = (_integer(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise self._refuse(f"tensor {name!r} has an unsupported or damaged header entry ({type(exc).__name__}: {exc})") from exc
        if any(d < 0 for d in shape) or start < 0 or stop - start != width * math.prod(shape):
            raise self._refuse(f"tensor {name!r} has the wrong size for its shape {list(shape)} and dtype {dtype_name}")
        return dtype_name, shape, start, stop

    def _check_tiling(self, data_bytes: int) -> None:
        """The byte ranges must cover the data section exactly, one after the other (as safetensors requires), so
        no tensor lies outside the file or overlaps another."""
        end = 0
        for name, (_, _, start, stop) in sorted(self._tensors.items(), key=lambda item: (item[1][2], item[1][3])):
            if start != end:
                raise self._refuse(f"tensor {name!r} lies outside the file, overlaps another or leaves a gap (bytes {start}..{stop})")
            end = stop
        if end != data_bytes:
            raise self._refuse(f"the tensors cover {end:,} bytes of a {data_bytes:,}-byte data section (the file is cut short or has extra bytes)")

    # -- what the header says -----------------------------------------------------------------------------------
    def byte_range(self, name: str) -> tuple[int, int]:
        """(offset in the file, byte count) of tensor ``name``'s data, as the checked header gives it."""
        _, _, start, stop = self._tensors[name]
        return self._base + start, stop - start

    def names(self) -> set[str]:
        return set(self._tensors)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def dtype_name(self, name: str) -> str:
        """The tensor's safetensors dtype, e.g. "BF16"."""
        return self._tensors[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._tensors[name][1]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: entry[1] for name, entry in self._tensors.items()}

    # -- tensor data --------------------------------------------------------------------------------------------
    def _raw(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) along the first axis in their stored bits, flat."""
        dtype_name, shape, offset, _ = self._tensors[name]
        dtype = np.dtype(STORAGE[dtype_name])
        row_elements = math.prod(shape[1:]) if shape else 1
        rows = max(min(stop, shape[0]) - start, 0) if shape else 1
        raw = np.empty(rows * row_elements, dtype=dtype)
        buffer = memoryview(raw).cast("B")
        with open(self.path, "rb", buffering=0) as handle:
            handle.seek(self._base + offset + start * row_elements * dtype.itemsize)
            done = 0
            while done < len(buffer):
                read = handle.readinto(buffer[done:done + MAX_READ_BYTES])
                if not read:
                    raise self._refuse(f"tensor {name!r} is cut short")
                done += read
        return raw

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) along the first axis as numpy, float32 for bf16/fp16 tensors (widened exactly)."""
        dtype_name, shape = self.dtype_name(name), self.shape(name)
        if dtype_name not in NUMPY_READABLE:
            raise self._refuse(f"tensor {name!r} is {dtype_name}, which is read as torch only")
        array = _widen(self._raw(name, start, stop), dtype_name)
        if not shape:
            return array.reshape(())
        return array.reshape((max(min(stop, shape[0]) - start, 0),) + tuple(shape[1:]))

    def array(self, name: str) -> np.ndarray:
        shape = self.shape(name)
        return self.rows(name, 0, shape[0] if shape else 1)

    def get_tensor(self, name: str):
        """The whole tensor as a torch tensor in its stored dtype (bf16 stays bf16), as safetensors' get_tensor."""
        import torch

        dtype_name, shape = self.dtype_name(name), self.shape(name)
        raw = self._raw(name, 0, shape[0] if shape else 1)
        if dtype_name in _TORCH_BITS:
            torch_dtype, bits = _TORCH_BITS[dtype_name]
            tensor = torch.from_numpy(raw.view(bits)).view(getattr(torch, torch_dtype))
        else:
            tensor = torch.from_numpy(raw)
        return tensor.reshape(shape)

    def tensors(self) -> dict:
        """Every tensor, as torch, keyed by name (safetensors.torch.load_file's result)."""
        return {name: self.get_tensor(name) for name in self._tensors}


def _integer(value) -> int:
    """A JSON integer; floats and booleans in a shape or an offset mean a damaged header."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{value!r} is not an integer")
    return value


def _widen(raw: np.ndarray, dtype_name: str) -> np.ndarray:
    if dtype_name == "BF16":  # the top half of a float32
        return (raw.astype(np.uint32) << 16).view(np.float32)
    if dtype_name == "F16":
        return raw.astype(np.float32)
    return raw


def write_tensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Write ``{name: torch.Tensor}`` to ``path`` with safetensors' own writer (no pickle), each tensor in its own
    dtype (bf16 stays bf16), moved to the CPU and made contiguous first."""
    from safetensors.torch import save_file

    save_file({name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}, str(path), metadata=metadata)
