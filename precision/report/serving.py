"""The run's own report on its serving stage: summary.json's ``serving`` section and the "Serving configurations"
section of summary.md and report.html, read from the stage's parity document (RUN/serving/summary.json, written by
precision.serving.run_stage). Nothing here measures: every figure is the stage document's, and each cell of the
table is worded as the stage's own report (precision.serving.report) words it, so the run's table and the stage's
say the same (a test compares them row for row).

The run's ``verdict.status`` stays the cross-engine comparison's; ``overall_status`` is the worst of it and the
stage's status, which is what ``run`` exits by (FAIL: exit 1).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from precision.analysis.verdict import Status, worst
from precision.names import DETAIL_PROMPT_LOGPROBS, RELATIVE_L2, SERVING_STAGE_DIRECTORY, TOPK_DELTA

STAGE_DIRECTORY = SERVING_STAGE_DIRECTORY
STAGE_SUMMARY, STAGE_REPORT = "summary.json", "report.html"
"""The stage document and its report, inside the stage's directory."""

def document_text(document: dict) -> str:
    """The JSON text precision.io.write_json_atomic writes for ``document``: the stage's summary.json, byte for byte."""
    from precision.io import _json_safe

    return json.dumps(_json_safe(document), indent=1, ensure_ascii=False, allow_nan=False) + "\n"


def document_sha256(document: dict) -> str:
    """sha256 of the stage's summary.json as the stage wrote it (the UTF-8 bytes of ``document_text``)."""
    return hashlib.sha256(document_text(document).encode("utf-8")).hexdigest()


def is_logprob_level(row: dict) -> bool:
    return row["level"] == DETAIL_PROMPT_LOGPROBS


def _bisection(row: dict) -> tuple[dict | None, str | None]:
    """(the responsible settings, the bisection's sentence): (None, None) when it did not run."""
    bisection = row.get("bisection")
    if not bisection:
        return None, None
    if "error" in bisection:
        return None, f"bisection not run: {bisection['error']}"
    return (bisection["responsible"] or None), bisection["sentence"]


def configuration_entry(row: dict) -> dict[str, Any]:
    """One configuration of summary.json's serving section (precision.contract.results.ServingConfigurationSummary)."""
    metric = TOPK_DELTA if is_logprob_level(row) else RELATIVE_L2
    ratio = row.get("envelope_ratio")
    responsible, sentence = _bisection(row)
    return {
        "name": row["name"], "verdict": row["verdict"], "level": row["level"], "level_reason": row.get("level_reason"),
        "largest_metric": metric, "largest_value": row["largest"][metric], "largest_site": row["largest"].get("site"),
        "envelope_ratio": ratio["ratio"] if ratio else None, "envelope_ratio_site": ratio.get("site") if ratio else None,
        "bitwise_identical": row.get("bitwise_identical"), "first_differing_site": None if is_logprob_level(row) else row["first_bitwise_site"],
        "responsible": responsible, "bisection": sentence,
        "comparison": f"{STAGE_DIRECTORY}/{row['comparison']}" if row.get("comparison") else None,
    }


def overall_status(verdict_status: str, document: dict) -> str:
    return worst([Status(verdict_status), Status(document["status"])]).value


def serving_summary(document: dict, verdict_status: str) -> dict[str, Any]:
    """summary.json's serving section (precision.contract.results.ServingSummary) from the stage document."""
    directory = STAGE_DIRECTORY
    return {
        "status": document["status"],
        "overall_status": overall_status(verdict_status, document),
        "summary": f"{directory}/{STAGE_SUMMARY}", "report": f"{directory}/{STAGE_REPORT}",
        "summary_sha256": document_sha256(document),
        "configurations": [configuration_entry(row) for row in document["configurations"]],
    }


def serving_view(document: dict | None, verdict_status: str) -> dict[str, Any] | None:
    """What the templates show: the stage's status, the overall outcome and one row per configuration, each cell
    worded as the stage's own report words it (the same columns as precision.serving.report's table)."""
    if document is None:
        return None
    rows = document["configurations"]
    failing = [row["name"] for row in rows if row["verdict"] == Status.FAIL.value]
    return {
        "status": document["status"],
        "overall": overall_status(verdict_status, document),
        "counts": f"{len(failing)} of {len(rows)} configuration{'s' if len(rows) != 1 else ''} fail{'s' if len(failing) == 1 else ''}",
        "report": f"{STAGE_DIRECTORY}/{STAGE_REPORT}",
        "rows": [{"name": row["name"], "verdict": row["verdict"], "settings": settings_cell(row), "level": level_cell(row),
                  "largest": largest_cell(row), "envelope": envelope_cell(row), "first_layer": first_layer_cell(row),
                  "responsible": responsible_cell(row)} for row in rows],
    }


# The cells of a configuration's row, as the parity report (precision.serving.report) writes them.

def number(value, digits: int = 3) -> str:
    """A measured number with ``digits`` significant digits; 0 exactly as 0 (bitwise identical)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return "0" if value == 0.0 else f"{value:.{digits}g}"
    return str(value)


def settings_cell(row: dict) -> str:
    settings = row["settings"]
    args = ", ".join(f"{k}={v!r}" for k, v in settings["engine_args"].items())
    return f"{args or '(baseline settings)'}; workload {settings['workload']}"


def responsible_cell(row: dict) -> str:
    bisection = row.get("bisection")
    if not bisection:
        return "-" if row["verdict"] != "FAIL" else "not bisected"
    if "error" in bisection:
        return f"bisection not run: {bisection['error']}"
    if not bisection["responsible"]:
        return bisection["sentence"]
    named = ", ".join(f"{k}={v!r}" for k, v in bisection["responsible"].items())
    first = f" (first at {bisection['first_bitwise_site']})" if bisection.get("first_bitwise_site") else ""
    return named + (" (at the prompt-logprobs level: no layer to name)" if is_logprob_level(row) else first)


def level_cell(row: dict) -> str:
    """The level of detail and, at the prompt-logprobs level, why (forced, or the fallback's short reason)."""
    if not is_logprob_level(row):
        return row["level"]
    return f"{row['level']} ({row['level_reason'].split(' (')[0]})"


def largest_cell(row: dict) -> str:
    if is_logprob_level(row):
        largest = row["largest"]
        where = f" ({largest['prompt']}, position {largest['position']})" if largest.get("prompt") is not None else ""
        return f"max |Δ logprob| {number(largest[TOPK_DELTA])} over the top {row['evidence']['top_k']}{where}"
    if row["bitwise_identical"]:
        return "0 (bitwise identical)"
    return f"{number(row['largest'][RELATIVE_L2])} at {row['largest']['site']}"


def envelope_cell(row: dict) -> str:
    ratio = row.get("envelope_ratio")
    if not ratio:
        return "- (no envelope)"
    if not ratio.get("site"):
        return "0 (no difference)"
    if is_logprob_level(row):
        return f"{number(ratio['ratio'])}x ({number(ratio['configuration'])} vs the envelope's {number(ratio['envelope_max'])})"
    return f"{number(ratio['ratio'])}x at {ratio['site']}"


def first_layer_cell(row: dict) -> str:
    if is_logprob_level(row):
        return "n/a (logprobs only)"
    return row["first_bitwise_site"] or "none: bitwise identical"
