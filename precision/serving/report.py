"""The parity report: a "serving configurations" section, one row per configuration, as Markdown (summary.md) and
a self-contained HTML page (report.html) in the parity output directory. Renders the parity document only; every
number in it was measured by precision.serving.parity."""

from __future__ import annotations

from pathlib import Path

from precision.io import write_text_atomic
from precision.names import RELATIVE_L2
from precision.report import TEMPLATE_DIR, _environment
from precision.serving.logprob_compare import TOPK_DELTA
from precision.serving.logprob_level import DETAIL_PROMPT_LOGPROBS


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
    first = f" (first at {bisection['first_bitwise_site']})" if bisection.get("first_bitwise_site") else ""
    return named + (" (at the prompt-logprobs level: no layer to name)" if _logprob_level(row) else first)


def _logprob_level(row: dict) -> bool:
    return row["level"] == DETAIL_PROMPT_LOGPROBS


def _level(row: dict) -> str:
    """The level of detail and, at the prompt-logprobs level, why (forced, or the fallback's short reason)."""
    if not _logprob_level(row):
        return row["level"]
    return f"{row['level']} ({row['level_reason'].split(' (')[0]})"


def _largest(row: dict) -> str:
    if _logprob_level(row):
        largest = row["largest"]
        where = f" ({largest['prompt']}, position {largest['position']})" if largest.get("prompt") is not None else ""
        return f"max |Δ logprob| {_number(largest[TOPK_DELTA])} over the top {row['evidence']['top_k']}{where}"
    if row["bitwise_identical"]:
        return "0 (bitwise identical)"
    return f"{_number(row['largest'][RELATIVE_L2])} at {row['largest']['site']}"


def _envelope(row: dict) -> str:
    ratio = row.get("envelope_ratio")
    if not ratio:
        return "- (no envelope)"
    if not ratio.get("site"):
        return "0 (no difference)"
    if _logprob_level(row):
        return f"{_number(ratio['ratio'])}x ({_number(ratio['configuration'])} vs the envelope's {_number(ratio['envelope_max'])})"
    return f"{_number(ratio['ratio'])}x at {ratio['site']}"


def _first_layer(row: dict) -> str:
    if _logprob_level(row):
        return "n/a (logprobs only)"
    return row["first_bitwise_site"] or "none: bitwise identical"


def write_parity_report(out: Path, document: dict) -> dict[str, Path]:
    """summary.md and report.html of a parity run, from its document."""
    out = Path(out)
    helpers = {"number": _number, "settings": _settings, "responsible": _responsible, "level": _level, "largest": _largest,
               "envelope": _envelope, "first_layer": _first_layer, "logprob_level": _logprob_level}
    paths = {"summary.md": out / "summary.md", "report.html": out / "report.html"}
    markdown = _environment(TEMPLATE_DIR, markdown=True).get_template("parity.md.j2").render(d=document, **helpers)
    write_text_atomic(paths["summary.md"], markdown)
    css = (TEMPLATE_DIR / "report.css").read_text(encoding="utf-8")
    html = _environment(TEMPLATE_DIR).get_template("parity.html.j2").render(d=document, css=css, **helpers)
    write_text_atomic(paths["report.html"], html)
    return paths
