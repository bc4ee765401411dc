"""Backends by name. A backend module is imported only when its name is chosen, so that
``precision-check --help`` and ``--target hf`` never import vLLM."""

from __future__ import annotations

import difflib
import importlib
from typing import TYPE_CHECKING

from precision.backends.base import DTYPES, Backend, BackendOptions, BackendSpec
from precision.errors import BackendError

if TYPE_CHECKING:
    from precision.model import ModelInfo

# name -> "module:Class"; aliases point at the same entry.
_REGISTRY = {
    "hf": "precision.backends.hf:TransformersBackend",
    "vllm": "precision.backends.vllm:VllmBackend",
    "hf-layers": "precision.backends.layerwise:LayerwiseBackend",
    "hf-streamed": "precision.backends.layerwise:StreamedBackend",
}
_ALIASES = {"transformers": "hf"}
_DEVICES = ("cpu", "cuda", "npu")


def backend_names() -> list[str]:
    return sorted(_REGISTRY)


def parse_spec(text: str) -> BackendSpec:
    """Parse ``name[:device][:dtype]``; device and dtype may come in either order after the name."""
    parts = [p.strip().lower() for p in text.split(":")] if text else [""]
    name = _ALIASES.get(parts[0], parts[0])
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY) + list(_ALIASES), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise BackendError(f"unknown backend {parts[0]!r} in {text!r}; known backends: {', '.join(backend_names())}.{hint}")
    device = dtype = None
    for part in parts[1:]:
        if part in DTYPES:
            dtype = part
        elif part in _DEVICES or part.startswith(("cuda", "npu")):
            device = part
        else:
            close = difflib.get_close_matches(part, list(DTYPES) + list(_DEVICES), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise BackendError(f"backend spec {text!r}: {part!r} is neither a device ({', '.join(_DEVICES)}) nor a dtype ({', '.join(DTYPES)}).{hint}")
    return BackendSpec(name=name, device=device, dtype=dtype)


def create_backend(spec: BackendSpec | str, model: "ModelInfo", options: BackendOptions | None = None) -> Backend:
    if isinstance(spec, str):
        spec = parse_spec(spec)
    module_name, class_name = _REGISTRY[spec.name].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(spec, model, options)


__all__ = ["Backend", "BackendOptions", "BackendSpec", "backend_names", "create_backend", "parse_spec"]
