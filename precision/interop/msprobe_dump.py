"""Reading an msprobe dump: where its dump.json files are, which module calls they hold, and their tensors.

msprobe (mindstudio-probe) writes, per step and rank, ``DUMP/step<S>/<rank<R> or proc<PID>>/dump.json`` beside
``dump_tensor_data/`` (one file per tensor: ``.pt`` from PyTorch, ``.npy`` from MindSpore). dump.json holds
``task`` ("tensor", "statistics", "md5"), ``level`` ("L0" module level, "L1" API level, "mix" both, "L2" kernels)
and ``data``: one entry per call, keyed ``Module.<module path>.<class>.forward.<call index>`` at module level, with
``input_args``, ``input_kwargs``, ``output`` and ``parameters``; a tensor there is a dict whose ``data_name`` names
its file. This module reads that layout (mindstudio-probe 26.2.0); it imports nothing of msprobe.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from precision.errors import PrecisionError

DUMP_JSON = "dump.json"
TENSOR_DIR = "dump_tensor_data"
TENSOR_TASK = "tensor"
MODULE_LEVELS = ("L0", "mix")
"""Levels whose dumps hold module calls: L0 (modules only) and mix (modules and APIs)."""

_MODULE_CALL = re.compile(r"^Module\.(?P<path>.+)\.(?P<cls>[^.]+)\.forward\.(?P<call>\d+)$")
_STEP = re.compile(r"^step(\d+)$")
_SAFE_FILE = re.compile(r"^[A-Za-z0-9_.\-]+\.(pt|npy)$")


class DumpError(PrecisionError):
    """An msprobe dump that cannot be imported; the message names the problem and the fix."""


@dataclass(frozen=True)
class ModuleCall:
    """One forward call of one module, as dump.json lists it."""

    key: str
    path: str
    """The module's path in the model, e.g. ``model.layers.3``."""
    cls: str
    call: int
    entry: dict = field(repr=False)

    def output_tensors(self) -> list[dict]:
        """The tensor records of the call's output, in order (nested lists and dicts flattened, None skipped)."""
        return [t for t in _tensor_records(self.entry.get("output"))]

    def input_tensors(self) -> list[dict]:
        return [t for t in _tensor_records(self.entry.get("input_args"))]

    def kwarg_tensor(self, name: str) -> dict | None:
        kwargs = self.entry.get("input_kwargs")
        value = kwargs.get(name) if isinstance(kwargs, dict) else None
        return value if _is_tensor(value) else None


def _is_tensor(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("data_name"), str) and "shape" in value


def _tensor_records(value: Any) -> list[dict]:
    if _is_tensor(value):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensor_records(item)]
    if isinstance(value, dict) and "type" not in value:  # a model output dict (last_hidden_state, ...)
        return [t for item in value.values() for t in _tensor_records(item)]
    return []


@dataclass
class RankDump:
    """One dump.json and its tensor directory: the calls of one step on one rank."""

    path: Path
    step: int | None
    task: str
    level: str
    framework: str
    calls: list[ModuleCall]

    @property
    def directory(self) -> Path:
        return self.path.parent

    def tensor_file(self, record: dict) -> Path:
        """The file a dump.json tensor record names, which must exist."""
        name = record["data_name"]
        if not _SAFE_FILE.match(name):  # a name from a file we did not write: never a path out of the directory
            raise DumpError(f"{self.path}: tensor file name {name!r} is not a plain .pt or .npy file name; the dump is damaged, dump again")
        file = self.directory / TENSOR_DIR / name
        if not file.is_file():
            raise DumpError(f"{file} is missing (dump.json lists it); copy the whole dump directory, dump_tensor_data/ included, "
                            "or dump again with task \"tensor\"")
        return file

    def load(self, record: dict):
        """The tensor a dump.json record names, as torch: ``.pt`` through torch.load(weights_only=True) (no pickle
        code runs), ``.npy`` through numpy.load(allow_pickle=False)."""
        import torch

        file = self.tensor_file(record)
        name = file.name
        try:
            if name.endswith(".npy"):
                import numpy as np

                tensor = torch.from_numpy(np.load(file, allow_pickle=False))
            else:
                tensor = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch and numpy raise many types for a damaged file; all mean the same here
            raise DumpError(f"{file} cannot be read as a tensor ({type(exc).__name__}: {exc}); the dump is damaged, dump again") from exc
        if not isinstance(tensor, torch.Tensor):
            raise DumpError(f"{file} holds a {type(tensor).__name__}, not a tensor; the dump is damaged, dump again")
        if list(tensor.shape) != list(record.get("shape", [])):
            raise DumpError(f"{file} has shape {list(tensor.shape)}, dump.json says {record.get('shape')}; the dump is damaged, dump again")
        return tensor


def find_dumps(dump_dir: str | Path) -> list[RankDump]:
    """The dump.json files of DUMP_DIR (the dump_path, one step directory or one rank directory), one per step,
    in step order. More than one rank per step is refused: pass one rank's directory."""
    root = Path(dump_dir)
    if not root.is_dir():
        raise DumpError(f"msprobe dump directory {root} does not exist; pass the dump_path of the msprobe config "
                        "(or one of its step<N>/ or step<N>/rank<R>/ directories)")
    found = sorted({p.resolve() for pattern in (DUMP_JSON, f"*/{DUMP_JSON}", f"*/*/{DUMP_JSON}") for p in root.glob(pattern)})
    if not found:
        raise DumpError(f"{root} holds no {DUMP_JSON} (looked in it and two levels down); pass an msprobe dump directory "
                        "written by PrecisionDebugger with task \"tensor\"")
    by_step: dict[int | None, list[Path]] = {}
    for path in found:
        by_step.setdefault(_step_of(path, root), []).append(path)
    for step, paths in by_step.items():
        if len(paths) > 1:
            ranks = ", ".join(p.parent.name for p in paths)
            raise DumpError(f"{root} holds {len(paths)} ranks for step {step} ({ranks}); precision-check imports one rank's view "
                            f"(tensor-parallel ranks hold the same residual stream): pass one of them, e.g. {paths[0].parent}")
    return [_read_dump(paths[0], step) for step, paths in sorted(by_step.items(), key=lambda item: -1 if item[0] is None else item[0])]


def _step_of(path: Path, root: Path) -> int | None:
    for part in (path.parent.parent.name, path.parent.name):
        match = _STEP.match(part)
        if match:
            return int(match.group(1))
    return None


def _read_dump(path: Path, step: int | None) -> RankDump:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise DumpError(f"{path} cannot be read as JSON ({exc}); the dump is damaged, dump again") from exc
    if not isinstance(data, dict) or not isinstance(data.get("data"), dict):
        raise DumpError(f"{path} is not an msprobe dump.json (no 'data' object)")
    task, level = str(data.get("task")), str(data.get("level"))
    if task != TENSOR_TASK:
        raise DumpError(f"{path} was dumped with task {task!r}, which keeps {'statistics' if task == 'statistics' else 'no tensors'} only; "
                        "dump again with \"task\": \"tensor\" (and \"level\": \"L0\")")
    if level not in MODULE_LEVELS:
        raise DumpError(f"{path} is a level {level!r} dump (API or kernel calls, not modules); dump again with \"level\": \"L0\" "
                        "(module level: decoder layers, norms, lm_head)")
    calls = []
    for key, entry in data["data"].items():
        match = _MODULE_CALL.match(key)
        if match and isinstance(entry, dict):
            calls.append(ModuleCall(key, match.group("path"), match.group("cls"), int(match.group("call")), entry))
    return RankDump(path=path, step=step, task=task, level=level, framework=str(data.get("framework", "unknown")), calls=calls)
