"""Tests of precision/prompts.py: loading, validating and tokenizing golden prompt sets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from precision import prompts as prompts_module
from precision.errors import PrecisionError, PromptFileError
from precision.prompts import (
    DEFAULT_MAX_NEW_TOKENS,
    MAX_NEW_TOKENS_LIMIT,
    Message,
    Prompt,
    load_prompts,
    render_plain_chat,
    tokenize_prompts,
)

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "golden"
STORIES = REPO / "tests" / "models" / "stories260K"

USER_MSG = [{"role": "user", "content": "Hello"}]


def line(**fields) -> str:
    return json.dumps(fields, ensure_ascii=False)


def chat(id="p1", category="cat", messages=None, **extra) -> dict:
    return {"id": id, "category": category, "messages": USER_MSG if messages is None else messages, **extra}


def write(path: Path, *lines: str | dict) -> Path:
    text = "\n".join(item if isinstance(item, str) else json.dumps(item, ensure_ascii=False) for item in lines) + "\n"
    path.write_text(text, encoding="utf-8")
    return path


def assert_error_at(path: Path, lineno: int | None, call, *fragments: str) -> PromptFileError:
    with pytest.raises(PromptFileError) as info:
        call()
    message = str(info.value)
    where = f"{path}:{lineno}" if lineno is not None else str(path)
    assert where in message, f"{where!r} not in {message!r}"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert isinstance(info.value, PrecisionError)
    return info.value


# ---------------------------------------------------------------------------------------------------------------
# Loading valid files
# ---------------------------------------------------------------------------------------------------------------


def test_load_valid_file_parses_every_field(tmp_path):
    f = write(
        tmp_path / "set.jsonl",
        chat(id="a.b_c-1", category="knowledge-zh", messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "中国的首都?"},
            {"role": "assistant", "content": "北京"},
            {"role": "user", "content": "Why?"},
        ], max_new_tokens=7, skip_if_too_long=True),
        "",
        "   ",
        {"id": "raw", "category": "raw", "text": "Once upon a time"},
    )
    loaded = load_prompts(f)
    assert [p.id for p in loaded] == ["a.b_c-1", "raw"]
    first, second = loaded
    assert first.is_chat and not second.is_chat
    assert first.messages == (
        Message("system", "Be brief."), Message("user", "中国的首都?"), Message("assistant", "北京"), Message("user", "Why?"),
    )
    assert first.text is None and first.max_new_tokens == 7 and first.skip_if_too_long is True
    assert first.category == "knowledge-zh"
    assert first.source == f"{f}:1"
    # blank lines are skipped but still counted in line numbers
    assert second.source == f"{f}:4"
    assert second.messages is None and second.text == "Once upon a time"
    assert second.max_new_tokens is None and second.skip_if_too_long is False


def test_load_accepts_str_path_and_crlf(tmp_path):
    f = tmp_path / "crlf.jsonl"
    f.write_bytes((line(**chat(id="x")) + "\r\n" + line(**chat(id="y")) + "\r\n").encode())
    assert [p.id for p in load_prompts(str(f))] == ["x", "y"]


def test_load_directory_reads_jsonl_files_sorted_by_name(tmp_path):
    write(tmp_path / "b.jsonl", chat(id="from-b"))
    write(tmp_path / "a.jsonl", chat(id="from-a1"), chat(id="from-a2"))
    (tmp_path / "notes.txt").write_text("not a prompt file\n")
    (tmp_path / "sub.jsonl").mkdir()  # a directory named *.jsonl is not a file
    loaded = load_prompts(tmp_path)
    assert [p.id for p in loaded] == ["from-a1", "from-a2", "from-b"]
    assert loaded[2].source == f"{tmp_path / 'b.jsonl'}:1"


def test_max_new_tokens_bounds_accepted(tmp_path):
    f = write(tmp_path / "p.jsonl", chat(id="lo", max_new_tokens=1), chat(id="hi", max_new_tokens=MAX_NEW_TOKENS_LIMIT))
    assert [p.max_new_tokens for p in load_prompts(f)] == [1, MAX_NEW_TOKENS_LIMIT]


# ---------------------------------------------------------------------------------------------------------------
# Malformed lines: PromptFileError naming file:line
# ---------------------------------------------------------------------------------------------------------------

BAD_LINES = {
    "bad-json": ('{"id": "x", "category": ', "invalid JSON"),
    "trailing-garbage": (line(**chat()) + " x", "invalid JSON"),
    "array": ("[1, 2]", "expected a JSON object, got list"),
    "string": ('"hello"', "expected a JSON object, got str"),
    "number": ("42", "expected a JSON object, got int"),
    "null": ("null", "expected a JSON object, got NoneType"),
    "missing-id": (line(category="c", messages=USER_MSG), "'id'"),
    "missing-category": (line(id="x", messages=USER_MSG), "'category'"),
    "empty-id": (line(id="", category="c", messages=USER_MSG), "'id'"),
    "blank-category": (line(id="x", category="  ", messages=USER_MSG), "'category'"),
    "id-int": (line(id=5, category="c", messages=USER_MSG), "'id'"),
    "id-bad-chars": (line(id="a b", category="c", messages=USER_MSG), "'a b'"),
    "id-slash": (line(id="../etc", category="c", messages=USER_MSG), "'../etc'"),
    "id-too-long": (line(id="a" * 129, category="c", messages=USER_MSG), "1-128"),
    "category-list": (line(id="x", category=["c"], messages=USER_MSG), "'category'"),
    "both-messages-and-text": (line(id="x", category="c", messages=USER_MSG, text="t"), "exactly one of"),
    "neither-messages-nor-text": (line(id="x", category="c"), "exactly one of"),
    "text-int": (line(id="x", category="c", text=3), "'text'"),
    "text-blank": (line(id="x", category="c", text="   "), "'text'"),
    "max-new-tokens-bool": (line(**chat(max_new_tokens=True)), "max_new_tokens"),
    "max-new-tokens-str": (line(**chat(max_new_tokens="8")), "max_new_tokens"),
    "max-new-tokens-zero": (line(**chat(max_new_tokens=0)), "max_new_tokens"),
    "max-new-tokens-negative": (line(**chat(max_new_tokens=-1)), "max_new_tokens"),
    "max-new-tokens-5000": (line(**chat(max_new_tokens=5000)), "5000"),
    "max-new-tokens-float": (line(**chat(max_new_tokens=8.0)), "max_new_tokens"),
    "skip-yes": (line(**chat(skip_if_too_long="yes")), "skip_if_too_long"),
    "skip-int": (line(**chat(skip_if_too_long=1)), "skip_if_too_long"),
    "messages-empty": (line(**chat(messages=[])), "'messages'"),
    "messages-not-list": (line(**chat(messages="Hello")), "'messages'"),
    "message-not-object": (line(**chat(messages=["Hello"])), "messages[0]"),
    "message-extra-key": (line(**chat(messages=[{"role": "user", "content": "Hi", "name": "bob"}])), "messages[0]"),
    "message-missing-content": (line(**chat(messages=[{"role": "user"}])), "messages[0]"),
    "message-bad-role": (line(**chat(messages=[{"role": "robot", "content": "Hi"}])), "'robot'"),
    "message-role-case": (line(**chat(messages=[{"role": "User", "content": "Hi"}])), "'User'"),
    "message-content-int": (line(**chat(messages=[{"role": "user", "content": 1}])), "messages[0].content"),
    "second-message-bad-role": (
        line(**chat(messages=[{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}])), "messages[1]"),
    "last-message-assistant": (
        line(**chat(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])), "last message"),
    "last-message-system": (line(**chat(messages=[{"role": "system", "content": "a"}])), "last message"),
    "unknown-field": (line(**chat(temperature=0.7)), "temperature"),
}


@pytest.mark.parametrize("bad, fragment", list(BAD_LINES.values()), ids=list(BAD_LINES))
def test_malformed_line_names_file_and_line(tmp_path, bad, fragment):
    # the bad line is the third line, after a valid one and a blank one
    f = write(tmp_path / "set.jsonl", chat(id="ok"), "", bad, chat(id="after"))
    assert_error_at(f, 3, lambda: load_prompts(f), fragment)


def test_malformed_line_in_directory_names_that_file(tmp_path):
    write(tmp_path / "a.jsonl", chat(id="a"))
    bad = write(tmp_path / "b.jsonl", chat(id="b"), chat(id="c", max_new_tokens=0))
    assert_error_at(bad, 2, lambda: load_prompts(tmp_path), "max_new_tokens")


def test_duplicate_id_in_one_file(tmp_path):
    f = write(tmp_path / "p.jsonl", chat(id="same"), chat(id="other"), chat(id="same"))
    err = assert_error_at(f, 3, lambda: load_prompts(f), "'same'")
    assert f"{f}:1" in str(err)  # points at the first use too


def test_duplicate_id_across_files_of_a_directory(tmp_path):
    first = write(tmp_path / "a.jsonl", chat(id="x"), chat(id="dup"))
    second = write(tmp_path / "b.jsonl", chat(id="y"), chat(id="z"), chat(id="dup"))
    err = assert_error_at(second, 3, lambda: load_prompts(tmp_path), "'dup'", "unique")
    assert f"{first}:2" in str(err)


def test_empty_file(tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_bytes(b"")
    assert_error_at(f, None, lambda: load_prompts(f), "no prompt")


def test_only_blank_lines(tmp_path):
    f = tmp_path / "blank.jsonl"
    f.write_text("\n   \n\t\n\r\n\n")
    assert_error_at(f, None, lambda: load_prompts(f), "no prompt")


def test_empty_file_inside_directory(tmp_path):
    write(tmp_path / "a.jsonl", chat(id="a"))
    empty = tmp_path / "b.jsonl"
    empty.write_text("")
    assert_error_at(empty, None, lambda: load_prompts(tmp_path), "no prompt")


def test_binary_file(tmp_path):
    f = tmp_path / "model.jsonl"
    f.write_bytes(line(**chat()).encode() + b"\n\x00\x01\x02\xff binary")
    assert_error_at(f, None, lambda: load_prompts(f), "NUL", "binary")


def test_invalid_utf8(tmp_path):
    f = tmp_path / "latin1.jsonl"
    good = line(**chat(id="ok")).encode()
    bad = '{"id": "x", "category": "café", "text": "t"}'.encode("latin-1")
    f.write_bytes(good + b"\n" + good.replace(b'"ok"', b'"ok2"') + b"\n" + bad + b"\n")
    assert_error_at(f, 3, lambda: load_prompts(f), "UTF-8")


def test_line_over_max_line_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(prompts_module, "MAX_LINE_BYTES", 200)
    f = write(tmp_path / "long.jsonl", chat(id="short"), chat(id="long", messages=[{"role": "user", "content": "x" * 300}]))
    assert_error_at(f, 2, lambda: load_prompts(f), "limit")


def test_line_exactly_max_line_bytes_is_accepted(tmp_path, monkeypatch):
    text = line(**chat(id="edge"))
    monkeypatch.setattr(prompts_module, "MAX_LINE_BYTES", len(text.encode()))
    f = write(tmp_path / "edge.jsonl", text)
    assert [p.id for p in load_prompts(f)] == ["edge"]


def test_missing_path(tmp_path):
    missing = tmp_path / "nope.jsonl"
    assert_error_at(missing, None, lambda: load_prompts(missing), "does not exist")


def test_directory_without_jsonl(tmp_path):
    (tmp_path / "prompts.json").write_text(line(**chat()))
    assert_error_at(tmp_path, None, lambda: load_prompts(tmp_path), "no *.jsonl")


def test_id_with_trailing_newline_rejected(tmp_path):
    f = write(tmp_path / "p.jsonl", line(id="abc\n", category="c", text="t"))
    assert_error_at(f, 1, lambda: load_prompts(f), "id")


def test_deeply_nested_json_gives_prompt_file_error(tmp_path):
    f = tmp_path / "deep.jsonl"
    f.write_text("[" * 100_000 + "\n")
    assert_error_at(f, 1, lambda: load_prompts(f), "JSON")


def test_huge_integer_literal_gives_prompt_file_error(tmp_path):
    f = tmp_path / "bigint.jsonl"
    f.write_text('{"id": "a", "category": "c", "text": "t", "max_new_tokens": ' + "1" * 5000 + "}\n")
    assert_error_at(f, 1, lambda: load_prompts(f))


# ---------------------------------------------------------------------------------------------------------------
# The shipped golden set
# ---------------------------------------------------------------------------------------------------------------

REQUIRED_CATEGORIES = {"knowledge-zh", "reasoning-en", "arithmetic-thinking", "multi-turn", "code", "summarization", "long-context"}


def test_golden_directory_loads_with_required_categories():
    loaded = load_prompts(GOLDEN)
    categories = {p.category for p in loaded}
    assert REQUIRED_CATEGORIES <= categories, REQUIRED_CATEGORIES - categories
    assert len({p.id for p in loaded}) == len(loaded)
    multi = [p for p in loaded if p.category == "multi-turn"]
    assert multi and all(p.is_chat and len(p.messages) >= 3 for p in multi)


def test_golden_long_context_prompt_is_skippable():
    long_prompts = [p for p in load_prompts(GOLDEN) if p.category == "long-context"]
    assert long_prompts
    for p in long_prompts:
        assert p.skip_if_too_long is True
        assert sum(len(m.content) for m in p.messages or ()) + len(p.text or "") > 5000


# ---------------------------------------------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stories_tokenizer():
    from precision.tokenizer import load_tokenizer

    return load_tokenizer(STORIES)


@pytest.fixture(scope="module")
def chatml_tokenizer():
    from precision.default_model import build_tokenizer

    return build_tokenizer()


def test_render_plain_chat():
    msgs = (Message("system", "S"), Message("user", "U1"), Message("assistant", "A"), Message("user", "U2"))
    assert render_plain_chat(msgs) == "System: S\nUser: U1\nAssistant: A\nUser: U2\nAssistant:"


def test_tokenize_plain_chat_and_raw_text_with_stories(tmp_path, stories_tokenizer):
    tok = stories_tokenizer
    assert not getattr(tok, "chat_template", None)
    f = write(
        tmp_path / "p.jsonl",
        chat(id="c", messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                               {"role": "user", "content": "Tell me a story"}], max_new_tokens=5, skip_if_too_long=True),
        {"id": "r", "category": "raw", "text": "Once upon a time"},
    )
    loaded = load_prompts(f)
    out = tokenize_prompts(loaded, tok, default_max_new_tokens=11)
    assert [t.id for t in out] == ["c", "r"]
    c, r = out
    assert c.rendering == "plain-chat" and r.rendering == "raw-text"
    expected_text = render_plain_chat(loaded[0].messages)
    assert c.token_ids == tuple([1] + tok(expected_text, add_special_tokens=False)["input_ids"])
    assert r.token_ids == tuple([1] + tok("Once upon a time", add_special_tokens=False)["input_ids"])
    assert c.token_ids[0] == 1 and r.token_ids[0] == 1 and 1 not in c.token_ids[1:]
    assert all(isinstance(i, int) for i in c.token_ids + r.token_ids)
    assert tok.decode(c.token_ids, skip_special_tokens=True).strip() == expected_text
    assert c.max_new_tokens == 5 and r.max_new_tokens == 11
    assert c.skip_if_too_long is True and r.skip_if_too_long is False
    assert c.source == f"{f}:1" and r.source == f"{f}:2"
    assert c.category == "cat" and r.category == "raw"


def test_tokenize_default_max_new_tokens(stories_tokenizer):
    prompt = Prompt("x", "c", None, "Hello", None, False, "f:1")
    assert tokenize_prompts([prompt], stories_tokenizer)[0].max_new_tokens == DEFAULT_MAX_NEW_TOKENS


def test_tokenize_with_chat_template(tmp_path, chatml_tokenizer):
    tok = chatml_tokenizer
    assert tok.chat_template
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "中国的首都是哪座城市？"},
             {"role": "assistant", "content": "北京"}, {"role": "user", "content": "Why <think>?"}]
    f = write(tmp_path / "p.jsonl", chat(id="c", messages=convo), {"id": "r", "category": "raw", "text": "plain <|im_start|>"})
    c, r = tokenize_prompts(load_prompts(f), tok)
    assert c.rendering == "chat-template"
    text = tok.apply_chat_template(convo, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    assert list(c.token_ids) == tok(text, add_special_tokens=False)["input_ids"]
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    assert c.token_ids[0] == im_start and c.token_ids.count(im_start) == 5
    assert tok.decode(c.token_ids) == text
    # raw text never goes through the template, even when the tokenizer has one
    assert r.rendering == "raw-text"
    assert list(r.token_ids) == tok("plain <|im_start|>")["input_ids"]
    assert not tok.decode(r.token_ids).startswith("<|im_start|>user")


def test_tokenize_empty_result_is_prompt_file_error():
    class EmptyTokenizer:
        chat_template = None

        def __call__(self, text, **kwargs):
            return {"input_ids": []}

    prompt = Prompt("empty", "c", None, "x", None, False, "set.jsonl:4")
    with pytest.raises(PromptFileError, match=r"set\.jsonl:4.*'empty'"):
        tokenize_prompts([prompt], EmptyTokenizer())


def test_lone_surrogate_gives_prompt_file_error(tmp_path, stories_tokenizer):
    f = tmp_path / "sur.jsonl"
    f.write_text('{"id": "a", "category": "c", "text": "x\\ud800"}\n')
    with pytest.raises(PromptFileError, match=rf"{f}:1"):
        tokenize_prompts(load_prompts(f), stories_tokenizer)


# ---------------------------------------------------------------------------------------------------------------
# Fuzzing: load_prompts returns prompts or raises PromptFileError, nothing else
# ---------------------------------------------------------------------------------------------------------------

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ_SETTINGS = settings(max_examples=150, deadline=None, database=None, derandomize=True,
                         suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

_json_leaf = st.none() | st.booleans() | st.integers(-10, 10_000) | st.floats(allow_nan=True) | st.text(max_size=12)
_json_value = st.recursive(_json_leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)
_field_name = st.sampled_from(["id", "category", "messages", "text", "max_new_tokens", "skip_if_too_long", "role", "extra"])
_message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "bot", ""]), "content": st.text(max_size=10) | _json_leaf}),
    _json_value,
)
_prompt_like = st.fixed_dictionaries(
    {},
    optional={
        "id": st.from_regex(r"[A-Za-z0-9._-]{1,10}", fullmatch=True) | _json_leaf,
        "category": st.text(max_size=8) | _json_leaf,
        "messages": st.lists(_message, max_size=3) | _json_value,
        "text": st.text(max_size=10) | _json_leaf,
        "max_new_tokens": st.integers(-2, 5000) | _json_leaf,
        "skip_if_too_long": st.booleans() | _json_leaf,
    },
) | st.dictionaries(_field_name, _json_value, max_size=6) | _json_value


def _check_load(path: Path) -> None:
    try:
        result = load_prompts(path)
    except PromptFileError as exc:
        assert str(path) in str(exc)
        return
    assert result and all(isinstance(p, Prompt) for p in result)
    assert len({p.id for p in result}) == len(result)
    for p in result:
        assert (p.messages is None) != (p.text is None)
        assert p.source.startswith(f"{path}:")


@FUZZ_SETTINGS
@given(data=st.binary(max_size=300))
def test_fuzz_random_bytes(tmp_path, data):
    f = tmp_path / "fuzz.jsonl"
    f.write_bytes(data)
    _check_load(f)


@FUZZ_SETTINGS
@given(items=st.lists(_prompt_like, min_size=0, max_size=4), garbage=st.lists(st.sampled_from(["", "  ", "{", "}", "[]", "\x00", "\ufeff"]), max_size=2))
def test_fuzz_json_lines(tmp_path, items, garbage):
    lines = [json.dumps(item, ensure_ascii=bool(i % 2)) for i, item in enumerate(items)]
    lines += garbage
    f = tmp_path / "fuzz.jsonl"
    f.write_text("\n".join(lines), encoding="utf-8")
    _check_load(f)
