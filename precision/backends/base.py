"""The backend contract: what every engine (transformers, vLLM, ...) implements to be captured.

A backend is used as a context manager: ``with backend:`` activates it (loads the model), and leaving the block
deactivates it (frees the model, removes hooks). Public methods check the state and call ``_*_impl`` methods that
subclasses write, in the manner of Polygraphy's runners.

Contract of ``capture``: run ONE forward pass over exactly ``token_ids`` (prompt + teacher-forced continuation),
and write a safetensors file at ``path`` holding, for the positions ``selection`` keeps, the sites named in
precision.capture.sites in the backend's dtype, plus the int64 ``positions`` tensor. Writing the file inside the
backend lets engines that run the model in another process save there and return only the path.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from precision.capture.sites import CaptureSelection
from precision.errors import BackendError
from precision.model import ModelInfo

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass(frozen=True)
class BackendSpec:
    """``name[:device][:dtype]``, e.g. ``hf:cpu:bf16``, ``hf:cuda:bf16``, ``vllm``, ``vllm:cpu:bf16``."""

    name: str
    device: str | None = None
    dtype: str | None = None  # one of DTYPES' keys

    def __str__(self) -> str:
        return ":".join(part for part in (self.name, self.device, self.dtype) if part)

    @property
    def torch_dtype_name(self) -> str:
        return DTYPES[self.dtype or "bf16"]


@dataclass(frozen=True)
class BackendOptions:
    """Settings shared by all backends; engine-specific options travel in ``engine_args``."""

    seed: int = 0
    trust_remote_code: bool = False
    engine_args: dict[str, Any] = field(default_factory=dict)
    max_model_len: int | None = None
    variants: tuple[str, ...] = ()
    """Implementation variants or planted faults (precision.backends.variants); transformers backend only."""


class Backend(abc.ABC):
    """Base class of all backends. Subclasses implement the ``_*_impl`` methods."""

    name: str = "base"

    def __init__(self, spec: BackendSpec, model: ModelInfo, options: BackendOptions | None = None) -> None:
        self.spec = spec
        self.model = model
        self.options = options or BackendOptions()
        self._active = False
        self._entered = 0

    def __enter__(self) -> "Backend":
        # Re-entrant: capture() enters the backend it is given, and a caller that already holds it active
        # (tests, notebooks keeping one engine up) must find it still active afterwards.
        if self._entered == 0:
            self.activate()
        self._entered += 1
        return self

    def __exit__(self, *exc_info) -> None:
        self._entered -= 1
        if self._entered == 0:
            self.deactivate()

    def validate(self) -> None:
        """Check the settings without loading anything (run before any model loads); engines override it."""
        if self.options.engine_args:
            raise BackendError(f"engine arguments {sorted(self.options.engine_args)} apply to the vLLM backend; {self.spec} has no engine to pass them to")

    @property
    def is_active(self) -> bool:
        return self._active

    def activate(self) -> None:
        if not self._active:
            self._activate_impl()
            self._active = True

    def deactivate(self) -> None:
        if self._active:
            self._active = False
            self._deactivate_impl()

    def _require_active(self) -> None:
        if not self._active:
            raise BackendError(f"backend {self.spec} is not active; use it inside 'with backend:'")

    def generate(self, token_ids: Sequence[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation (argmax at every step) of at most ``max_new_tokens`` tokens, stopping after
        any of the model's stop tokens (included). Returns only the new token ids."""
        self._require_active()
        return [int(t) for t in self._generate_impl(list(token_ids), max_new_tokens)]

    def capture(self, token_ids: Sequence[int], selection: CaptureSelection, path: Path) -> None:
        """One forward pass over ``token_ids``; writes the selected sites to ``path`` (see module docstring)."""
        self._require_active()
        self._capture_impl(list(token_ids), selection, Path(path))

    def prepare(self, planned: list[tuple[Sequence[int], Sequence[int] | None, int]], selection: CaptureSelection) -> None:
        """Told, before a capture run, every prompt it will ask for in order: (prompt ids, the continuation to force
        or None, max new tokens), and the selection. Engines that compute many prompts together (the layer-by-layer
        backends) use it; the others ignore it."""

    def describe(self) -> dict[str, Any]:
        """Settings, device and library versions to record in the capture manifest."""
        return {"name": self.name, "spec": str(self.spec), **self._describe_impl()}

    @abc.abstractmethod
    def _activate_impl(self) -> None: ...

    @abc.abstractmethod
    def _deactivate_impl(self) -> None: ...

    @abc.abstractmethod
    def _generate_impl(self, token_ids: list[int], max_new_tokens: int) -> Sequence[int]: ...

    @abc.abstractmethod
    def _capture_impl(self, token_ids: list[int], selection: CaptureSelection, path: Path) -> None: ...

    @abc.abstractmethod
    def _describe_impl(self) -> dict[str, Any]: ...
