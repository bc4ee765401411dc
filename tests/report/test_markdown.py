"""summary.md goes into model cards: user text (ids, categories, model paths, backend specs) must stay text."""

from __future__ import annotations

import re

import pytest

from precision.report.markdown import markdown_text
from tests.report.conftest import HOSTILE_MODEL_DIR, HOSTILE_SUMMARY_CATEGORIES, HOSTILE_SUMMARY_IDS

UNESCAPED_PIPE = re.compile(r"(?<!\\)\|")
RAW_HTML = re.compile(r"<\s*/?\s*[A-Za-z!?]")


def _tables(markdown: str) -> list[list[str]]:
    tables, current = [], []
    for line in markdown.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables + ([current] if current else [])


@pytest.mark.parametrize("hostile", ["<script>alert(1)</script>", "a|b", "**x**", "line\nbreak", "`code`", "[l](http://e)", "_u_",
                                     "&amp; &lt;", "x\r\ny\u2028z", "\\|", "~s~ #h !i"])
def test_markdown_text_leaves_nothing_active(hostile):
    text = markdown_text(hostile)
    assert not RAW_HTML.search(text) and "\n" not in text and "\r" not in text and "\u2028" not in text
    assert not UNESCAPED_PIPE.search(text)
    for special in "*_`[]~":
        assert re.search(rf"(?<!\\){re.escape(special)}", text) is None, (special, text)


def test_summary_of_a_run_with_hostile_ids_categories_and_model_path(fp16_subset_run):
    summary = (fp16_subset_run / "summary.md").read_text()
    assert not RAW_HTML.search(summary), RAW_HTML.search(summary)
    tables = _tables(summary)
    assert len(tables) == 3
    for table in tables:
        columns = len(UNESCAPED_PIPE.findall(table[0]))
        assert all(len(UNESCAPED_PIPE.findall(row)) == columns for row in table), table
    prompt_rows = tables[1][2:]
    assert len(prompt_rows) == len(HOSTILE_SUMMARY_IDS)
    for row, prompt_id, category in zip(prompt_rows, HOSTILE_SUMMARY_IDS, HOSTILE_SUMMARY_CATEGORIES):
        assert row.startswith(f"| {markdown_text(prompt_id)} | {markdown_text(category)} |"), row
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in summary and "\\_\\_bold\\_\\_" in summary
    assert markdown_text(HOSTILE_MODEL_DIR) in summary
