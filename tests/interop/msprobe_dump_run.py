"""Run transformers under msprobe's PyTorch dump (PrecisionDebugger) and write a real msprobe dump. Run as a script in
a process of its own, because msprobe patches torch globally:

    python msprobe_dump_run.py MODEL_DIR DUMP_DIR --ids JSON [--dtype bfloat16] [--task tensor] [--level L0]
                               [--generate N] [--deferred-residual]

Default: one step per token id sequence (JSON: a list of lists), each one forward pass over the whole sequence
(use_cache=False): how a user dumps a teacher-forced run. --generate N: one step holding a greedy generation of N
tokens with a KV cache (a prefill and N - 1 decode passes). --deferred-residual: the same weights run with vLLM's
layer structure (each decoder layer returns (hidden, residual) and the next one adds them before its norm; the final
norm returns (normed, residual)), the same operations in the same order as transformers' Llama, so the residual
stream is bit-identical while the dump holds what a vLLM dump holds. Used by tests/interop.
"""

import argparse
import json
import tempfile
from pathlib import Path

import torch
from torch import nn


class DeferredLayer(nn.Module):
    """vLLM's LlamaDecoderLayer structure around transformers' modules."""

    def __init__(self, layer) -> None:
        super().__init__()
        self.input_layernorm, self.self_attn = layer.input_layernorm, layer.self_attn
        self.post_attention_layernorm, self.mlp = layer.post_attention_layernorm, layer.mlp

    def forward(self, hidden, residual, position_embeddings):
        if residual is None:
            residual = hidden
        else:
            residual = residual + hidden  # transformers adds the same two bf16 tensors (commutative, one rounding)
        normed = self.input_layernorm(residual)
        attention = self.self_attn(hidden_states=normed, attention_mask=None, position_embeddings=position_embeddings)[0]
        residual = residual + attention
        return self.mlp(self.post_attention_layernorm(residual)), residual


class FusedAddNorm(nn.Module):
    def __init__(self, norm) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, hidden, residual):
        residual = residual + hidden
        return self.norm(residual), residual


class DeferredModel(nn.Module):
    def __init__(self, hf_model) -> None:
        super().__init__()
        inner = hf_model.model
        self.embed_tokens, self.rotary_emb = inner.embed_tokens, inner.rotary_emb
        self.layers = nn.ModuleList(DeferredLayer(layer) for layer in inner.layers)
        self.norm = FusedAddNorm(inner.norm)

    def forward(self, input_ids):
        hidden = self.embed_tokens(input_ids)
        position_embeddings = self.rotary_emb(hidden, torch.arange(input_ids.shape[1])[None])
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, position_embeddings)
        return self.norm(hidden, residual)[0]


class DeferredCausalLM(nn.Module):
    def __init__(self, hf_model) -> None:
        super().__init__()
        self.model, self.lm_head = DeferredModel(hf_model), hf_model.lm_head

    def forward(self, input_ids):
        return self.lm_head(self.model(input_ids))


def main() -> None:
    from msprobe.pytorch import PrecisionDebugger
    from transformers import AutoModelForCausalLM

    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("dump_dir")
    parser.add_argument("--ids", required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--task", default="tensor")
    parser.add_argument("--level", default="L0")
    parser.add_argument("--generate", type=int, default=0)
    parser.add_argument("--deferred-residual", action="store_true")
    args = parser.parse_args()

    hf_model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=getattr(torch, args.dtype)).eval()
    model = DeferredCausalLM(hf_model).eval() if args.deferred_residual else hf_model
    config = {"task": args.task, "dump_path": args.dump_dir, "rank": [], "step": [], "level": args.level,
              args.task: {"scope": [], "list": [], "data_mode": ["all"]}}
    with tempfile.TemporaryDirectory() as scratch:
        config_path = Path(scratch) / "config.json"
        config_path.write_text(json.dumps(config))
        debugger = PrecisionDebugger(config_path=str(config_path))
        for sequence in json.loads(args.ids):
            ids = torch.tensor([sequence])
            debugger.start(model)
            with torch.no_grad():
                if args.generate:
                    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.generate, do_sample=False)
                elif args.deferred_residual:
                    model(ids)
                else:
                    model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
            debugger.stop()
            debugger.step()


if __name__ == "__main__":
    main()
