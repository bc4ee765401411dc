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

Device memory: each hook copies its selected rows to host memory at once (precision.backends.host_copy) and the
worker waits for those copies once, when the forward is collected; logits are computed in bounded chunks.

Residual-stream check: on the first capture after the hooks are installed, the stream summed after layer i is
compared, bit for bit, with the stream the next fused add+RMSNorm computed from the same two tensors (layer
i+1's input_layernorm, or the final norm): a layer whose output is not (hidden_states, residual) as assumed, or
a norm that does not receive it, makes the capture refuse, naming both modules.
"""

from __future__ import annotations

from typing import Any

from precision.backends import host_copy, vllm_compat
from precision.backends.vllm_platform import engine_identity
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
        self._precision_keep_on: dict[Any, Any] = {}
        self._precision_layers = None
        self._precision_rows: dict[str, int] = {}
        self._precision_errors: list[str] = []
        self._precision_copies = host_copy.HostCopies()
        self._precision_device = None
        handles = [embed_tokens.register_forward_hook(self._precision_hook(EMBED, lambda _module, output: output))]
        for index, layer in enumerate(layers):
            handles.append(layer.register_forward_hook(self._precision_hook(layer_site(index), _layer_stream)))
        handles.append(norm.register_forward_hook(self._precision_hook(FINAL_NORM, lambda _module, output: vllm_compat.final_norm_output(output))))
        self._precision_handles = handles
        self._precision_install_residual_check(model, layers)
        return {"num_layers": len(layers), "model_class": type(model).__name__}

    # -- hooks ----------------------------------------------------------------------------------------------------
    def _precision_hook(self, name: str, site_tensor):
        """A forward hook that keeps the host copy of ``site_tensor(module, output)``'s selected rows."""

        def hook(module, _inputs, output):
            if not self._precision_armed or (self._precision_layers is not None and name.startswith(LAYER_PREFIX) and name not in self._precision_layers):
                return
            self._precision_calls[name] = self._precision_calls.get(name, 0) + 1
            if name in self._precision_store:
                return  # a second step while armed: reported through the call count, never merged
            try:
                tensor = site_tensor(module, output)
            except BackendError as exc:
                # Raised inside vLLM's forward it would surface as an engine failure; the driver reports it.
                self._precision_errors.append(str(exc))
                return
            self._precision_rows[name] = int(tensor.shape[0])
            if name == FINAL_NORM:
                self._precision_device = tensor.device  # where the logits head runs
            self._precision_store[name] = self._precision_copies.keep(self._precision_selected_rows(tensor))

        return hook

    def _precision_selected_rows(self, tensor: Any) -> Any:
        """The kept positions' rows as a NEW tensor on ``tensor``'s device (index_select always copies)."""
        keep = self._precision_keep_on.get(tensor.device)
        if keep is None:
            keep = self._precision_keep_on[tensor.device] = self._precision_keep.to(tensor.device)
        return tensor.index_select(0, keep)

    def _precision_install_residual_check(self, model: Any, layers: Any) -> None:
        """Hooks on the modules that consume each layer's residual stream, for the first capture only."""
        self._precision_check_pending = True
        self._precision_checking = False
        self._precision_seen: dict[str, tuple[str, Any]] = {}
        consumers = vllm_compat.residual_consumers(model)
        names = {id(module): name for name, module in model.named_modules()}  # the model's own: model.layers.3
        self._precision_layer_names = [names.get(id(layer), type(layer).__name__) for layer in layers]
        self._precision_check_handles = [
            consumer.register_forward_hook(self._precision_consumer_hook(layer_site(index), names.get(id(consumer), type(consumer).__name__)))
            for index, consumer in enumerate(consumers)]

    def _precision_consumer_hook(self, site: str, consumer_name: str):
        """Keeps the stream the consumer of ``site`` computed (its returned residual, copied: fused kernels
        overwrite it in place later in the forward)."""

        def hook(module, _inputs, output):
            if not self._precision_checking or site in self._precision_seen:
                return
            if self._precision_layers is not None and site not in self._precision_layers:
                return
            try:
                stream = vllm_compat.norm_received_stream(output, module)
            except BackendError as exc:
                self._precision_errors.append(str(exc))
                return
            self._precision_seen[site] = (consumer_name, self._precision_copies.keep(self._precision_selected_rows(stream)))

        return hook

    # -- driving --------------------------------------------------------------------------------------------------
    def precision_arm(self, positions: list[int], layers: list[int] | None, path: str) -> bool:
        import torch

        self._precision_store, self._precision_calls, self._precision_rows, self._precision_errors = {}, {}, {}, []
        self._precision_keep = torch.tensor(positions, dtype=torch.long)
        self._precision_keep_on = {}
        self._precision_layers = None if layers is None else {layer_site(i) for i in layers}
        self._precision_path = path
        self._precision_checking, self._precision_seen = self._precision_check_pending, {}
        self._precision_armed = True
        return True

    def precision_collect(self) -> dict[str, Any]:
        """Ends the armed forward: waits for the host copies, runs the residual check when due, computes the
        logits (every rank, same number of calls) and, on rank 0 without errors, writes the tensors."""
        import torch

        from precision.safetensors_io import write_tensors

        self._precision_armed = False
        self._precision_copies.synchronize()  # the one wait for this forward's copies
        store = self._precision_store
        result: dict[str, Any] = {"calls": dict(self._precision_calls), "rows": dict(self._precision_rows),
                                  "rank": vllm_compat.worker_rank(self), "path": None, "residual_checked": []}
        if self._precision_checking:
            result["residual_checked"] = self._precision_check_residuals()
        result["errors"] = list(self._precision_errors)
        if FINAL_NORM not in store:
            self._precision_store = {}
            return result
        model = vllm_compat.worker_model(self)
        with torch.inference_mode():
            # Every rank that captured final-norm rows makes the same calls, errors or not (a collective).
            logits, result["logits_calls"] = host_copy.chunked_logits(
                lambda rows: vllm_compat.compute_logits(model, rows), store[FINAL_NORM], self._precision_device,
                vllm_compat.vocabulary_size(model))
        if result["rank"] == 0 and logits is not None and not result["errors"]:
            tensors = {name: t.detach().contiguous() for name, t in store.items()}
            tensors[LOGITS] = logits.contiguous()
            tensors[POSITIONS] = self._precision_keep.to(torch.int64).contiguous()
            write_tensors(self._precision_path, tensors)
            result["path"] = self._precision_path
        self._precision_store = {}
        return result

    def _precision_check_residuals(self) -> list[str]:
        """Compares each captured ``layer.i`` with what its consumer computed; the sites checked. Done once: the
        consumer hooks come off after the first capture that reached the final norm."""
        import torch

        seen, self._precision_seen = self._precision_seen, {}
        self._precision_checking = False
        if FINAL_NORM not in self._precision_store:
            return []  # the forward did not run through: the next capture checks
        self._precision_check_pending = False
        for handle in self._precision_check_handles:
            handle.remove()
        self._precision_check_handles = []
        checked = []
        for site, captured in self._precision_store.items():
            if not site.startswith(LAYER_PREFIX):
                continue
            layer_name = self._precision_layer_names[int(site[len(LAYER_PREFIX):])]
            if site not in seen:
                self._precision_errors.append(f"residual-stream check: nothing received the stream of {layer_name} ({site}): "
                                              "its consumer (the next layer's input_layernorm or the final norm) was not called with a residual")
                continue
            consumer_name, received = seen[site]
            if not torch.equal(captured, received):
                self._precision_errors.append(_mismatch(site, layer_name, consumer_name, captured, received))
            checked.append(site)
        return checked

    def precision_remove_hooks(self) -> dict:
        for handle in [*getattr(self, "_precision_handles", []), *getattr(self, "_precision_check_handles", [])]:
            handle.remove()
        self._precision_handles, self._precision_check_handles = [], []
        self._precision_armed = False
        return {"engine_identity": engine_identity()}  # its shared memory is removed after shutdown


def _layer_stream(module: Any, output: Any) -> Any:
    return vllm_compat.layer_residual_stream(output, module)


def _mismatch(site: str, layer_name: str, consumer_name: str, captured: Any, received: Any) -> str:
    if captured.shape != received.shape:
        detail = f"shapes {list(captured.shape)} and {list(received.shape)}"
    else:
        differ = captured != received
        largest = (captured.double() - received.double()).abs().max().item()
        detail = f"{int(differ.sum())} of {differ.numel()} elements differ, the largest by {largest:.6g}"
    return (f"residual-stream check failed: {site}, captured as {layer_name}'s out[0] + out[1], is not the residual "
            f"stream {consumer_name} received ({detail}); the capture would not be the model's residual stream, so it "
            "is refused (docs/engine-compat.md: decoder layers returning (hidden_states, residual))")
