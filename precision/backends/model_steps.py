"""The transformers model as steps: the embedding, each decoder layer, the final norm and the lm_head, each handed
out as a module in a requested dtype, with implementation variants applied to a copy when asked:

    resident   the checkpoint loaded once (as the transformers backend loads it); an FP32 or varied step is a copy of
               that one step, so the BF16 model and one FP32 layer are the most ever held
    streamed   only the config is loaded; each step's weights are read from the checkpoint's safetensors when the
               step runs and dropped after it, so a model larger than the host's memory runs: memory is one step's
               weights plus the prompts' hidden states and what is being captured

precision.backends.layerwise runs prompts through them; precision.analysis.replay replays captured inputs on them.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any, Iterator, Sequence

from precision.backends import transformers_compat
from precision.errors import ModelError
from precision.names import EMBED, FINAL_NORM, LOGITS, layer_site


class CheckpointTensors:
    """Tensors of a checkpoint directory by name, read on demand from its safetensors files."""

    def __init__(self, path: str) -> None:
        from precision.model import weight_file

        self._files = {}
        for weights in sorted(Path(path).glob("*.safetensors")):
            handle = weight_file(weights)
            for name in handle.keys():
                self._files[name] = handle
        if not self._files:
            raise ModelError(f"{path} has no .safetensors weights; the streamed mode reads safetensors only")

    def rows(self, name: str, token_ids: Sequence[int]):
        """Rows ``token_ids`` of tensor ``name`` (an embedding lookup without reading the whole table)."""
        import numpy as np
        import torch

        handle = self._files[name]
        rows = np.stack([handle.rows(name, int(t), int(t) + 1)[0] for t in token_ids])
        return torch.from_numpy(rows)

    def get(self, name: str, fallback: str | None = None):
        handle = self._files.get(name) or (self._files.get(fallback) if fallback else None)
        if handle is None:
            raise ModelError(f"the checkpoint has no tensor {name!r}; the streamed mode needs the checkpoint's names to be "
                             "the transformers model's own (run without --layer-streamed for checkpoints transformers converts on load)")
        return handle.get_tensor(name if name in self._files else fallback)


class ModelSteps:
    """The steps of a causal LM, each as a module in a chosen dtype (see the module docstring)."""

    def __init__(self, path: str, dtype_name: str = "bfloat16", *, streamed: bool = False, trust_remote_code: bool = False) -> None:
        import torch

        self.path = path
        self.dtype = getattr(torch, dtype_name)
        self.streamed = streamed
        self.model = transformers_compat.model_skeleton(path, self.dtype, trust_remote_code=trust_remote_code)
        self._tensors = CheckpointTensors(path)
        self.decoder = transformers_compat.llama_decoder(self.model, path)
        self.rotary = transformers_compat.rotary_embedding(self.decoder)
        self.num_layers = len(self.decoder.layers)
        self._names = {id(module): name for name, module in self.model.named_modules()}
        self._tied = bool(getattr(self.model.config, "tie_word_embeddings", False))
        self._embedding_name = self._names[id(self.decoder.embed_tokens)] + ".weight"
        if not streamed:
            self._load_every_step()

    def _load_every_step(self) -> None:
        """Give every step its weights, one tensor read at a time: memory is the model in its dtype (loading through
        transformers holds the checkpoint's mapped pages beside the converted model: 23 GB, not 16, for a 3.9B
        model's FP32 truth), with the values transformers would load (a checkpoint's dtype converts exactly or
        rounds to nearest even, either way)."""
        self.decoder.embed_tokens = self._materialize(self.decoder.embed_tokens)
        for index, layer in enumerate(self.decoder.layers):
            self.decoder.layers[index] = self._materialize(layer)
        self.decoder.norm = self._materialize(self.decoder.norm)
        self.model.lm_head = self._materialize(self.model.lm_head)
        self._tensors = None

    def sites(self) -> list[str]:
        """The output site of every step, in model order."""
        return [EMBED] + [layer_site(i) for i in range(self.num_layers)] + [FINAL_NORM, LOGITS]

    def _module(self, site: str):
        if site == EMBED:
            return self.decoder.embed_tokens
        if site == FINAL_NORM:
            return self.decoder.norm
        if site == LOGITS:
            return self.model.lm_head
        from precision.capture.sites import layer_index

        return self.decoder.layers[layer_index(site)]

    def _materialize(self, module):
        """A copy of the weightless ``module`` with its weights read from the checkpoint (each tensor converted to
        the model's dtype and taken as the parameter itself: no second copy)."""
        prefix = self._names[id(module)] + "."
        fresh = copy.deepcopy(module)
        wanted = fresh.state_dict()
        state = {local: self._tensors.get(prefix + local, self._embedding_name if self._tied else None).to(meta.dtype)
                 for local, meta in wanted.items()}
        fresh.load_state_dict(state, strict=True, assign=True)
        if any(t.is_meta for t in (*fresh.parameters(), *fresh.buffers())):
            raise ModelError(f"{prefix[:-1]} holds tensors the checkpoint does not (computed buffers); the layer-by-layer mode "
                             "cannot build it: run without --layer-streamed")
        return fresh

    @contextlib.contextmanager
    def step(self, site: str, dtype=None, variants: Sequence[str] = ()) -> Iterator[Any]:
        """The module computing ``site`` in ``dtype`` (default: the model's), with ``variants`` applied to a copy.
        The model's own module is never changed; a copy lives only inside the ``with`` block."""
        module = self._module(site)
        owned = self._tensors is not None
        if owned:
            module = self._materialize(module)
        dtype = dtype or self.dtype
        if dtype != self.dtype:
            module = (module if owned else copy.deepcopy(module)).to(dtype)
        elif variants and not owned:
            # A copy of the module objects sharing the weights: variants replace forwards or give a module new
            # weight tensors (permute-k), never write into the ones they were given.
            module = copy.deepcopy(module, memo={id(t): t for t in (*module.parameters(), *module.buffers())})
        if variants:
            from precision.backends.variants import apply_variants

            apply_variants(module, tuple(variants), salt=self.sites().index(site), transient=True)
        try:
            yield module
        finally:
            if module is not self._module(site):
                _release(module)
            del module

    def embed(self, token_ids: Sequence[int], dtype=None):
        """The embedding of ``token_ids`` as [1, tokens, width] in ``dtype``: a lookup, so exact in any dtype (no
        implementation variant changes it); streamed, only the rows asked for are read."""
        import torch

        if self._tensors is not None:
            rows = self._tensors.rows(self._embedding_name, token_ids).to(self.dtype)
        else:
            rows = self.decoder.embed_tokens(torch.tensor(list(token_ids)))
        return rows.unsqueeze(0).to(dtype or self.dtype)

    def run_layer(self, layer, hidden, *, cache=None, start: int = 0, mask=None):
        return transformers_compat.run_layer(layer, self.rotary, hidden, cache=cache, start=start, mask=mask)


def _release(module) -> None:
    """Break the reference cycles a variant makes (a forward bound to its own module), so that a step's copy, its
    weights and any FP32 copy of them are freed when the step ends, not whenever the garbage collector next runs
    (a layer-streamed run would otherwise hold every step it has run)."""
    for part in module.modules():
        part.__dict__.pop("forward", None)
        part.__dict__.pop("_split_k_weight", None)
