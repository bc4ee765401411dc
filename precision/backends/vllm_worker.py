"""Runs inside vLLM's worker (mixed into the worker class via ``worker_extension_cls``).

The driver reaches these methods by name through ``LLM.collective_rpc``, so nothing is pickled and no tensor
crosses process boundaries: tensors are saved here, and only a small dict travels back. This works with the
engine in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), in vLLM's default multiprocess mode and with tensor
parallelism, where every rank computes the same hidden states after the all-reduce and rank 0 writes the file.

Hook points (vLLM's LlamaForCausalLM; see docs/vllm-facts in the README):
- ``model.model`` itself is compiled/wrapped, so its children are hooked: embed_tokens, layers[i], norm;
- a decoder layer returns (hidden_states, residual) with the residual add deferred into the next layer's
  fused add+RMSNorm: the residual stream after the layer is their sum, computed here as a NEW tensor because
  fused kernels overwrite those buffers in place afterwards;
- norm(hidden, residual) returns a tuple whose element 0 is the final-norm output;
- lm_head is never called as a module; logits are ``model.compute_logits(final_norm_rows)``.
"""

from __future__ import annotations

from typing import Any

_EMBED, _FINAL_NORM, _LOGITS, _POSITIONS = "embed", "final_norm", "logits", "positions"


class CaptureWorkerExtension:
    """Mixed into vLLM's Worker: ``self`` is the worker. All state lives under ``_precision_*`` names."""

    def _precision_model(self):
        runner = self.model_runner
        return runner.get_model() if hasattr(runner, "get_model") else runner.model

    def precision_install_hooks(self) -> dict[str, Any]:
        model = self._precision_model()
        decoder = model.model
        self._precision_armed = False
        self._precision_store: dict[str, Any] = {}
        self._precision_calls: dict[str, int] = {}
        self._precision_keep = None
        self._precision_layers = None
        self._precision_rows: dict[str, int] = {}
        handles = [decoder.embed_tokens.register_forward_hook(self._precision_hook(_EMBED, "plain"))]
        for index, layer in enumerate(decoder.layers):
            handles.append(layer.register_forward_hook(self._precision_hook(f"layer.{index}", "residual-pair")))
        handles.append(decoder.norm.register_forward_hook(self._precision_hook(_FINAL_NORM, "first")))
        self._precision_handles = handles
        return {"num_layers": len(decoder.layers), "model_class": type(model).__name__}

    def _precision_hook(self, name: str, kind: str):
        def hook(_module, _inputs, output):
            if not self._precision_armed or (self._precision_layers is not None and name.startswith("layer.") and name not in self._precision_layers):
                return
            self._precision_calls[name] = self._precision_calls.get(name, 0) + 1
            if name in self._precision_store:
                return  # a second step while armed: reported through the call count, never merged
            if kind == "residual-pair":
                tensor = output[0] + output[1]
            elif kind == "first":
                tensor = output[0] if isinstance(output, (tuple, list)) else output
            else:
                tensor = output
            self._precision_rows[name] = int(tensor.shape[0])
            keep = self._precision_keep
            self._precision_store[name] = tensor.index_select(0, keep.to(tensor.device)) if keep is not None else tensor.clone()

        return hook

    def precision_arm(self, positions: list[int], layers: list[int] | None, path: str) -> bool:
        import torch

        self._precision_store, self._precision_calls, self._precision_rows = {}, {}, {}
        self._precision_keep = torch.tensor(positions, dtype=torch.long)
        self._precision_layers = None if layers is None else {f"layer.{i}" for i in layers}
        self._precision_path = path
        self._precision_armed = True
        return True

    def precision_collect(self) -> dict[str, Any]:
        import torch
        from safetensors.torch import save_file

        self._precision_armed = False
        store = self._precision_store
        result: dict[str, Any] = {"calls": dict(self._precision_calls), "rows": dict(self._precision_rows), "rank": getattr(self, "rank", 0), "path": None}
        if _FINAL_NORM not in store:
            return result
        model = self._precision_model()
        with torch.inference_mode():
            # Every rank calls compute_logits: under tensor parallelism it gathers the vocabulary shards.
            logits = model.compute_logits(store[_FINAL_NORM])
        if result["rank"] == 0 and logits is not None:
            tensors = {name: t.detach().to("cpu").contiguous() for name, t in store.items()}
            tensors[_LOGITS] = logits.detach().to("cpu").contiguous()
            tensors[_POSITIONS] = self._precision_keep.to(torch.int64).contiguous()
            save_file(tensors, self._precision_path)
            result["path"] = self._precision_path
        self._precision_store = {}
        return result

    def precision_remove_hooks(self) -> bool:
        for handle in getattr(self, "_precision_handles", []):
            handle.remove()
        self._precision_handles = []
        self._precision_armed = False
        return True
