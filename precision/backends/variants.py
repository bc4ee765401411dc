"""Implementation variants and planted faults for the transformers backend.

Variants are legitimate ways a correct BF16 engine may compute the same model; the analysis re-runs the reference
with each to measure the spread that implementation choices alone produce (the envelope):
    permute-k:SEED   every linear layer sums its inner dimension in another order (a consistent permutation)
    split-k:CHUNK    every linear layer accumulates CHUNK-long partial products in FP32, then adds the partials
    attn:eager       attention as one explicit softmax(QK^T)V instead of the fused SDPA kernel
    norm:fused       RMSNorm computed entirely in FP32 and rounded once (as fused add+RMSNorm kernels do),
                     instead of rounding the normalized value to BF16 before multiplying by the weight
    mlp:fused        SiLU(gate) * up computed in FP32 and rounded once (as fused SwiGLU kernels do)
Faults are not legitimate; they prove the analysis catches real bugs:
    fault:bf16-accum:LAYER          the matrix products of decoder layer LAYER accumulate in BF16, not FP32
    fault:scale-weight:LAYER:FACTOR the MLP down-projection weight of layer LAYER multiplied by FACTOR
    fault:nan:LAYER:POSITION[:COLUMN]  NaN written into layer LAYER's output at token POSITION, hidden unit COLUMN
                                    (default 0); on the reference side too, a NaN there and another one in the
                                    target at another COLUMN prove non-finite values are judged per element
    fault:logit-bias:TOKEN:BIAS     BIAS added to token TOKEN's logit (its lm_head output) at every position; a
                                    bias on a token that is often the runner-up flips near-ties toward it
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from precision.backends.transformers_compat import (layer_hidden_states, replace_forward, rms_norm_epsilon, set_attn_implementation,
                                                    set_layer_attn_implementation)
from precision.errors import BackendError

LEGITIMATE_KINDS = ("permute-k", "split-k", "attn", "norm", "mlp")
FAULT_KINDS = ("bf16-accum", "scale-weight", "nan", "logit-bias")
_USAGE = ("permute-k:SEED, split-k:CHUNK, attn:eager, norm:fused, mlp:fused, fault:bf16-accum:LAYER, fault:scale-weight:LAYER:FACTOR, "
          "fault:nan:LAYER:POSITION[:COLUMN], fault:logit-bias:TOKEN:BIAS")
_ARITY = {"permute-k": (1,), "split-k": (1,), "attn": (1,), "norm": (1,), "mlp": (1,), "bf16-accum": (1,), "scale-weight": (2,),
          "nan": (2, 3), "logit-bias": (2,)}
_NUMBERS = {"permute-k": (int,), "split-k": (int,), "bf16-accum": (int,), "scale-weight": (int, float), "nan": (int, int, int),
            "logit-bias": (int, float)}
"""The type of each numeric argument, checked when the variant is parsed (before any model loads)."""


@dataclass(frozen=True)
class Variant:
    kind: str
    args: tuple[str, ...]
    fault: bool

    def __str__(self) -> str:
        return ":".join((("fault",) if self.fault else ()) + (self.kind,) + self.args)


def parse_variant(text: str) -> Variant:
    parts = text.strip().split(":")
    fault = parts[0] == "fault"
    if fault:
        parts = parts[1:]
    kind, args = (parts[0] if parts else ""), tuple(parts[1:])
    allowed = FAULT_KINDS if fault else LEGITIMATE_KINDS
    if kind not in allowed or len(args) not in _ARITY[kind]:
        raise BackendError(f"variant {text!r} is not one of: {_USAGE}")
    for value, kind_of_number in zip(args, _NUMBERS.get(kind, ())):
        _check_number(text, value, kind_of_number)
    return Variant(kind, args, fault)


def _check_number(text: str, value: str, kind_of_number: type) -> None:
    try:
        number = kind_of_number(value)
    except ValueError:
        word = "an integer" if kind_of_number is int else "a number"
        raise BackendError(f"variant {text!r}: {value!r} is not {word}; the forms are: {_USAGE}") from None
    if kind_of_number is float and not math.isfinite(number):
        raise BackendError(f"variant {text!r}: {value!r} is not finite; give a finite number")


def apply_variants(model, variants: tuple[str, ...], *, salt: int = 0, transient: bool = False) -> None:
    """Change ``model`` in place: a transformers Llama-family model, or one of its steps (a decoder layer, the final
    norm, the lm_head; precision.backends.layerwise applies variants step by step). Faults need the whole model.
    ``salt`` varies the permutations of permute-k between steps varied one at a time. ``transient``: the module is a
    copy used for a short while (one step over a group of prompts), so split-k may keep an FP32 copy of its weights
    instead of converting them at every call (on a whole model that copy would double its memory)."""
    for text in variants:
        variant = parse_variant(text)
        if variant.fault and not hasattr(model, "model"):
            raise BackendError(f"variant {text!r} is a fault: it applies to a whole model (the hf backend), not to one step")
        try:
            if variant.kind == "permute-k":
                _permute_k(model, variant.args[0], salt)
            elif variant.kind == "split-k":
                _split_k(model, variant.args[0], keep_weights=transient)
            else:
                _APPLY[variant.kind](model, *variant.args)
        except (ValueError, IndexError) as exc:
            raise BackendError(f"variant {text!r}: {exc}") from exc


def _linears(module):
    import torch

    return [m for m in module.modules() if isinstance(m, torch.nn.Linear)]


def _permute_k(model, seed: str, salt: int = 0) -> None:
    import torch

    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + salt)
    for linear in _linears(model):
        perm = torch.randperm(linear.in_features, generator=generator)
        with torch.no_grad():
            linear.weight = torch.nn.Parameter(linear.weight[:, perm].contiguous(), requires_grad=False)
        linear.register_forward_pre_hook(lambda _m, args, perm=perm: (args[0].index_select(-1, perm.to(args[0].device)),) + args[1:])


def _split_k(model, chunk: str, *, keep_weights: bool = False) -> None:
    import torch

    size = int(chunk)
    if size < 1:
        raise ValueError("chunk must be >= 1")

    def fp32_weight(self):
        cached = getattr(self, "_split_k_weight", None)
        if cached is not None:
            return cached
        weight = self.weight.float()
        if keep_weights:
            self._split_k_weight = weight
        return weight

    def forward(self, x):
        # bf16 x bf16 products are exact in FP32, so each chunk's partial is FP32 accumulation of CHUNK products;
        # the partials are added in order.
        w = fp32_weight(self)
        rows = x.float()
        total = None
        for start in range(0, self.in_features, size):
            part = torch.nn.functional.linear(rows[..., start:start + size], w[:, start:start + size])
            total = part if total is None else total.add_(part)
        if self.bias is not None:
            total = total + self.bias.float()
        return total.to(x.dtype)

    for linear in _linears(model):
        replace_forward(linear, forward)


def _attention(model, implementation: str) -> None:
    if implementation != "eager":
        raise ValueError("only attn:eager is a variant (sdpa is the default)")
    if hasattr(model, "model"):
        set_attn_implementation(model, "eager")
        return
    for module in model.modules():
        if hasattr(module, "self_attn"):
            set_layer_attn_implementation(module, "eager")


def _fused_norm(model, how: str) -> None:
    import torch

    if how != "fused":
        raise ValueError("use norm:fused")

    def forward(self, x, epsilon):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + epsilon)
        return (h * self.weight.float()).to(x.dtype)

    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            epsilon = rms_norm_epsilon(module)
            replace_forward(module, lambda self, x, epsilon=epsilon: forward(self, x, epsilon))


def _fused_mlp(model, how: str) -> None:
    if how != "fused":
        raise ValueError("use mlp:fused")

    def forward(self, x):
        gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj((self.act_fn(gate.float()) * up.float()).to(x.dtype))

    for module in model.modules():
        if all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            replace_forward(module, forward)


def _layer(model, index: str):
    layers = model.model.layers
    i = int(index)
    if not 0 <= i < len(layers):
        raise ValueError(f"layer {i} does not exist (0..{len(layers) - 1})")
    return layers[i]


def _bf16_accumulation(model, layer: str) -> None:
    import torch

    def forward(self, x):
        # Sequential accumulation in the activation dtype: every partial sum is rounded to BF16.
        w = self.weight
        total = torch.zeros(*x.shape[:-1], self.out_features, dtype=x.dtype, device=x.device)
        for k in range(self.in_features):
            total = total + x[..., k:k + 1] * w[:, k]
        return total if self.bias is None else total + self.bias

    for linear in _linears(_layer(model, layer)):
        replace_forward(linear, forward)


def _scale_weight(model, layer: str, factor: str) -> None:
    import torch

    down = _layer(model, layer).mlp.down_proj
    with torch.no_grad():
        down.weight.mul_(float(factor))


def _nan(model, layer: str, position: str, column: str = "0") -> None:
    pos, col = int(position), int(column)
    width = model.config.hidden_size
    if pos < 0:
        raise ValueError(f"position {pos} is negative")
    if not 0 <= col < width:
        raise ValueError(f"column {col} does not exist (hidden size {width}: 0..{width - 1})")
    target = _layer(model, layer)

    def hook(_module, _inputs, output):
        hidden = layer_hidden_states(output)  # the same tensor the layer returns, so the NaN is written into it
        # Only a pass that holds the position plants it (generation's later one-token steps do not).
        if hidden.shape[-2] > pos:
            hidden[..., pos, col] = float("nan")
        return output

    target.register_forward_hook(hook)


def _logit_bias(model, token: str, bias: str) -> None:
    index, amount = int(token), float(bias)
    head = model.lm_head
    if not 0 <= index < head.out_features:
        raise ValueError(f"token {index} does not exist (vocabulary {head.out_features}: 0..{head.out_features - 1})")

    def hook(_module, _inputs, logits):
        # Added to the lm_head's output in its dtype, as a wrong bias row or a mis-converted weight row would be;
        # every other logit stays bit for bit what the model computed.
        logits[..., index] += amount
        return logits

    head.register_forward_hook(hook)


_APPLY = {
    "permute-k": _permute_k, "split-k": _split_k, "attn": _attention, "norm": _fused_norm, "mlp": _fused_mlp,
    "bf16-accum": _bf16_accumulation, "scale-weight": _scale_weight, "nan": _nan, "logit-bias": _logit_bias,
}
