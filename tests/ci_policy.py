"""CI runs every test: under CI, a skipped test fails the session unless an allow-list names it with a reason.

A skip is how a test that could not run looks like a success in a summary line ("1 skipped"), so on a machine
that is meant to have everything (CI) each skip must be either fixed or written down with why it is acceptable.
"""

from __future__ import annotations

import fnmatch
import os

import pytest

# Values of CI that mean "not CI" (CI services set CI=true; a developer may export CI=0 to opt out).
_NOT_CI = {"", "0", "false", "no", "off"}


def running_in_ci(environ=os.environ) -> bool:
    return environ.get("CI", "").strip().lower() not in _NOT_CI


def skip_reason(report) -> str:
    """The reason pytest recorded for a skip (its longrepr is (file, line, "Skipped: reason") for skips)."""
    if isinstance(report.longrepr, tuple) and len(report.longrepr) == 3:
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    return str(report.longrepr)


class SkipPolicy:
    """A pytest plugin: records every skip (tests and whole modules) and fails the session on any skip whose node
    id matches no pattern of ``allowlist`` (fnmatch patterns -> the reason the skip is acceptable)."""

    def __init__(self, allowlist: dict[str, str]) -> None:
        empty = [pattern for pattern, why in allowlist.items() if not str(why).strip()]
        if empty:
            raise pytest.UsageError(f"CI skip allow-list entries without a reason: {empty}; write why each may skip")
        self.allowlist = allowlist
        self.skips: list[tuple[str, str]] = []

    def allowed_by(self, nodeid: str) -> str | None:
        return next((pattern for pattern in self.allowlist if fnmatch.fnmatchcase(nodeid, pattern)), None)

    def pytest_runtest_logreport(self, report) -> None:
        # An xfail is also reported as skipped; it ran, so it is not a skip.
        if report.skipped and not hasattr(report, "wasxfail"):
            self.skips.append((report.nodeid, skip_reason(report)))

    def pytest_collectreport(self, report) -> None:
        # A module-level skip (pytest.importorskip at import time) skips every test in it at collection.
        if report.skipped:
            self.skips.append((report.nodeid, skip_reason(report)))

    def unallowed(self) -> list[tuple[str, str]]:
        return [(nodeid, reason) for nodeid, reason in self.skips if self.allowed_by(nodeid) is None]

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session, exitstatus) -> None:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        allowed = [(nodeid, self.allowed_by(nodeid)) for nodeid, _ in self.skips if self.allowed_by(nodeid) is not None]
        unallowed = self.unallowed()
        if reporter is not None:
            for nodeid, pattern in allowed:
                reporter.write_line(f"CI allows the skip of {nodeid}: {self.allowlist[pattern]}")
        if not unallowed:
            return
        if reporter is not None:
            reporter.write_line(f"CI RUNS EVERY TEST, BUT {len(unallowed)} SKIPPED (fix the cause, or add the test to "
                                f"CI_SKIP_ALLOWLIST in tests/conftest.py with the reason it may skip):", red=True)
            for nodeid, reason in unallowed:
                reporter.write_line(f"  {nodeid} skipped: {reason}", red=True)
        if session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def register_skip_policy(config, allowlist: dict[str, str]) -> None:
    """Enforce ``allowlist`` on this session when CI is set; outside CI a skip stays a skip."""
    if running_in_ci():
        config.pluginmanager.register(SkipPolicy(allowlist), "ci-skip-policy")
