"""The parity report: a "serving configurations" section, one row per configuration, as Markdown (summary.md) and
a self-contained HTML page (report.html) in the parity output directory. Renders the parity document only; every
number in it was measured by precision.serving.parity."""

from __future__ import annotations

from pathlib import Path

from precision.io import write_text_atomic
from precision.report import TEMPLATE_DIR, _environment
from precision.report import serving as cells


def write_parity_report(out: Path, document: dict) -> dict[str, Path]:
    """summary.md and report.html of a parity run, from its document."""
    out = Path(out)
    helpers = {"number": cells.number, "settings": cells.settings_cell, "responsible": cells.responsible_cell, "level": cells.level_cell,
               "largest": cells.largest_cell, "envelope": cells.envelope_cell, "first_layer": cells.first_layer_cell,
               "logprob_level": cells.is_logprob_level}
    paths = {"summary.md": out / "summary.md", "report.html": out / "report.html"}
    markdown = _environment(TEMPLATE_DIR, markdown=True).get_template("parity.md.j2").render(d=document, **helpers)
    write_text_atomic(paths["summary.md"], markdown)
    css = (TEMPLATE_DIR / "report.css").read_text(encoding="utf-8")
    html = _environment(TEMPLATE_DIR).get_template("parity.html.j2").render(d=document, css=css, **helpers)
    write_text_atomic(paths["report.html"], html)
    return paths
