"""Runs inside vLLM's worker (mixed into the worker class via ``worker_extension_cls``).

The driver reaches these methods by name through ``LLM.collective_rpc``, so nothing is pickled and no tensor
crosses process boundaries: tensors are saved here, and only a small dict travels back. This works with the
engine in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), in vLLM's default multiprocess mode and with tensor
parallelism, where every rank computes the same hidden states after the all-reduce and rank 0 writes the file.

Hook points (vLLM's LlamaForCausalLM, and Qwen2/Qwen3/MistralForCausalLM, which share the layout; see
precision.model_families and docs/vllm-facts in the README):
- ``model.model`` itself is compiled/wrapped, so its children are hooked: embed_tokens, layers[i], norm;
- a decoder layer returns (hidden_states, residual) with the residual add deferred into the next layer's
  fused add+RMSNorm: the residual stream after the layer is their sum, computed here as a NEW tensor because
  fused kernels overwrite those buffers in place afterwards;
- norm(hidden, residual) returns a tuple whose element 0 is the final-norm output;
- lm_head is never called as a module; logits are ``model.compute_logits(final_norm_rows)``.
"""

from __future__ import annotations

from typing import Any

from precision.backends import vllm_compat
from precision.errors import BackendError
from precision.names import EMBED, FINAL_NORM, LAYER_PREFIX, LOGITS, POSITIONS, layer_site


class CaptureWorkerExtension:
    """Mixed into vLLM's Worker: ``self`` is the worker. All state lives under ``_precision_*`` names."""

    def precision_install_hooks(self) -> dict[str, Any]:
        model = vllm_compat.worker_model(self)
        embed_tokens, layers, norm = vllm_compat.decoder_modules(model)
        self._precision_armed = False
        self._precision_store: dict[str, Any] = {}
        self._precision_calls: dict[str, int] = {}
        self._precision_keep = None
        self._precision_layers = None
        self._precision_rows: dict[str, int] = {}
        self._precision_errors: list[str] = []
        handles = [embed_tokens.register_forward_hook(self._precision_hook(EMBED, lambda output: output))]
        for index, layer in enumerate(layers):
            handles.append(layer.register_forward_hook(self._precision_hook(layer_site(index), vllm_compat.layer_residual_stream)))
        handles.append(norm.register_forward_hook(self._precision_hook(FINAL_NORM, vllm_compat.final_norm_output)))
        self._precision_handles = handles
        return {"num_layers": len(layers), "model_class": type(model).__name__}

    def _precision_hook(self, name: str, site_tensor):
        """A forward hook that keeps ``site_tensor(output)``, the site's tensor in the module's output."""

        def hook(_module, _inputs, output):
            if not self._precision_armed or (self._precision_layers is not None and name.startswith(LAYER_PREFIX) and name not in self._precision_layers):
                return
            self._precision_calls[name] = self._precision_calls.get(name, 0) + 1
            if name in self._precision_store:
                return  # a second step while armed: reported through the call count, never merged
            try:
                tensor = site_tensor(output)
            except BackendError as exc:
                # Raised inside vLLM's forward it would surface as an engine failure; the driver reports it.
                self._precision_errors.append(str(exc))
                return
            self._precision_rows[name] = int(tensor.shape[0])
            keep = self._precision_keep
            self._precision_store[name] = tensor.index_select(0, keep.to(tensor.device)) if keep is not None else tensor.clone()

        return hook

    def precision_arm(self, positions: list[int], layers: list[int] | None, path: str) -> bool:
        import torch

        self._precision_store, self._precision_calls, self._precision_rows, self._precision_errors = {}, {}, {}, []
        self._precision_keep = torch.tensor(positions, dtype=torch.long)
        self._precision_layers = None if layers is None else {layer_site(i) for i in layers}
        self._precision_path = path
        self._precision_armed = True
        return True

    def precision_collect(self) -> dict[str, Any]:
        import torch
        from precision.safetensors_io import write_tensors

        self._precision_armed = False
        store = self._precision_store
        result: dict[str, Any] = {"calls": dict(self._precision_calls), "rows": dict(self._precision_rows),
                                  "rank": vllm_compat.worker_rank(self), "path": None, "errors": list(self._precision_errors)}
        if FINAL_NORM not in store or result["errors"]:
            return result
        model = vllm_compat.worker_model(self)
        with torch.inference_mode():
            # Every rank calls compute_logits: under tensor parallelism it gathers the vocabulary shards.
            logits = vllm_compat.compute_logits(model, store[FINAL_NORM])
        if result["rank"] == 0 and logits is not None:
            tensors = {name: t.detach().to("cpu").contiguous() for name, t in store.items()}
            tensors[LOGITS] = logits.detach().to("cpu").contiguous()
            tensors[POSITIONS] = self._precision_keep.to(torch.int64).contiguous()
            write_tensors(self._precision_path, tensors)
            result["path"] = self._precision_path
        self._precision_store = {}
        return result

    def precision_remove_hooks(self) -> bool:
        for handle in getattr(self, "_precision_handles", []):
            handle.remove()
        self._precision_handles = []
        self._precision_armed = False
        return True


# -- not part of commit 0b9e9a7 (everything above this line is its precision/backends/vllm_worker.py verbatim) --
def _driver_extension() -> type:
    """Today's worker extension, whatever the driver names: it may serve RPCs the old one lacks (a preflight)."""
    import importlib

    from precision.backends import vllm as vllm_backend

    module_name, class_name = vllm_backend.WORKER_EXTENSION.rsplit(".", 1)
    return getattr(importlib.import_module(module_name), class_name)


class BeforeWithDriverRpcs(CaptureWorkerExtension, _driver_extension()):
    """The capture methods of commit 0b9e9a7 (first in the method order), any other RPC from today's extension."""
