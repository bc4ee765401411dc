"""The transformers backend: any torch device (cpu, cuda, npu), dtype bf16 / fp16 / fp32.

The reference is this backend on CPU in BF16; the numerical truth is the same on CPU in FP32.
Hidden states come from forward hooks on the embedding, every decoder layer and the final norm; logits are the
model's lm_head applied to the captured final-norm rows (the same thing LlamaForCausalLM.forward computes,
restricted to the kept positions so that a 166k vocabulary does not materialize for every position).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from precision.backends import transformers_compat
from precision.backends.base import Backend
from precision.backends.torch_device import describe_device, resolve_device
from precision.capture.sites import CaptureSelection
from precision.errors import BackendError, ModelError
from precision.names import EMBED, FINAL_NORM, LOGITS, POSITIONS, layer_site
from precision.safetensors_io import write_tensors

log = logging.getLogger(__name__)


def load_hf_model(path: str, dtype_name: str, device, *, trust_remote_code: bool = False):
    import torch

    try:
        model = transformers_compat.load_causal_lm(path, getattr(torch, dtype_name), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, RuntimeError) as exc:  # safetensors' own errors derive from these
        raise ModelError(f"transformers cannot load the model at {path}: {exc}") from exc
    return model.to(device).eval()


class TransformersBackend(Backend):
    name = "hf"

    def validate(self) -> None:
        super().validate()
        from precision.backends.variants import parse_variant

        for text in self.options.variants:
            parse_variant(text)

    def _activate_impl(self) -> None:
        self._device = resolve_device(self.spec.device)
        self._model = load_hf_model(self.model.path, self.spec.torch_dtype_name, self._device, trust_remote_code=self.options.trust_remote_code)
        if self.options.variants:
            from precision.backends.variants import apply_variants

            apply_variants(self._model, self.options.variants)
        self._decoder = transformers_compat.llama_decoder(self._model, self.model.path)

    def _deactivate_impl(self) -> None:
        self._model = self._decoder = None

    def _generate_impl(self, token_ids: list[int], max_new_tokens: int) -> Sequence[int]:
        import torch

        stop = list(self.model.stop_token_ids)
        config = transformers_compat.generation_config(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop or None,
            pad_token_id=stop[0] if stop else 0,
        )
        ids = torch.tensor([token_ids], device=self._device)
        with torch.inference_mode():
            out = self._model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        return out[0, len(token_ids):].tolist()

    def _capture_impl(self, token_ids: list[int], selection: CaptureSelection, path: Path) -> None:
        import torch

        positions = selection.position_indices(len(token_ids))
        keep = torch.tensor(positions, device=self._device)
        layers = selection.layer_indices(len(self._decoder.layers))
        captured: dict[str, Any] = {}

        def save(name: str):
            def hook(_module, _inputs, output):
                captured[name] = transformers_compat.layer_hidden_states(output)[0].index_select(0, keep).clone()

            return hook

        handles = [self._decoder.embed_tokens.register_forward_hook(save(EMBED))]
        handles += [self._decoder.layers[i].register_forward_hook(save(layer_site(i))) for i in layers]
        handles.append(self._decoder.norm.register_forward_hook(save(FINAL_NORM)))
        try:
            ids = torch.tensor([token_ids], device=self._device)
            with torch.inference_mode():
                self._decoder(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
                captured[LOGITS] = self._model.lm_head(captured[FINAL_NORM])
        finally:
            for handle in handles:
                handle.remove()
        missing = {EMBED, FINAL_NORM} - set(captured)
        if missing:
            raise BackendError(f"hooks did not fire for {sorted(missing)}; the model's forward does not call these modules")
        captured[POSITIONS] = torch.tensor(positions, dtype=torch.int64)
        write_tensors(path, captured)

    def _describe_impl(self) -> dict[str, Any]:
        return {
            "engine": "transformers",
            "dtype": self.spec.torch_dtype_name,
            "attn_implementation": transformers_compat.attn_implementation(self._model),
            "settings": {"trust_remote_code": self.options.trust_remote_code, "seed": self.options.seed},
            "variants": list(self.options.variants),
            **describe_device(self._device),
        }
