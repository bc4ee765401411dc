"""Reading a capture directory: validation first, then tensors one at a time (memory bounded by one tensor)."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from precision.capture import manifest as schema
from precision.capture.sites import LOGITS, POSITIONS, site_order
from precision.errors import CaptureFormatError
from precision.model import sha256_file


@dataclass(frozen=True)
class PromptRecord:
    """One prompt of a capture, as listed in the manifest."""

    index: int
    id: str
    category: str
    rendering: str
    prompt_ids: tuple[int, ...]
    continuation_ids: tuple[int, ...]
    """The teacher-forced continuation: the reference's own greedy tokens, fed to every backend."""
    generated_ids: tuple[int, ...]
    """This backend's own free-running greedy continuation."""
    file: str
    sha256: str
    bytes: int
    tensors: dict[str, dict[str, Any]]
    determinism: dict[str, Any] | None = None
    """With repeated runs: {"runs", "tokens_identical", "tensors_identical", "max_relative_l2"}."""

    @property
    def forced_ids(self) -> tuple[int, ...]:
        return self.prompt_ids + self.continuation_ids

    @property
    def sites(self) -> list[str]:
        return site_order([name for name in self.tensors if name != POSITIONS])

    def to_json(self) -> dict:
        return {
            "index": self.index, "id": self.id, "category": self.category, "rendering": self.rendering,
            "prompt_ids": list(self.prompt_ids), "continuation_ids": list(self.continuation_ids),
            "generated_ids": list(self.generated_ids), "file": self.file, "sha256": self.sha256,
            "bytes": self.bytes, "tensors": self.tensors, "determinism": self.determinism,
        }

    @classmethod
    def from_json(cls, data: Any, where: str) -> "PromptRecord":
        if not isinstance(data, dict) or any(k not in data for k in schema.PROMPT_KEYS):
            missing = [k for k in schema.PROMPT_KEYS if not isinstance(data, dict) or k not in data]
            raise CaptureFormatError(f"{where}: prompt entry lacks {missing}; the manifest is damaged, capture again")
        try:
            return cls(
                index=int(data["index"]), id=str(data["id"]), category=str(data["category"]),
                rendering=str(data["rendering"]),
                prompt_ids=tuple(int(t) for t in data["prompt_ids"]),
                continuation_ids=tuple(int(t) for t in data["continuation_ids"]),
                generated_ids=tuple(int(t) for t in data["generated_ids"]),
                file=str(data["file"]), sha256=str(data["sha256"]), bytes=int(data["bytes"]),
                tensors=dict(data["tensors"]),
                determinism=data.get("determinism"),
            )
        except (TypeError, ValueError) as exc:
            raise CaptureFormatError(f"{where}: prompt entry has a value of the wrong type ({exc}); capture again") from exc


class CaptureReader:
    """A validated, complete capture directory. Tensors are read lazily with ``open_tensors``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.manifest = self._load_manifest()
        where = str(self.path / schema.MANIFEST)
        if not isinstance(self.manifest["prompts"], list) or not self.manifest["prompts"]:
            raise CaptureFormatError(f"{where}: 'prompts' must be a non-empty list of prompt entries; the manifest is damaged, capture again")
        self.prompts = [PromptRecord.from_json(p, f"{where} prompts[{i}]") for i, p in enumerate(self.manifest["prompts"])]
        for position, record in enumerate(self.prompts):
            self._check_record(record, position)

    # -- manifest -------------------------------------------------------------------------------------------
    def _load_manifest(self) -> dict:
        if not self.path.is_dir():
            raise CaptureFormatError(f"capture directory {self.path} does not exist; pass the --out directory of a 'precision-check capture' or run")
        manifest_path = self.path / schema.MANIFEST
        if not manifest_path.is_file():
            if (self.path / schema.PROGRESS).exists():
                raise CaptureFormatError(
                    f"{self.path} is an incomplete capture (no manifest.json: it was interrupted); "
                    "rerun the capture with --resume to finish it, or --force to start over"
                )
            raise CaptureFormatError(f"{self.path} is not a capture directory (no manifest.json)")
        try:
            data = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise CaptureFormatError(f"{manifest_path} is corrupted (not valid JSON: {exc}); capture again") from exc
        if not isinstance(data, dict):
            raise CaptureFormatError(f"{manifest_path} is not a JSON object; capture again")
        if data.get("format") != schema.FORMAT_NAME:
            raise CaptureFormatError(f"{manifest_path} is not a precision-check capture manifest (format={data.get('format')!r})")
        from precision.contract import ContractError, document_type, validate

        try:
            document_type(data, str(manifest_path))  # a version this build does not read: the message says which
        except ContractError as exc:
            raise CaptureFormatError(str(exc)) from None
        try:
            validate(data, str(manifest_path))
        except ContractError as exc:
            raise CaptureFormatError(f"{exc}; the capture is damaged, capture again") from None
        return data

    def _check_record(self, record: PromptRecord, position: int) -> None:
        if record.index != position:
            raise CaptureFormatError(f"{self.path}: prompt {record.id!r} is entry {position} of the manifest but says index {record.index}; the manifest is damaged, capture again")
        expected_name = schema.tensor_file_name(record.index)
        if record.file != expected_name:
            # Paths come from a file a user may have edited: only our own naming is accepted, so none escapes.
            raise CaptureFormatError(f"{self.path}: prompt {record.id!r} names tensor file {record.file!r}; expected {expected_name!r}")
        path = self.tensor_path(record)
        if not path.is_file():
            raise CaptureFormatError(f"{path} is missing; the capture of prompt {record.id!r} is incomplete, capture again")
        size = path.stat().st_size
        if size != record.bytes:
            raise CaptureFormatError(f"{path} has {size:,} bytes, the manifest says {record.bytes:,}: the file is truncated or was replaced; capture again")
        self._check_listing(record)

    def _check_listing(self, record: PromptRecord) -> None:
        """The manifest's tensor list must describe a capture of this model: [positions] int64 and, per site,
        [positions, hidden size or vocabulary] in the backend's dtype. Checked before any tensor is read, so a
        damaged or hostile file cannot make the reader allocate what the model does not imply."""
        where = f"{self.path}: prompt {record.id!r}"
        model = self.manifest["model"]
        try:
            hidden, vocab = int(model["hidden_size"]), int(model["vocab_size"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CaptureFormatError(f"{self.path / schema.MANIFEST}: the model record lacks hidden_size/vocab_size ({exc}); capture again") from exc
        float_dtype = schema.SAFETENSORS_DTYPES.get(self.dtype)
        for name, info in record.tensors.items():
            if not isinstance(info, dict) or not isinstance(info.get("shape"), list) or not all(isinstance(d, int) and d >= 0 for d in info["shape"]):
                raise CaptureFormatError(f"{where}: tensor {name!r} has no valid shape in the manifest; capture again")
        positions = record.tensors.get(POSITIONS)
        if positions is None or positions.get("dtype") != "I64" or len(positions["shape"]) != 1:
            raise CaptureFormatError(f"{where}: the manifest lists no int64 'positions' tensor; capture again")
        rows = positions["shape"][0]
        if rows > len(record.forced_ids):
            raise CaptureFormatError(f"{where}: {rows} positions captured from {len(record.forced_ids)} tokens; the manifest is damaged, capture again")
        for name in record.sites:
            info = record.tensors[name]
            width = vocab if name == LOGITS else hidden
            if info["shape"] != [rows, width]:
                raise CaptureFormatError(f"{where}: tensor {name!r} has shape {info['shape']}, a capture of this model has [{rows}, {width}]; capture again")
            if float_dtype is not None and info.get("dtype") != float_dtype:
                raise CaptureFormatError(f"{where}: tensor {name!r} is {info.get('dtype')}, the backend ran in {self.dtype} ({float_dtype}); capture again")

    def records(self, prompt_ids: list[str] | None = None) -> list[PromptRecord]:
        """The prompt records, in capture order, restricted to ``prompt_ids`` when given."""
        if prompt_ids is None:
            return list(self.prompts)
        wanted = set(prompt_ids)
        return [r for r in self.prompts if r.id in wanted]

    # -- facts ------------------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.manifest["model"]["num_layers"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["model"]["vocab_size"])

    @property
    def backend_spec(self) -> str:
        return str(self.manifest["backend"].get("spec", self.manifest["backend"].get("name")))

    @property
    def dtype(self) -> str:
        return str(self.manifest["backend"].get("dtype"))

    def manifest_sha256(self) -> str:
        return sha256_file(self.path / schema.MANIFEST)

    def tensor_path(self, record: PromptRecord) -> Path:
        return self.path / record.file

    # -- tensors ----------------------------------------------------------------------------------------------
    def verify(self, record: PromptRecord) -> None:
        """Check the tensor file's sha256 against the manifest (detects bit flips and swapped files)."""
        path = self.tensor_path(record)
        digest = sha256_file(path)
        if digest != record.sha256:
            raise CaptureFormatError(f"{path}: sha256 {digest[:12]}… differs from the manifest's {record.sha256[:12]}…; the file is corrupted or was replaced; capture again")

    def arrays(self, record: PromptRecord, *, verify: bool = True):
        """The prompt's tensors as numpy, read with plain file reads (precision.capture.arrays.TensorFile)."""
        from precision.capture.arrays import TensorFile

        if verify:
            self.verify(record)
        handle = TensorFile(self.tensor_path(record))
        if handle.names() != set(record.tensors):
            raise CaptureFormatError(f"{handle.path} holds tensors {sorted(handle.names())}, the manifest lists {sorted(record.tensors)}; capture again")
        for name, info in record.tensors.items():
            if list(handle.shape(name)) != info["shape"] or handle.dtype_name(name) != info.get("dtype"):
                raise CaptureFormatError(f"{handle.path}: tensor {name!r} is {handle.dtype_name(name)} {list(handle.shape(name))} in the file, "
                                         f"{info.get('dtype')} {info['shape']} in the manifest; the file was replaced or damaged, capture again")
        return handle

    @contextlib.contextmanager
    def open_tensors(self, record: PromptRecord, *, verify: bool = True) -> Iterator[Any]:
        """A handle whose ``get_tensor(name)`` reads one tensor (as torch, in its stored dtype) from the prompt's
        file: the same checked handle as ``arrays``."""
        yield self.arrays(record, verify=verify)
