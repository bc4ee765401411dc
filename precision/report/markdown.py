"""Escaping for summary.md: every value a template prints is user text until proven otherwise.

A prompt id, a category, a model path or a backend spec can hold Markdown (`**x**`, `[a](b)`), raw HTML
(`<script>`), a table pipe or a newline; any of these would break the model card's table or inject markup.
The Markdown environment escapes every `{{ ... }}` output through ``markdown_text`` (Jinja's ``finalize``), so a
template cannot forget it; only a value wrapped in ``markupsafe.Markup`` passes through unchanged.
"""

from __future__ import annotations

import re

from markupsafe import Markup

# HTML first (so that '&' in an entity we add is not escaped twice), then Markdown's punctuation.
_HTML = (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"))
_MARKDOWN_SPECIALS = "\\`*_[]|~#!{}"
_MARKDOWN = re.compile("([" + re.escape(_MARKDOWN_SPECIALS) + "])")
# Every character Python, CommonMark or a browser treats as a line break; each would end a table row.
_LINE_BREAKS = re.compile(r"\r\n|[\r\n\v\f\x1c\x1d\x1e\x85\u2028\u2029]")


def markdown_text(value: object) -> str:
    """``value`` as inert Markdown text: one line, no HTML, no Markdown syntax."""
    if value is None:
        return ""
    if isinstance(value, Markup):
        return str(value)
    text = _LINE_BREAKS.sub(" ", str(value))
    for raw, entity in _HTML:
        text = text.replace(raw, entity)
    return _MARKDOWN.sub(r"\\\1", text)
