"""Output directories that are provably precision-check's own.

Every directory the tool writes results into carries a marker file (``.precision-check``: kind, tool version,
creation time) and, while a command writes there, an OS advisory lock (``.precision-check.lock``, holding the
writer's PID). The rules, for every command:

- A directory that exists, is not empty and has no marker is the user's: it is never written into, resumed or
  cleared, whatever the flags; the message names what is there.
- ``--force`` clears only a marked directory of the same kind, and only the entries that kind is known to write
  (checked for the whole tree before anything is removed: one foreign file anywhere refuses the whole removal).
  The directory itself stays; nothing is ever removed with a blind tree removal.
- An output path is never a filesystem root, the home or working directory or an ancestor of them, and never
  lies in, on or around an input (model, prompts, store, capture).
- Two commands never write one directory at once: the second is told the first one's PID.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from precision.errors import PrecisionError

MARKER = ".precision-check"
LOCK = ".precision-check.lock"
_BOOKKEEPING = {MARKER, LOCK, ".write-test"}

# What each kind of output directory holds: file names, and sub-directories that hold only known things.
# A sub-directory that carries its own marker is removed by its own kind's rules, whatever its name.
_REPORT_FILES = {"comparison.json", "report.html", "summary.md", "summary.json", "msprobe_compare.csv", "regression.json", "regression.md"}
_KNOWN_FILES = {
    "capture": {"manifest.json", "progress.jsonl"},
    "run": {"run.json", *_REPORT_FILES},
    "comparison": _REPORT_FILES,
    "golden-store": {"store.json", "compact.safetensors", "compact.json"},
    "selftest": {"selftest.json"},
    "selftest-case": _REPORT_FILES,
    "fault-checkpoint": set(),  # the names it copied are listed in its marker
}
_CONTAINERS = {"capture": {"tensors"}, "run": {"captures", "envelope"}, "golden-store": {"captures", "envelope"},
               "selftest": {"captures", "envelope", "cases"}}
_TENSOR_FILE = re.compile(r"^\.?\d{4}\.safetensors(\.tmp|\.repeat)?$")
KINDS = tuple(_KNOWN_FILES)


def _tool_version() -> str:
    from precision import __version__

    return __version__


def read_marker(path: Path) -> dict | None:
    """The marker of ``path`` as a dict, or None when there is none (or it is not ours to read)."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    return data if isinstance(data, dict) and data.get("tool") == "precision-check" and data.get("kind") in KINDS else None


def _describe_entries(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _is_within(path: Path, other: Path) -> bool:
    return path == other or other in path.parents


def check_output_path(out: Path, inputs: Iterable[Path | str | None] = ()) -> Path:
    """``out`` resolved, after refusing a filesystem root, the home or working directory (or an ancestor of
    them), and any path in, on or around an input."""
    resolved = Path(out).expanduser().resolve()
    if resolved.parent == resolved:
        raise PrecisionError(f"--out {out} is a filesystem root; choose a new directory for the results")
    for name, protected in (("the working directory", Path.cwd()), ("the home directory", Path.home())):
        protected = protected.resolve()
        if _is_within(protected, resolved):
            raise PrecisionError(f"--out {out} is {name} or one of its parents ({protected}); choose a new directory for the results, e.g. runs/NAME")
    for item in inputs:
        if item is None:
            continue
        source = Path(item).expanduser().resolve()
        if _is_within(resolved, source):
            raise PrecisionError(f"--out {out} lies in the input {item}; precision-check never writes into its inputs, choose another --out")
        if _is_within(source, resolved):
            raise PrecisionError(f"--out {out} contains the input {item}; choose an --out that is not a parent of an input")
    return resolved


@dataclass
class OutputDir:
    """A claimed output directory; the lock is held until ``close``."""

    path: Path
    kind: str
    resumed: bool = False
    _lock_fd: int | None = field(default=None, repr=False)

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __del__(self) -> None:
        self.close()

    def __enter__(self) -> "OutputDir":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def register(self, names: Iterable[str]) -> None:
        """Record top-level entries this kind does not know by name (a fault checkpoint's copied files)."""
        marker = read_marker(self.path) or {}
        marker["entries"] = sorted(set(marker.get("entries", [])) | set(names))
        _write_marker(self.path, marker)


def _write_marker(path: Path, data: dict) -> None:
    from precision.io import write_text_atomic

    write_text_atomic(path / MARKER, json.dumps(data, indent=1) + "\n")


def _acquire_lock(path: Path) -> int:
    lock_path = path / LOCK
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        from precision.io import os_error_message

        raise PrecisionError(os_error_message(exc, path, "locking")) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
            raise PrecisionError(f"{path} is in use by another precision-check process (PID {holder}); wait for it to finish or choose another --out") from exc
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _visible_entries(path: Path) -> list[str]:
    return [p.name for p in path.iterdir() if p.name not in _BOOKKEEPING]


def claim_output_dir(out: Path | str, kind: str, *, force: bool = False, resume: bool = False, complete_marker: str,
                     inputs: Iterable[Path | str | None] = (), can_resume: bool = True) -> OutputDir:
    """Create or take over ``out`` for a result of ``kind`` (see the module docstring for the rules).

    An existing result of this kind is replaced only with ``force``; an unfinished one (no ``complete_marker``)
    is continued only with ``resume``. Returns the claimed directory with its lock held."""
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    out = Path(out)
    check_output_path(out, inputs)
    if out.is_symlink() and not out.exists():
        raise PrecisionError(f"--out {out} is a dangling symbolic link; choose another --out")
    if out.exists() and not out.is_dir():
        raise PrecisionError(f"output path {out} exists and is not a directory; choose another --out")
    if out.is_dir() and read_marker(out) is None and _visible_entries(out):
        raise PrecisionError(f"{out} holds files precision-check did not create ({_describe_entries(_visible_entries(out))}); "
                             "it is never overwritten, resumed or cleared: choose a new or empty --out directory")
    if out.is_dir() and read_marker(out) is not None:
        _refuse_foreign_contents(out)  # before the lock file is made: a forged marker must not earn a write
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        from precision.io import os_error_message

        raise PrecisionError(os_error_message(exc, out, "creating")) from exc
    fd = _acquire_lock(out)
    try:
        resumed = _settle_existing(out, kind, force=force, resume=resume, complete_marker=complete_marker, can_resume=can_resume)
        marker = read_marker(out) if resumed else None
        _write_marker(out, marker or {"tool": "precision-check", "kind": kind, "tool_version": _tool_version(),
                                      "created_at": _now(), "entries": []})
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        os.close(fd)
        from precision.io import os_error_message

        raise PrecisionError(os_error_message(exc, out, "creating")) from exc
    except BaseException:
        os.close(fd)
        raise
    return OutputDir(out, kind, resumed, fd)


def claim_for_update(out: Path | str, kinds: tuple[str, ...], *, new_kind: str, inputs: Iterable[Path | str | None] = ()) -> OutputDir:
    """Lock ``out`` to add or refresh derived files (a report, a regression) in a result directory of one of
    ``kinds``; a new or empty directory is created as ``new_kind``; anything else is refused."""
    out = Path(out)
    check_output_path(out, inputs)
    marker = read_marker(out) if out.is_dir() else None
    if marker is None:
        return claim_output_dir(out, new_kind, complete_marker="summary.json", inputs=inputs)
    if marker["kind"] not in kinds:
        raise PrecisionError(f"{out} holds a precision-check {marker['kind']} result; write into a run or comparison directory, or a new --out")
    return OutputDir(out, marker["kind"], True, _acquire_lock(out))


def _now() -> str:
    from precision.environment import utc_now

    return utc_now()


def _settle_existing(out: Path, kind: str, *, force: bool, resume: bool, complete_marker: str, can_resume: bool) -> bool:
    """Under the lock: decide what to do with what ``out`` holds. Returns True when an unfinished result is resumed."""
    entries = _visible_entries(out)
    marker = read_marker(out)
    if not entries:
        return False
    if marker is None:  # files appeared between the first look and the lock
        raise PrecisionError(f"{out} holds files precision-check did not create ({_describe_entries(entries)}); choose a new or empty --out directory")
    if marker["kind"] != kind:
        raise PrecisionError(f"{out} holds a precision-check {marker['kind']} result, not a {kind}; choose another --out")
    _refuse_foreign_contents(out)
    complete = (out / complete_marker).exists()
    if force:
        remove_owned_contents(out)
        return False
    if resume and not complete and can_resume:
        return True
    if complete:
        raise PrecisionError(f"{out} already holds a finished {kind} result; pass --force to replace it or choose another --out")
    hint = "pass --resume to continue it or --force to start over" if can_resume else "pass --force to start over"
    raise PrecisionError(f"{out} holds an unfinished {kind} result; {hint}")


def _removal_plan(path: Path, kind: str, marker: dict | None, plan: list[Path], foreign: list[str]) -> None:
    """Append to ``plan`` everything under ``path`` that ``kind`` is known to write, children before their
    directory; append to ``foreign`` everything else. ``marker`` is None for a container sub-directory."""
    if marker is None:
        known = set()
    else:
        known = _KNOWN_FILES[kind] | set(marker.get("entries", [])) | _BOOKKEEPING
    for entry in path.iterdir():
        name = entry.name
        if entry.is_dir() and not entry.is_symlink():
            child = read_marker(entry)
            if child is not None:
                _removal_plan(entry, child["kind"], child, plan, foreign)
            elif name in _CONTAINERS.get(kind, set()):
                _removal_plan(entry, kind, None, plan, foreign)
            else:
                foreign.append(str(entry))
                continue
            plan.append(entry)
        elif name in known or (name.startswith(".") and name.endswith(".tmp") and name[1:-4] in known) \
                or (kind == "capture" and marker is None and _TENSOR_FILE.match(name)):
            plan.append(entry)
        else:
            foreign.append(str(entry))


def _refuse_foreign_contents(path: Path) -> list[Path]:
    """What the marked directory ``path`` holds that its kind writes (children before their directory); refuses,
    naming them, when anything there is not known to be the tool's."""
    marker = read_marker(path)
    if marker is None:
        raise PrecisionError(f"{path} has no precision-check marker; it is not cleared")
    plan: list[Path] = []
    foreign: list[str] = []
    _removal_plan(path, marker["kind"], marker, plan, foreign)
    if foreign:
        raise PrecisionError(f"{path} is marked as a precision-check {marker['kind']} directory but also holds files it did not write "
                             f"({_describe_entries(foreign)}); nothing there is changed: move those away or choose another --out")
    return plan


def remove_owned_contents(path: Path) -> None:
    """Remove what precision-check wrote in the marked directory ``path`` (its own lock file aside), after
    checking the whole tree: if anything there is not known to be the tool's, nothing is removed."""
    for entry in _refuse_foreign_contents(path):  # children before their parents: the plan lists a directory after its contents
        if entry == path / LOCK:
            continue
        if entry.is_dir() and not entry.is_symlink():
            entry.rmdir()
        else:
            entry.unlink(missing_ok=True)
