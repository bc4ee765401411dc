"""From a prompt set to a capture plan: tokenize once with the reference tokenizer, check context lengths."""

from __future__ import annotations

from pathlib import Path

from precision.capture.writer import CapturePlan, PlannedPrompt
from precision.errors import PrecisionError
from precision.model import ModelInfo
from precision.prompts import DEFAULT_MAX_NEW_TOKENS, load_prompts, tokenize_prompts
from precision.tokenizer import load_tokenizer, tokenizer_facts


def plan_from_prompts(prompts_path: str | Path, model: ModelInfo, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                      trust_remote_code: bool = False, max_model_len: int | None = None) -> CapturePlan:
    """Tokenize the prompt set and keep the prompts that fit the model's context.

    A prompt whose tokens plus ``max_new_tokens`` exceed the context is an error naming it, unless the prompt
    says ``skip_if_too_long``: then it is skipped and the skip is recorded.
    """
    prompts = load_prompts(prompts_path)
    tokenizer = load_tokenizer(model.path, trust_remote_code=trust_remote_code)
    tokenized = tokenize_prompts(prompts, tokenizer, default_max_new_tokens=max_new_tokens)
    limit = min(model.max_position_embeddings, max_model_len or model.max_position_embeddings)
    planned, skipped = [], []
    for item in tokenized:
        # One position stays free: engines run the teacher-forced sequence and ask for one more token.
        needed = len(item.token_ids) + item.max_new_tokens + 1
        if needed > limit:
            reason = f"needs {len(item.token_ids)} prompt + {item.max_new_tokens} new tokens + 1 = {needed}, the model's context is {limit}"
            if item.skip_if_too_long:
                skipped.append({"id": item.id, "reason": reason})
                continue
            raise PrecisionError(
                f"{item.source}: prompt {item.id!r} is too long for the model: {reason}. "
                "Shorten it, lower max_new_tokens, or mark it \"skip_if_too_long\": true"
            )
        planned.append(PlannedPrompt(item.id, item.category, item.rendering, item.token_ids, item.max_new_tokens))
    if not planned:
        raise PrecisionError(f"no prompt of {prompts_path} fits the model's context of {limit} tokens; use shorter prompts")
    return CapturePlan(prompts=tuple(planned), tokenizer=tokenizer_facts(tokenizer, model.path), skipped=tuple(skipped))
