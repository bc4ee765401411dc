"""The report: rendered from a real run, opened in headless Chromium, hostile strings shown as text, and checked
by `precision-check verify` against edits and swapped captures."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import time

import pytest

from precision.cli import main
from precision.verify import verify_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
requires_chromium = pytest.mark.skipif(CHROMIUM is None and os.environ.get("PRECISION_REQUIRE_CHROMIUM") != "1",
                                       reason="Debian's chromium is not installed (.ci/run installs it)")


def test_report_is_self_contained_and_escapes_user_strings(run_dir):
    html = (run_dir / "report.html").read_text()
    assert "<script" not in html.lower().replace("&lt;script", "")  # no script element of ours or the user's
    assert "&lt;script&gt;document.title=&#39;PWNED&#39;&lt;/script&gt;" in html
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", html), "the report must load nothing from the network"
    for section in ("verdict-table", "why", "layers", "prompts", "texts", "environment", "definitions"):
        assert f'id="{section}"' in html


@requires_chromium
def test_report_in_headless_chromium(run_dir, tmp_path):
    shot = tmp_path / "report.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0"]
    url = (run_dir / "report.html").as_uri()
    taken = subprocess.run([CHROMIUM, *flags, "--window-size=1280,2400", f"--screenshot={shot}", url], capture_output=True, text=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 10_000, taken.stderr[-2000:]
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    console_errors = [line for line in dom.stderr.splitlines() if "CONSOLE" in line and "ERROR" in line.upper()]
    assert not console_errors, console_errors
    assert "<title>precision-check: PASS" in dom.stdout  # the injected script never ran (it would set PWNED)
    assert "PWNED</title>" not in dom.stdout and "PWNED2" not in dom.stdout.split("<body")[0]
    for heading in ("Why do they differ?", "Per layer", "Token agreement", "Metric definitions"):
        assert heading in dom.stdout


def test_verify_accepts_an_untouched_run(run_dir):
    assert verify_run(run_dir) == []


def test_verify_detects_an_edited_report(run_dir, tmp_path):
    copy = tmp_path / "edited"
    shutil.copytree(run_dir, copy)
    html = (copy / "report.html").read_text()
    (copy / "report.html").write_text(html.replace("R = ", "R = 0", 1))
    problems = verify_run(copy)
    assert any("report.html differs" in p for p in problems)


@pytest.mark.parametrize("edit", ["result", "number", "removed"])
def test_verify_detects_an_edited_msprobe_csv(run_dir, tmp_path, edit):
    """msprobe_compare.csv is rendered from the comparison like the report: a row's Result turned to pass, one
    figure changed, or the file removed, and verify names it (the untouched run verifies: test above)."""
    copy = tmp_path / "csv"
    shutil.copytree(run_dir, copy)
    csv_path = copy / "msprobe_compare.csv"
    text = csv_path.read_text()
    if edit == "removed":
        csv_path.unlink()
    else:
        rows = list(csv.DictReader(io.StringIO(text)))
        first = dict(rows[0])

        def written(table: list[dict]) -> str:
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=list(first), lineterminator="\n")
            writer.writeheader()
            writer.writerows(table)
            return buffer.getvalue()

        assert written(rows) == text  # the edit below is the only difference
        if edit == "result":
            rows[0]["Result"] = "error" if first["Result"] == "pass" else "pass"
        else:
            rows[0]["Cosine"] = repr(float(first["Cosine"]) * 0.5)
        assert rows[0] != first
        csv_path.write_text(written(rows))
    problems = verify_run(copy)
    expected = "msprobe_compare.csv is missing" if edit == "removed" else "msprobe_compare.csv differs"
    assert any(expected in p for p in problems), problems


def test_verify_detects_an_edited_number(run_dir, tmp_path):
    copy = tmp_path / "number"
    shutil.copytree(run_dir, copy)
    comparison = json.loads((copy / "comparison.json").read_text())
    comparison["sites"][3]["relative_l2"] *= 0.5
    (copy / "comparison.json").write_text(json.dumps(comparison))
    problems = verify_run(copy)
    assert any("comparison.sites[3].relative_l2" in p for p in problems), problems


def test_verify_detects_a_swapped_capture(run_dir, tmp_path, capsys):
    copy = tmp_path / "swapped"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "captures" / "target")
    shutil.copytree(copy / "captures" / "envelope" / "attn:eager", copy / "captures" / "target")
    assert main(["verify", str(copy)]) == 1
    assert "captures/target/manifest.json" in capsys.readouterr().out


def test_report_size_and_render_time_are_recorded(run_dir, tmp_path, capsys):
    """Measured, not asserted as a timing: printed for the docs (see benchmarks/README.md)."""
    start = time.perf_counter()
    assert main(["report", str(run_dir), "--out", str(tmp_path)]) == 0
    elapsed = time.perf_counter() - start
    size = (tmp_path / "report.html").stat().st_size
    with capsys.disabled():
        print(f"\nreport: {size / 1024:.0f} KiB rendered in {elapsed:.2f} s")
    assert size < 5 * 1024 * 1024
