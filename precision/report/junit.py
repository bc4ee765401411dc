"""JUnit XML for CI systems (Jenkins, GitLab, GitHub Actions reporters): each prompt x check, each run-level
finding, each serving configuration of a run's serving stage and each regression row (prompt x site x metric)
becomes a test case; FAIL is a <failure>, WARN passes with its message in <system-out>. The layout follows the
Jenkins JUnit schema (testsuites > testsuite > testcase)."""

from __future__ import annotations

from pathlib import Path
from xml.etree import ElementTree

from precision.analysis.verdict import Status, Verdict
from precision.io import write_bytes_atomic


def _case(suite, classname: str, name: str, status: str, message: str) -> None:
    case = ElementTree.SubElement(suite, "testcase", classname=classname, name=name, time="0")
    if status == "FAIL":
        failure = ElementTree.SubElement(case, "failure", message=message[:500], type="precision-check")
        failure.text = message
    elif message:
        ElementTree.SubElement(case, "system-out").text = f"{status}: {message}"


def _suite(root, name: str, cases: list[tuple[str, str, str, str]], timestamp: str) -> None:
    suite = ElementTree.SubElement(root, "testsuite", name=name, tests=str(len(cases)),
                                   failures=str(sum(c[2] == "FAIL" for c in cases)), errors="0", skipped="0", time="0", timestamp=timestamp)
    for classname, case_name, status, message in cases:
        _case(suite, classname, case_name, status, message)


def regression_cases(regression: dict) -> list[tuple[str, str, str, str]]:
    """One test case per (prompt, site, metric) row of a regression (precision.analysis.regress), pooled rows
    under "all-prompts"; a row the candidate lacks is a failure; the candidate's own verdict is one more case."""
    cases = []
    for row in regression["rows"]:
        classname = f"regress.{'all-prompts' if row['prompt'] is None else row['prompt']}.{row['site']}"
        if row["missing"]:
            message = f"measured in the baseline ({row['baseline']:.4e}), missing from the candidate"
        else:
            message = (f"baseline {row['baseline']:.4e}, candidate {row['candidate']:.4e}, "
                       f"{'lower limit' if row['kind'] == 'top-1' else 'limit'} {row['limit']:.4e} ({row['kind']} allowance)")
        cases.append((classname, row["metric"], "FAIL" if row["worse"] else Status.PASS.value, message))
    verdict = regression["candidate"]["verdict"]
    cases.append(("regress.candidate", "own-verdict", "FAIL" if verdict == "FAIL" else Status.PASS.value, f"the candidate run's verdict: {verdict}"))
    return cases


def serving_cases(document: dict) -> list[tuple[str, str, str, str]]:
    """One test case per configuration of a serving stage document (precision.serving.parity): its verdict, with its
    summary and the findings that did not pass, and the setting bisection named when it failed."""
    cases = []
    for row in document["configurations"]:
        message = "; ".join([row["summary"], *row["findings"]])
        bisection = row.get("bisection") or {}
        if bisection.get("sentence") or bisection.get("error"):
            message += f"; bisection: {bisection.get('sentence') or bisection.get('error')}"
        cases.append((f"serving.{row['name']}", "parity", row["verdict"], message))
    return cases


def junit_xml(verdict: Verdict | None, *, regression: dict | None = None, serving: dict | None = None, timestamp: str) -> bytes:
    root = ElementTree.Element("testsuites")
    if verdict is not None:
        cases = [(f"prompt.{p.id}", f.rule, f.status.value, f.message) for p in verdict.prompts for f in p.findings]
        cases += [("run", f.rule, f.status.value, f.message) for f in verdict.findings]
        _suite(root, "precision-check.verdict", cases, timestamp)
    if serving is not None:
        _suite(root, "precision-check.serving", serving_cases(serving), timestamp)
    if regression is not None:
        _suite(root, "precision-check.regress", regression_cases(regression), timestamp)
    ElementTree.indent(root)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ElementTree.tostring(root, encoding="utf-8")


def write_junit(path: str | Path, verdict: Verdict | None, *, regression: dict | None = None, serving: dict | None = None,
                timestamp: str) -> None:
    """``serving``: the run's serving stage document (RunResult.serving), whose configurations become test cases."""
    write_bytes_atomic(Path(path), junit_xml(verdict, regression=regression, serving=serving, timestamp=timestamp[:19]))
