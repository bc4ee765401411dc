"""The CI skip policy (tests/ci_policy.py), proven by running pytest on a tiny suite that skips, with and without CI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SUITE = {
    "test_tiny.py": (
        "import pytest\n\n"
        "def test_runs():\n    assert True\n\n"
        "@pytest.mark.skipif(True, reason='no frobnicator on this machine')\n"
        "def test_needs_frobnicator():\n    pass\n\n"
        "@pytest.mark.xfail(reason='known', strict=True)\n"
        "def test_known_failure():\n    assert False\n"
    ),
    "test_module_skipped.py": "import pytest\n\npytest.importorskip('no_such_module_anywhere_42')\n\ndef test_x():\n    pass\n",
}


def run_tiny_suite(tmp_path: Path, allowlist: dict[str, str], ci: str | None, files=SUITE) -> subprocess.CompletedProcess:
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    # The tiny suite's own conftest registers the same policy the real conftest does, with its own allow-list.
    (tmp_path / "conftest.py").write_text(
        "from tests.ci_policy import register_skip_policy\n\n"
        f"ALLOW = {allowlist!r}\n\n"
        "def pytest_configure(config):\n    register_skip_policy(config, ALLOW)\n", encoding="utf-8")
    (tmp_path / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")  # keeps the repository's settings out
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_a_skip_in_ci_fails_the_session_naming_the_test_and_its_reason(tmp_path):
    result = run_tiny_suite(tmp_path, {}, ci="true")
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "test_tiny.py::test_needs_frobnicator skipped: no frobnicator on this machine" in out
    assert "test_module_skipped.py skipped: could not import 'no_such_module_anywhere_42'" in out
    assert "2 SKIPPED" in out and "CI_SKIP_ALLOWLIST" in out
    assert "test_known_failure" not in out  # an xfail ran; it is not a skip


def test_skips_on_the_allow_list_pass_in_ci_and_their_reasons_are_printed(tmp_path):
    allow = {"*::test_needs_frobnicator": "frobnicators exist only in the lab",
             "test_module_skipped.py": "optional dependency, checked elsewhere"}
    result = run_tiny_suite(tmp_path, allow, ci="true")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "CI allows the skip of test_tiny.py::test_needs_frobnicator: frobnicators exist only in the lab" in out


def test_one_allowed_skip_does_not_excuse_another(tmp_path):
    result = run_tiny_suite(tmp_path, {"*::test_needs_frobnicator": "lab only"}, ci="true")
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "1 SKIPPED" in out and "test_module_skipped.py skipped" in out and "test_needs_frobnicator skipped" not in out


@pytest.mark.parametrize("ci", [None, "", "0", "false"])
def test_outside_ci_a_skip_stays_a_skip(tmp_path, ci):
    result = run_tiny_suite(tmp_path, {}, ci=ci)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "2 skipped" in out and "SKIPPED" not in out


def test_an_allow_list_entry_without_a_reason_is_refused(tmp_path):
    result = run_tiny_suite(tmp_path, {"*::test_needs_frobnicator": " "}, ci="true")
    out = result.stdout + result.stderr
    assert result.returncode != 0 and "without a reason" in out, out


def test_a_failure_stays_a_failure_in_ci(tmp_path):
    result = run_tiny_suite(tmp_path, {}, ci="true", files={"test_fails.py": "def test_f():\n    assert False\n"})
    assert result.returncode == 1 and "1 failed" in result.stdout, result.stdout + result.stderr


def test_the_project_allow_list_is_empty(request):
    """Every test runs in CI. An entry added to the allow-list must carry its reason, and this test makes the
    addition a reviewed change (update it when an entry is justified)."""
    # The conftest pytest loaded (importing tests.conftest again would re-run its set-up under a second name).
    conftest = next(p for p in request.config.pluginmanager.get_plugins()
                    if getattr(p, "__file__", None) == str(REPO / "tests" / "conftest.py"))
    assert conftest.CI_SKIP_ALLOWLIST == {}


def test_importing_conftest_again_keeps_the_one_document_log(request):
    """Test modules import tests.conftest, a second copy of the conftest pytest loaded; both must name the log that
    the end-of-session schema validation reads, or it validates nothing."""
    import tests.conftest as imported_again

    loaded = next(p for p in request.config.pluginmanager.get_plugins()
                  if getattr(p, "__file__", None) == str(REPO / "tests" / "conftest.py"))
    assert imported_again.DOCUMENT_LOG == loaded.DOCUMENT_LOG == Path(os.environ["PRECISION_CHECK_DOCUMENT_LOG"])
