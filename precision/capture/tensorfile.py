"""Writing one prompt's tensors: safetensors (no pickle), tensors kept in their own dtype (bf16 stays bf16). The
writer lives beside the reader in precision.safetensors_io; this name stays for the backends that import it."""

from __future__ import annotations

from pathlib import Path

from precision.safetensors_io import write_tensors


def write_tensor_file(path: Path, tensors: dict) -> None:
    """Write ``{name: torch.Tensor}`` to ``path``. Tensors are moved to CPU and made contiguous first."""
    write_tensors(path, tensors)
