"""The parity report: a "serving configurations" section, one row per configuration, as Markdown (summary.md) and
a self-contained HTML page (report.html) in the parity output directory. Renders the parity document only; every
number in it was measured by precision.serving.parity."""

from __future__ import annotations

from pathlib import Path

from precision.io import write_text_atomic
from precision.report import TEMPLATE_DIR, _environment


def _number(value, digits: int = 3) -> str:
    """A measured number with ``digits`` significant digits; 0 exactly as 0 (bitwise identical)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return "0" if value == 0.0 else f"{value:.{digits}g}"
    return str(value)


def _settings(row: dict) -> str:
    settings = row["settings"]
    args = ", ".join(f"{k}={v!r}" for k, v in settings["engine_args"].items())
    return f"{args or '(baseline settings)'}; workload {settings['workload']}"


def _responsible(row: dict) -> str:
    bisection = row.get("bisection")
    if not bisection:
        return "-" if row["verdict"] != "FAIL" else "not bisected"
    if "error" in bisection:
        return f"bisection not run: {bisection['error']}"
    if not bisection["responsible"]:
        return bisection["sentence"]
    named = ", ".join(f"{k}={v!r}" for k, v in bisection["responsible"].items())
    return named + (f" (first at {bisection['first_bitwise_site']})" if bisection.get("first_bitwise_site") else "")


def write_parity_report(out: Path, document: dict) -> dict[str, Path]:
    """summary.md and report.html of a parity run, from its document."""
    out = Path(out)
    helpers = {"number": _number, "settings": _settings, "responsible": _responsible}
    paths = {"summary.md": out / "summary.md", "report.html": out / "report.html"}
    markdown = _environment(TEMPLATE_DIR, markdown=True).get_template("parity.md.j2").render(d=document, **helpers)
    write_text_atomic(paths["summary.md"], markdown)
    css = (TEMPLATE_DIR / "report.css").read_text(encoding="utf-8")
    html = _environment(TEMPLATE_DIR).get_template("parity.html.j2").render(d=document, css=css, **helpers)
    write_text_atomic(paths["report.html"], html)
    return paths
