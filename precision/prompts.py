"""Golden prompt sets: JSONL files -> validated prompts -> token ids.

Schema (one JSON object per line; blank lines are ignored):

    id               str, required, unique in the set, letters/digits/'.'/'_'/'-' only
    category         str, required (e.g. "knowledge-zh", "reasoning", "long-context")
    messages         list of {"role": "system"|"user"|"assistant", "content": str}   -- chat prompt
    text             str                                                             -- raw prompt
                     (exactly one of messages / text)
    max_new_tokens   int in [1, 4096], optional (default: the run's --max-new-tokens, 32)
    skip_if_too_long bool, optional (default false): when prompt + continuation does not fit the
                     model's context, skip this prompt (recorded in the manifest and the report)
                     instead of refusing the whole run

Token ids are computed once, with the reference tokenizer, and fed unchanged to every backend.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from precision.errors import PromptFileError

MAX_LINE_BYTES = 4 * 1024 * 1024
MAX_NEW_TOKENS_LIMIT = 4096
DEFAULT_MAX_NEW_TOKENS = 32
_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_ROLES = ("system", "user", "assistant")
_KNOWN_FIELDS = {"id", "category", "messages", "text", "max_new_tokens", "skip_if_too_long"}

# How prompts are turned into text when the tokenizer has no chat template (stories260K, for example).
PLAIN_CHAT_RENDERING = "plain-chat: '<Role>: <content>\\n' per message, then 'Assistant:'; tokenizer's own BOS"


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Prompt:
    id: str
    category: str
    messages: tuple[Message, ...] | None
    text: str | None
    max_new_tokens: int | None
    skip_if_too_long: bool
    source: str  # "file:line", for messages that point back at the prompt

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


@dataclass(frozen=True)
class TokenizedPrompt:
    id: str
    category: str
    token_ids: tuple[int, ...]
    max_new_tokens: int
    rendering: str  # "chat-template", "plain-chat" or "raw-text"
    skip_if_too_long: bool
    source: str


def load_prompts(path: str | Path) -> list[Prompt]:
    """Load a prompt set from a .jsonl file or from every *.jsonl file of a directory (sorted by name)."""
    path = Path(path)
    if not path.exists():
        raise PromptFileError(f"prompt path {path} does not exist; pass a .jsonl file or a directory of them (e.g. golden/)")
    if path.is_dir():
        files = sorted(p for p in path.glob("*.jsonl") if not p.is_dir())  # a folder named *.jsonl holds no prompts
        for file in files:
            _require_regular_file(file)
        if not files:
            raise PromptFileError(f"prompt directory {path} holds no *.jsonl file; add one (see golden/README.md for the schema)")
    else:
        _require_regular_file(path)
        files = [path]
    prompts: list[Prompt] = []
    seen: dict[str, str] = {}
    for file in files:
        for prompt in _load_file(file):
            if prompt.id in seen:
                raise PromptFileError(f"{prompt.source}: prompt id {prompt.id!r} is already used at {seen[prompt.id]}; ids must be unique")
            seen[prompt.id] = prompt.source
            prompts.append(prompt)
    if not prompts:
        raise PromptFileError(f"no prompts found in {path}; each line of a .jsonl file must hold one prompt object")
    return prompts


def _require_regular_file(file: Path) -> None:
    """A FIFO or device would block or never end; a dangling link would be skipped without a word."""
    if file.is_symlink() and not file.exists():
        raise PromptFileError(f"prompt file {file} is a symbolic link to nothing ({os.readlink(file)}); fix or remove the link")
    if not file.is_file():
        raise PromptFileError(f"prompt path {file} is not a regular file (a FIFO, device or directory); pass a .jsonl file or a directory of them")


def _load_file(file: Path) -> list[Prompt]:
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise PromptFileError(f"cannot read prompt file {file}: {exc.strerror}; check the path and its permissions") from exc
    if b"\x00" in raw:
        raise PromptFileError(f"{file} looks binary (it contains NUL bytes); a prompt file is UTF-8 JSON Lines text")
    prompts = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        where = f"{file}:{number}"
        if len(line) > MAX_LINE_BYTES:
            raise PromptFileError(f"{where}: line is {len(line):,} bytes, over the {MAX_LINE_BYTES:,}-byte limit; split the prompt or shorten it")
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PromptFileError(f"{where}: not valid UTF-8 (byte {exc.start}); save the file as UTF-8") from exc
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PromptFileError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno}); each line must be one JSON object") from exc
        except (RecursionError, ValueError) as exc:  # absurd nesting, integers beyond Python's digit limit
            raise PromptFileError(f"{where}: JSON that cannot be read ({type(exc).__name__}: {str(exc)[:80]}); each line must be one plain JSON object") from exc
        prompts.append(_parse_prompt(obj, where))
    if not prompts:
        raise PromptFileError(f"{file} holds no prompt; add one JSON object per line (see golden/README.md)")
    return prompts


def _parse_prompt(obj: Any, where: str) -> Prompt:
    if not isinstance(obj, dict):
        raise PromptFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = set(obj) - _KNOWN_FIELDS
    if unknown:
        raise PromptFileError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: {sorted(_KNOWN_FIELDS)}")
    prompt_id = _require_str(obj, "id", where)
    if not _ID_PATTERN.fullmatch(prompt_id):
        raise PromptFileError(f"{where}: id {prompt_id!r} must be 1-128 letters, digits, '.', '_' or '-'")
    category = _require_str(obj, "category", where)
    has_messages, has_text = "messages" in obj, "text" in obj
    if has_messages == has_text:
        raise PromptFileError(f"{where}: prompt {prompt_id!r} needs exactly one of 'messages' (chat) or 'text' (raw)")
    messages = _parse_messages(obj["messages"], where) if has_messages else None
    text = _require_str(obj, "text", where) if has_text else None
    max_new_tokens = obj.get("max_new_tokens")
    if max_new_tokens is not None and (
        isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= MAX_NEW_TOKENS_LIMIT
    ):
        raise PromptFileError(f"{where}: max_new_tokens must be an integer from 1 to {MAX_NEW_TOKENS_LIMIT}, got {max_new_tokens!r}")
    skip = obj.get("skip_if_too_long", False)
    if not isinstance(skip, bool):
        raise PromptFileError(f"{where}: skip_if_too_long must be true or false, got {skip!r}")
    return Prompt(prompt_id, category, messages, text, max_new_tokens, skip, where)


def _check_encodable(value: str, where: str, what: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # JSON "\ud800" escapes decode to lone surrogates no tokenizer accepts
        raise PromptFileError(f"{where}: {what} holds an unpaired surrogate escape at character {exc.start}; write real UTF-8 text") from exc
    return value


def _require_str(obj: dict, key: str, where: str) -> str:
    if key not in obj:
        raise PromptFileError(f"{where}: missing required field {key!r}")
    value = obj[key]
    if not isinstance(value, str) or not value.strip():
        raise PromptFileError(f"{where}: field {key!r} must be a non-empty string, got {value!r:.60}")
    return _check_encodable(value, where, repr(key))


def _parse_messages(value: Any, where: str) -> tuple[Message, ...]:
    if not isinstance(value, list) or not value:
        raise PromptFileError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    messages = []
    for index, item in enumerate(value):
        if not isinstance(item, dict) or set(item) != {"role", "content"}:
            raise PromptFileError(f"{where}: messages[{index}] must be an object with exactly 'role' and 'content'")
        role, content = item["role"], item["content"]
        if role not in _ROLES:
            raise PromptFileError(f"{where}: messages[{index}].role is {role!r}; use one of {list(_ROLES)}")
        if not isinstance(content, str):
            raise PromptFileError(f"{where}: messages[{index}].content must be a string")
        _check_encodable(content, where, f"messages[{index}].content")
        messages.append(Message(role, content))
    if messages[-1].role != "user":
        raise PromptFileError(f"{where}: the last message must be from the user (the model answers it)")
    return tuple(messages)


def render_plain_chat(messages: tuple[Message, ...]) -> str:
    lines = [f"{m.role.capitalize()}: {m.content}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


def tokenize_prompts(prompts: list[Prompt], tokenizer: Any, *, default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> list[TokenizedPrompt]:
    """Token ids for each prompt with the reference tokenizer: its chat template when it has one."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    result = []
    for prompt in prompts:
        if prompt.is_chat and has_template:
            conversation = [{"role": m.role, "content": m.content} for m in prompt.messages]
            try:
                text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
            except Exception as exc:  # jinja2's sandbox and template errors; the template is the model's, not ours
                raise PromptFileError(f"{prompt.source}: the model's chat template failed on prompt {prompt.id!r} "
                                      f"({type(exc).__name__}: {str(exc)[:120]}); fix the template in tokenizer_config.json or use a 'text' prompt") from exc
            # The template writes its own special tokens (BOS included), so none are added again.
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            rendering = "chat-template"
        elif prompt.is_chat:
            ids = tokenizer(render_plain_chat(prompt.messages))["input_ids"]
            rendering = "plain-chat"
        else:
            ids = tokenizer(prompt.text)["input_ids"]
            rendering = "raw-text"
        if not ids:
            raise PromptFileError(f"{prompt.source}: prompt {prompt.id!r} tokenizes to no token at all")
        result.append(
            TokenizedPrompt(
                id=prompt.id,
                category=prompt.category,
                token_ids=tuple(int(i) for i in ids),
                max_new_tokens=prompt.max_new_tokens or default_max_new_tokens,
                rendering=rendering,
                skip_if_too_long=prompt.skip_if_too_long,
                source=prompt.source,
            )
        )
    return result
