"""The model families precision-check supports, and a check that names what any other checkpoint lacks.

The capture hooks (transformers and vLLM), the layer replay and the implementation variants all work on the
Llama-family decoder layout: ``model.embed_tokens``, decoder layers ``model.layers.<i>`` of pre-norm attention
(q/k/v/o projections, rotary positions) and a dense SiLU-gated MLP (gate/up/down projections), ``model.norm`` and
an lm_head (or embeddings tied to it). Each family below keeps that layout and adds what sets it apart:
    Llama     the layout itself (optional attention / MLP biases)
    Qwen2     q/k/v projection biases (always present in a Qwen2 checkpoint)
    Qwen3     an RMSNorm over each head of q and of k before rotary (q_norm, k_norm)
    Mistral   Llama's layout under its own class (vLLM runs its own MistralForCausalLM), optional sliding window
Each was verified end to end (transformers BF16 reference, FP32 truth, envelope, replay, vLLM CPU target) on a
tiny random checkpoint of that architecture (tests/backends/test_model_families.py).

Anything else is refused when the model is inspected, before any model loads, with what is missing: another
architecture (GPT-2's fused c_attn and LayerNorm, a mixture-of-experts MLP, ...) would be captured by hooks that
find nothing, or replayed and perturbed by code that assumes modules it does not have.
"""

from __future__ import annotations

from dataclasses import dataclass

from precision.errors import ModelError

LAYER_TENSORS = (
    "input_layernorm.weight", "post_attention_layernorm.weight",
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
)
"""Tensors every decoder layer of every supported family has (names under ``model.layers.<i>.``)."""
MODEL_TENSORS = ("model.embed_tokens.weight", "model.norm.weight")
"""Tensors outside the layers every supported checkpoint has (lm_head.weight is absent when tied to the embeddings)."""
MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size", "num_experts_per_tok")
"""config.json keys that mark a mixture-of-experts model."""


@dataclass(frozen=True)
class Family:
    name: str
    architecture: str
    layer_tensors: tuple[str, ...]
    """Tensors each decoder layer has in this family beyond LAYER_TENSORS."""
    feature: str
    """What sets the family apart, in words (for messages)."""
    qk_norm: bool = False


FAMILIES = {family.architecture: family for family in (
    Family("Llama", "LlamaForCausalLM", (), "the Llama-family layout"),
    Family("Qwen2", "Qwen2ForCausalLM", ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), "q/k/v projection biases"),
    Family("Qwen3", "Qwen3ForCausalLM", ("self_attn.q_norm.weight", "self_attn.k_norm.weight"), "per-head q/k RMSNorms", qk_norm=True),
    Family("Mistral", "MistralForCausalLM", (), "the Llama-family layout under Mistral's class"),
)}
SUPPORTED = ", ".join(f"{f.name} ({f.architecture})" for f in FAMILIES.values())


def _missing(names: tuple[str, ...], tensors: set[str]) -> list[str]:
    return [name for name in names if name not in tensors]


def _listed(names: list[str], limit: int = 4) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _moe_key(config: dict) -> str | None:
    return next((key for key in MOE_KEYS if config.get(key)), None)


def check_family(architectures: list, config: dict, tensors: set[str], where: str) -> Family:
    """The supported family of a checkpoint (its config.json ``architectures`` and ``config``, the tensor names of its
    weights), or a ModelError that names what the checkpoint lacks and what to do. Reads no tensor data."""
    moe = _moe_key(config)
    if moe:
        raise ModelError(
            f"{where}: {architectures[0] if architectures else 'this model'} is a mixture-of-experts model ({moe}={config[moe]!r}); "
            "precision-check's capture, layer replay and implementation variants need a dense MLP in every decoder layer "
            f"(mlp.gate_proj / up_proj / down_proj), which it lacks. Supported families: {SUPPORTED}")
    family = next((FAMILIES[a] for a in architectures if a in FAMILIES), None)
    if family is None:
        layout = _missing(MODEL_TENSORS + tuple(f"model.layers.0.{name}" for name in LAYER_TENSORS), tensors)
        lacks = (f"its weights lack {_listed(layout)} of the Llama-family layout that the capture hooks, the layer replay and the "
                 "implementation variants use" if layout else
                 "its weights have the Llama-family tensor names, but its forward (norms, attention, MLP) was never verified here")
        raise ModelError(f"{where}: architecture {architectures} is not a supported model family: {lacks}. Supported families: "
                         f"{SUPPORTED}; use a checkpoint of one of them (a model of the same computation converted to that "
                         "architecture works)")
    return family


def check_family_tensors(family: Family, num_layers: int, tensors: set[str], tied_embeddings: bool, where: str) -> None:
    """Every tensor the family's layout needs is in the weights (names only), so that a checkpoint that says Qwen2 but
    has no q/k/v biases is refused here instead of loading with silently initialized biases."""
    needed = list(MODEL_TENSORS) + ([] if tied_embeddings else ["lm_head.weight"])
    needed += [f"model.layers.{i}.{name}" for i in range(num_layers) for name in LAYER_TENSORS + family.layer_tensors]
    missing = _missing(tuple(needed), tensors)
    if missing:
        raise ModelError(f"{where}: config.json says {family.architecture}, but the weights lack {_listed(missing)} "
                         f"({family.name} checkpoints have {family.feature}); use the weights that came with this config.json")
