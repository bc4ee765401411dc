"""A random model of the seed model's exact shape (Nanbeige4-3B: LlamaForCausalLM, hidden 2560, 32 layers,
20 / 4 heads, intermediate 10496, vocabulary 166144, untied lm_head; 3.93B parameters, 7.9 GB in BF16), built from
its config with random weights, for benchmarks/seed_shape.py.

The weights follow precision.default_model's recipe (gains near 1 for the norms unless ``unit_norms``; fan-in scaled
projections) so that activations keep their size through 32 layers. ``unit_norms`` makes every norm weight exactly 1,
as a freshly initialised checkpoint has: fused and unfused RMSNorm then agree bit for bit (the case that once gave
an infinite envelope ratio). The tokenizer is the built-in model's byte-level one (its ids are far below 166144).

    .venv/bin/python benchmarks/seed_model.py /tmp/bench/seed-model [--unit-norms]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SEED_SHAPE = {
    "hidden_size": 2560, "intermediate_size": 10496, "num_hidden_layers": 32, "num_attention_heads": 20,
    "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 166144, "max_position_embeddings": 4096,
    "rope_theta": 7e7, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
}


def build(path: Path, *, unit_norms: bool = False, seed: int = 2026) -> Path:
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(REPO))
    from precision.default_model import build_tokenizer

    if (path / "config.json").is_file():
        return path
    tokenizer = build_tokenizer()
    eos, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = LlamaConfig(bos_token_id=None, eos_token_id=eos, pad_token_id=pad, hidden_act="silu", attention_bias=False,
                         mlp_bias=False, **SEED_SHAPE)
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, param in skeleton.named_parameters():
        if name.endswith("norm.weight"):
            value = torch.ones(param.shape) if unit_norms else 1.0 + 0.1 * torch.randn(param.shape, generator=generator)
        elif name.endswith("embed_tokens.weight"):
            value = torch.randn(param.shape, generator=generator)
        else:
            value = torch.randn(param.shape, generator=generator) * ((2.0 if name == "lm_head.weight" else 1.0) / param.shape[1] ** 0.5)
        tensors[name] = value.to(torch.bfloat16)
        del value
    staging = path.with_name(path.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    config.torch_dtype = "bfloat16"
    config.save_pretrained(staging)
    GenerationConfig(eos_token_id=eos, pad_token_id=pad, do_sample=False).save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "README.md").write_text(f"Random weights of Nanbeige4-3B's shape (seed {seed}, unit norms: {unit_norms}); "
                                       f"built by benchmarks/seed_model.py. Config: {json.dumps(SEED_SHAPE)}\n")
    staging.rename(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--unit-norms", action="store_true", help="every norm weight exactly 1")
    args = parser.parse_args(argv)
    print(build(args.path, unit_norms=args.unit_norms))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
