"""Which module calls of an msprobe L0 dump are which capture sites, and their tensors as a capture holds them.

A Llama-family model's modules, as msprobe names them (``Module.<path>.<class>.forward.<call>``), with the prefix
P that the decoder layers' paths share (``model.`` in transformers and vLLM):
    embed        P + embed_tokens, output 0
    layer.<i>    P + layers.<i>, the residual stream after the layer (see RESIDUAL_CONVENTIONS)
    final_norm   P + norm, output 0
    logits       lm_head (any prefix), output 0, when it covers every position of the pass
One forward pass is the calls with the same call index; the capture's tensors are [tokens, width]: a leading batch
dimension of 1 is dropped, a batch of several sequences is refused (its padding is not in the dump).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from precision.interop.msprobe_dump import DumpError, ModuleCall, RankDump
from precision.names import EMBED, FINAL_NORM, LOGITS, layer_site

_LAYER_PATH = re.compile(r"^(?P<prefix>(?:.*\.)?)layers\.(?P<index>\d+)$")

RESIDUAL_OUTPUT = "output"
RESIDUAL_SUM = "hidden+residual"
RESIDUAL_CONVENTIONS = {
    RESIDUAL_OUTPUT: "the decoder layer's output 0 is the residual stream after the layer (transformers' decoder layers "
                     "add the residual inside the layer)",
    RESIDUAL_SUM: "the decoder layer returns (hidden, residual) with the residual add deferred to the next layer's fused "
                  "add-norm (vLLM, vLLM-Ascend); the residual stream after the layer is output 0 + output 1, added here in "
                  "the tensors' dtype (one rounding, as the fused add-norm rounds its residual output)",
}


@dataclass
class ForwardPass:
    """One forward pass of the model in the dump: the module calls of one call index in one dump.json."""

    dump: RankDump
    call: int
    embed: ModuleCall | None = None
    layers: dict[int, ModuleCall] = field(default_factory=dict)
    final_norm: ModuleCall | None = None
    logits: ModuleCall | None = None

    @property
    def label(self) -> str:
        step = f"step{self.dump.step}" if self.dump.step is not None else "dump"
        return f"{step}.call{self.call}" if self.call else step


def forward_passes(dump: RankDump) -> list[ForwardPass]:
    """The forward passes of one dump.json, in call order; refuses a dump whose decoder layers cannot be told apart."""
    layer_calls = [(c, _LAYER_PATH.match(c.path)) for c in dump.calls]
    layer_calls = [(c, m) for c, m in layer_calls if m]
    prefixes = sorted({m.group("prefix") for _, m in layer_calls})
    if not prefixes:
        paths = sorted({c.path for c in dump.calls})[:6]
        raise DumpError(f"{dump.path} holds no decoder layer calls (module paths ending in layers.<i>; it has {paths}); "
                        "dump the whole model at level L0 (no \"scope\" or \"list\" filter)")
    if len(prefixes) > 1:
        raise DumpError(f"{dump.path} holds decoder layers under {len(prefixes)} paths ({', '.join(p + 'layers' for p in prefixes)}); "
                        "only one decoder stack (a Llama-family language model) can be imported")
    prefix = prefixes[0]
    passes: dict[int, ForwardPass] = {}

    def at(call: int) -> ForwardPass:
        return passes.setdefault(call, ForwardPass(dump, call))

    for c, m in layer_calls:
        at(c.call).layers[int(m.group("index"))] = c
    for c in dump.calls:
        if c.path == prefix + "embed_tokens":
            at(c.call).embed = c
        elif c.path == prefix + "norm":
            at(c.call).final_norm = c
        elif c.path == "lm_head" or c.path.endswith(".lm_head"):
            at(c.call).logits = c
    return [passes[k] for k in sorted(passes)]


def check_files(fp: ForwardPass) -> None:
    """Every tensor file the pass's sites need is there (checked before anything is written)."""
    calls = [fp.embed, *fp.layers.values(), fp.final_norm, fp.logits]
    for call in [c for c in calls if c is not None]:
        for record in call.output_tensors()[:2]:
            fp.dump.tensor_file(record)


def as_rows(tensor, where: str):
    """A [1, tokens, width] or [tokens, width] tensor as [tokens, width]."""
    if tensor.dim() == 3 and tensor.shape[0] == 1:
        return tensor[0]
    if tensor.dim() == 2:
        return tensor
    if tensor.dim() == 3:
        raise DumpError(f"{where} holds a batch of {tensor.shape[0]} sequences in one forward pass; their padding is not in the dump, "
                        "so positions cannot be aligned: dump one sequence per forward pass")
    raise DumpError(f"{where} has shape {list(tensor.shape)}; a hidden state of [batch, tokens, width] or [tokens, width] was expected")


@dataclass
class PassTokens:
    """What a pass ran on, read before its hidden states: the embedding's input ids and the layers' positions."""

    tokens: int
    """Positions in the pass (rows of its hidden states, from dump.json's shapes)."""
    token_ids: tuple[int, ...] | None
    positions: tuple[int, ...] | None
    """The decoder layers' position_ids (transformers) or integer first input (vLLM's positions), when dumped."""


def pass_tokens(fp: ForwardPass) -> PassTokens:
    first = fp.layers[min(fp.layers)]
    outputs = first.output_tensors()
    if not outputs:
        raise DumpError(f"{fp.dump.path} ({fp.label}): {first.key} has no dumped output tensor; dump again with \"data_mode\": [\"all\"]")
    shape = outputs[0].get("shape") or []
    tokens = shape[-2] if len(shape) >= 2 else 0
    token_ids = positions = None
    if fp.embed is not None:
        inputs = fp.embed.input_tensors()
        if inputs and "int" in str(inputs[0].get("dtype", "")):
            token_ids = tuple(int(t) for t in fp.dump.load(inputs[0]).reshape(-1).tolist())
    record = first.kwarg_tensor("position_ids")  # transformers passes them by name; vLLM's layers take positions first
    if record is None:
        record = next((t for t in first.input_tensors()[:1] if "int" in str(t.get("dtype", ""))), None)
    if record is not None:
        positions = tuple(int(p) for p in fp.dump.load(record).reshape(-1).tolist())
    return PassTokens(tokens, token_ids, positions)


@dataclass
class PassTensors:
    """The capture sites of one forward pass, each [tokens, width], and what was done to get them."""

    tensors: dict
    residual: str | None
    notes: list[str]


def pass_tensors(fp: ForwardPass) -> PassTensors:
    """Read one pass's site tensors from the dump (see the module docstring)."""
    tensors, notes, conventions = {}, [], set()
    where = f"{fp.dump.path} ({fp.label})"
    if fp.embed is not None:
        outputs = fp.embed.output_tensors()
        if outputs:
            tensors[EMBED] = as_rows(fp.dump.load(outputs[0]), f"{where} {fp.embed.key}")
    for index, call in sorted(fp.layers.items()):
        outputs = call.output_tensors()
        if not outputs:
            continue
        first = fp.dump.load(outputs[0])
        second = fp.dump.load(outputs[1]) if len(outputs) > 1 and outputs[1].get("shape") == outputs[0].get("shape") else None
        conventions.add(RESIDUAL_OUTPUT if second is None else RESIDUAL_SUM)
        stream = first if second is None else first + second
        tensors[layer_site(index)] = as_rows(stream, f"{where} {call.key}")
    if len(conventions) > 1:
        raise DumpError(f"{where}: some decoder layers return one tensor and others (hidden, residual); the residual stream "
                        "cannot be read consistently from this dump")
    if fp.final_norm is not None:
        outputs = fp.final_norm.output_tensors()
        if outputs:
            tensors[FINAL_NORM] = as_rows(fp.dump.load(outputs[0]), f"{where} {fp.final_norm.key}")
            if len(outputs) > 1:
                notes.append("final_norm: the norm returned (normed, residual) (a fused add-norm); output 0, the normed "
                             "hidden state, is the site")
    if fp.logits is not None:
        outputs = fp.logits.output_tensors()
        if outputs:
            logits = as_rows(fp.dump.load(outputs[0]), f"{where} {fp.logits.key}")
            tokens = next((t.shape[0] for name, t in tensors.items() if name != LOGITS), logits.shape[0])
            if logits.shape[0] == tokens:
                tensors[LOGITS] = logits
            else:
                notes.append(f"logits: {fp.logits.key} covers {logits.shape[0]} of {tokens} positions (an engine computes "
                             "logits only where it samples); not imported")
    return PassTensors(tensors, conventions.pop() if conventions else None, notes)
