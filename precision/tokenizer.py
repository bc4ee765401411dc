"""The reference tokenizer: loading it and recording what identifies it."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from precision.errors import ModelError
from precision.model import sha256_file
from precision.prompts import PLAIN_CHAT_RENDERING


def load_tokenizer(model_path: str | Path, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a tokenizer from {model_path}: {exc}") from exc


def tokenizer_facts(tokenizer: Any, model_path: str | Path) -> dict[str, Any]:
    template = getattr(tokenizer, "chat_template", None)
    tokenizer_json = Path(model_path) / "tokenizer.json"
    return {
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "has_chat_template": bool(template),
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest() if isinstance(template, str) else None,
        "tokenizer_json_sha256": sha256_file(tokenizer_json) if tokenizer_json.is_file() else None,
        "plain_chat_rendering": None if template else PLAIN_CHAT_RENDERING,
    }
