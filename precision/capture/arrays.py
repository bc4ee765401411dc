"""A capture's tensor files, read with the package's one safetensors reader (precision.safetensors_io): a tensor
or a block of rows at a time, with plain file reads so that memory holds only the arrays a comparison keeps. bf16
and fp16 become float32 (exactly); float32 and float64 stay as they are. Damage is a CaptureFormatError."""

from __future__ import annotations

from pathlib import Path

from precision.errors import CaptureFormatError
from precision.safetensors_io import SafetensorsFile


class TensorFile(SafetensorsFile):
    """Random access to the tensors of one capture file (``rows``, ``array`` as numpy; ``get_tensor`` as torch)."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path, error=CaptureFormatError, fix="capture again")
