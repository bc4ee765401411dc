"""Writing one prompt's tensors: safetensors (no pickle), tensors kept in their own dtype (bf16 stays bf16)."""

from __future__ import annotations

from pathlib import Path


def write_tensor_file(path: Path, tensors: dict) -> None:
    """Write ``{name: torch.Tensor}`` to ``path``. Tensors are moved to CPU and made contiguous first."""
    from safetensors.torch import save_file

    save_file({name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}, str(path))
