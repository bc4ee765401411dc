"""The built-in default model: a small synthetic LlamaForCausalLM shaped like a scaled-down Nanbeige4-3B.

Nanbeige4-3B: hidden 2560, 32 layers, 20 heads / 4 KV heads (GQA 5:1), head_dim 128, SwiGLU, RMSNorm, rope theta
5e6. Scaled down: hidden 320, 4 layers, 10 heads / 2 KV heads (GQA 5:1), head_dim 32 (the smallest head size
vLLM's CPU attention accepts), intermediate 864, rope theta 5e6, 16k positions (for long-context tests).
The tokenizer is byte-level (every UTF-8 byte is a token, so any text encodes, Chinese included) with ChatML
special tokens and a ChatML chat template. Weights are random but deterministic from ``SEED``, scaled so that
activations keep their size through the layers: greedy output depends on the context (a plain 0.02 init
collapses to one repeated token).

Built once into a cache directory (``$PRECISION_CHECK_HOME``, default ~/.cache/precision-check) and reused.

The same recipe (tokenizer, initialisation) builds tiny checkpoints of each supported model family
(precision.model_families) for the tests: ``build_tiny_model("qwen3", path)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from precision.io import staged_directory

log = logging.getLogger(__name__)

SEED = 20261127
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ARCHITECTURE = {
    "hidden_size": 320,
    "intermediate_size": 864,
    "num_hidden_layers": 4,
    "num_attention_heads": 10,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 16384,
    "rope_theta": 5e6,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}
RECIPE_VERSION = 1  # bump when anything above or in the build changes


def cache_root() -> Path:
    return Path(os.environ.get("PRECISION_CHECK_HOME", Path.home() / ".cache" / "precision-check"))


def _recipe_hash() -> str:
    recipe = json.dumps({"v": RECIPE_VERSION, "seed": SEED, "arch": ARCHITECTURE, "special": SPECIAL_TOKENS, "template": CHATML_TEMPLATE}, sort_keys=True)
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


def default_model_path() -> Path:
    """The built-in model's directory, building it on first use."""
    path = cache_root() / "models" / f"builtin-llama-{_recipe_hash()}"
    if not (path / "config.json").is_file():
        build_default_model(path)
    return path


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        additional_special_tokens=["<think>", "</think>"],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_default_model(path: Path) -> Path:
    from transformers import LlamaConfig

    log.info("building the built-in default model in %s", path)
    readme = f"Built-in synthetic model of precision-check (seed {SEED}, recipe {_recipe_hash()}). Random weights: its text is meaningless; its numerics are real.\n"
    return build_random_checkpoint(path, LlamaConfig, "LlamaForCausalLM", ARCHITECTURE, SEED, readme,
                                   hidden_act="silu", attention_bias=False, mlp_bias=False)


def build_random_checkpoint(path: Path, config_class, architecture: str, shape: dict, seed: int, readme: str, **settings) -> Path:
    """A causal LM of ``config_class`` (a transformers config) with this module's byte-level ChatML tokenizer and
    random weights deterministic from ``seed``, saved (safetensors, BF16) into ``path`` atomically.

    Weights are scaled so that activations keep their size through the layers (see the module docstring);
    biases (Qwen2's q/k/v projections) are small and nonzero, so that a backend dropping them shows."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    tokenizer = build_tokenizer()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = config_class(vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=eos, pad_token_id=pad, **settings, **shape)
    config.architectures = [architecture]
    generator = torch.Generator().manual_seed(seed)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                # Norm gains around 1, not exactly 1, so that every weight matters.
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            elif name.endswith("embed_tokens.weight"):
                param.copy_(torch.randn(param.shape, generator=generator))
            elif name.endswith(".bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
            else:
                fan_in = param.shape[1]
                gain = 2.0 if name == "lm_head.weight" else 1.0
                param.copy_(torch.randn(param.shape, generator=generator) * gain / fan_in**0.5)
    model = model.to(torch.bfloat16)
    with staged_directory(path, ".builtin-") as staging:
        model.save_pretrained(staging, safe_serialization=True)
        GenerationConfig(eos_token_id=eos, pad_token_id=pad, do_sample=False).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "README.md").write_text(readme)
    return path


# -- tiny checkpoints of each supported model family (tests, examples) -------------------------------------------
TINY_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,  # the smallest head size vLLM's CPU attention accepts: no head padding (which q/k norms forbid)
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
}
TINY_FAMILIES = {
    # family: (transformers config class, architecture, what sets the family apart)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),  # q/k/v biases are part of Qwen2
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"attention_bias": False, "tie_word_embeddings": False}),  # q/k RMSNorms
    # A sliding window shorter than the tests' prompts, so that every consumer of the model must honour it.
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 16, "tie_word_embeddings": False}),
}


def build_tiny_model(family: str, path: Path, seed: int = SEED) -> Path:
    """A tiny random checkpoint of ``family`` (a key of TINY_FAMILIES) in ``path``: hidden 64, 2 layers, GQA 2:1,
    head_dim 32, the built-in model's tokenizer. Builds in well under a second."""
    import transformers

    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {sorted(TINY_FAMILIES)}")
    config_name, architecture, settings = TINY_FAMILIES[family]
    readme = f"Tiny random {architecture} built by precision-check (seed {seed}) to test the {family} model family.\n"
    return build_random_checkpoint(path, getattr(transformers, config_name), architecture, TINY_SHAPE, seed, readme,
                                   hidden_act="silu", **settings)
