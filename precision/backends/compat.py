"""What the engine-compatibility modules (vllm_compat, transformers_compat) share: reading an installed
version without importing the engine, comparing it with a tested range, and the one wording of a missing API."""

from __future__ import annotations

import logging
from importlib import metadata

from precision.errors import BackendError

log = logging.getLogger(__name__)


def distribution_version(*names: str) -> str | None:
    """The version of the first installed distribution among ``names``, from its metadata (no import)."""
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def in_range(version: str, tested: str) -> bool:
    """Whether ``version`` is inside the specifier set ``tested``; a local label (0.32.0+cpu) or a pre- or
    development release of a version counts as that version."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        return SpecifierSet(tested).contains(Version(Version(version).base_version))
    except InvalidVersion:
        return False


def warn_if_untested(engine: str, version: str, tested: str) -> bool:
    """True inside ``tested``; outside it logs a warning and returns False (the run goes on: every API is
    checked where it is used)."""
    if in_range(version, tested):
        return True
    log.warning("%s %s is outside the versions precision-check was tested with (%s); each API it uses is checked "
                "where it is used (docs/engine-compat.md lists them)", engine, version, tested)
    return False


def missing_api_error(engine: str, version: str | None, tested: str, api: str, install: str, detail: str = "") -> BackendError:
    return BackendError(
        f"{engine} {version or '(version unknown)'} has no {api}{': ' + detail if detail else ''}; precision-check "
        f"was tested with {engine} {tested}: install a tested version ({install}); docs/engine-compat.md says what "
        "this API is used for"
    )
