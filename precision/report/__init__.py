"""Rendering findings: report.html (self-contained), summary.md (for a model card), summary.json; and a
regression's regression.json and regression.md. Reports render measurements; they never run a model."""

from __future__ import annotations

import json
from pathlib import Path

from precision.analysis.verdict import Verdict
from precision.io import write_json_atomic, write_text_atomic
from precision.names import FIRST_DIVERGENCE, KL_MEAN, LOGITS, MATCHING_PREFIX, TOKEN_MATCH_RATE, TOP1_AGREEMENT
from precision.report.markdown import markdown_text
from precision.report.view import build_view, load_decoder

SUMMARY_SCHEMA_VERSION = 1
TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"


def _environment(template_dir: Path, *, markdown: bool = False):
    """HTML templates autoescape; the Markdown template escapes every output through ``markdown_text``."""
    import jinja2

    if markdown:
        return jinja2.Environment(loader=jinja2.FileSystemLoader(str(template_dir)), autoescape=False, finalize=markdown_text, keep_trailing_newline=True,
                                  undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir)),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html", "html.j2"), default_for_string=True, default=False),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def summary_json(comparison: dict, verdict: Verdict, manifests: dict[str, dict] | None = None, serving: dict | None = None) -> dict:
    """summary.json (schema_version 1): the verdict, the per-site pooled table, per-prompt key numbers and the
    target's performance (precision.report.performance.performance_summary, from the target's capture manifest:
    ``manifests["actual"]``, read from the comparison's recorded path when not given); with ``serving`` (the run's
    serving stage document), its serving section (precision.report.serving.serving_summary)."""
    from precision.report.performance import performance_summary

    manifests = _load_manifests(comparison) if manifests is None else manifests
    summary = {
        "schema_version": SUMMARY_SCHEMA_VERSION,
        "format": "precision-check-summary",
        "created_at": comparison["created_at"],
        "verdict": verdict.to_json(),
        "expected": comparison["expected"],
        "actual": comparison["actual"],
        "truth": comparison.get("truth"),
        "sites": comparison["sites"],
        "prompts": [
            {
                "id": p["id"],
                "category": p["category"],
                TOKEN_MATCH_RATE: p["tokens"]["match_rate"],
                MATCHING_PREFIX: p["tokens"][MATCHING_PREFIX],
                FIRST_DIVERGENCE: p["tokens"][FIRST_DIVERGENCE],
                f"{LOGITS}_{KL_MEAN}": p.get(LOGITS, {}).get(KL_MEAN),
                f"{LOGITS}_{TOP1_AGREEMENT}": p.get(LOGITS, {}).get(TOP1_AGREEMENT),
                "flips": p.get(LOGITS, {}).get("flips", []),
            }
            for p in comparison["prompts"]
        ],
        "skipped_prompts": comparison.get("skipped_prompts", []),
        "performance": performance_summary(manifests),
    }
    if serving is not None:
        from precision.report.serving import serving_summary

        summary["serving"] = serving_summary(serving, verdict.status.value)
    return summary


def _load_manifests(comparison: dict) -> dict[str, dict]:
    manifests = {}
    for role in ("expected", "actual", "truth"):
        side = comparison.get(role)
        path = Path(side["path"]) / "manifest.json" if side else None
        if path is not None and path.is_file():
            manifests[role] = json.loads(path.read_text(encoding="utf-8"))
    return manifests


def write_report(out_dir: str | Path, comparison: dict, verdict: Verdict, *, command: str | None = None,
                 template_dir: Path = TEMPLATE_DIR, manifests: dict[str, dict] | None = None, serving: dict | None = None) -> dict[str, Path]:
    """Write report.html, summary.md, summary.json and msprobe_compare.csv into ``out_dir``; returns their paths.
    ``manifests`` ({"expected", "actual", "truth"}: the captures' manifest contents) default to the manifests at
    the comparison's recorded paths; verify passes those of the run's own captures (checked by their sha256).
    ``serving``: the run's serving stage document (RUN/serving/summary.json), when the run had one: the three files
    then carry its "Serving configurations" section; without it they are what they were before the stage existed."""
    out_dir = Path(out_dir)
    manifests = _load_manifests(comparison) if manifests is None else manifests
    model_path = manifests.get("expected", {}).get("model", {}).get("path")
    view = build_view(comparison, verdict, decode=load_decoder(model_path), command=command, manifests=manifests, serving=serving)
    env = _environment(template_dir)
    markdown_env = _environment(template_dir, markdown=True)
    paths = {"report.html": out_dir / "report.html", "summary.md": out_dir / "summary.md", "summary.json": out_dir / "summary.json"}
    write_text_atomic(paths["report.html"], env.get_template("report.html.j2").render(**view))
    write_text_atomic(paths["summary.md"], markdown_env.get_template("summary.md.j2").render(**view))
    from precision.interop.msprobe_export import CSV_NAME, write_msprobe_csv  # msprobe's compare result layout, for its tooling

    paths[CSV_NAME] = write_msprobe_csv(out_dir, comparison, verdict)
    write_json_atomic(paths["summary.json"], summary_json(comparison, verdict, manifests, serving))  # last: a run with it is complete
    return paths


def write_regression(out_dir: str | Path, regression: dict, *, template_dir: Path = TEMPLATE_DIR) -> dict[str, Path]:
    """Write regression.json and regression.md (from ``precision.analysis.regress.regress``) into ``out_dir``."""
    import jinja2

    out_dir = Path(out_dir)
    paths = {"regression.json": out_dir / "regression.json", "regression.md": out_dir / "regression.md"}
    write_json_atomic(paths["regression.json"], regression)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(template_dir)), trim_blocks=True, lstrip_blocks=True)
    write_text_atomic(paths["regression.md"], env.get_template("regression.md.j2").render(r=regression))
    return paths
