"""Every use of a transformers API that is private or changes between releases, in one place.

The backends and the replay reach transformers only through the functions here (a test holds them to that), so
a transformers release that renames an argument or changes a return convention fails here with a message that
names the installed version, the API and the range to install, instead of capturing the wrong tensor.
docs/engine-compat.md lists each API, why it is used and what breaks when it changes.

Module structure that is part of a checkpoint's format (model.model.layers[i].mlp.down_proj, lm_head, ...) is
the model's, not the library's, and stays with the code that uses it.
"""

from __future__ import annotations

import tempfile
import types
from typing import Any, Callable

from precision.backends.compat import distribution_version, missing_api_error, warn_if_untested
from precision.errors import BackendError, ModelError

ENGINE = "transformers"
TESTED_VERSIONS = ">=5.19,<6"
"""The transformers releases these functions were run against (5.19.0 in the test suite); the 4.x branches
below (dtype keyword, tuple-returning layers) follow the 4.46+ sources and are not run by the tests."""
INSTALL = f"pip install 'transformers{TESTED_VERSIONS}'"

VERSION_DEPENDENT_NAMES = (
    "set_attn_implementation", "_attn_implementation", "rotary_emb", "position_embeddings", "variance_epsilon",
    "torch_dtype",
)
"""Attribute and keyword names of the private or version-dependent APIs below; only this module may spell them
(tested)."""


# -- version --------------------------------------------------------------------------------------------------
def installed_version() -> str | None:
    return distribution_version("transformers")


def check_version() -> bool:
    """Warn (log) when the installed transformers is outside TESTED_VERSIONS; True when inside."""
    version = installed_version()
    if version is None:
        raise BackendError(f"precision-check needs transformers: {INSTALL}")
    return warn_if_untested(ENGINE, version, TESTED_VERSIONS)


def missing_api(api: str, detail: str = "") -> BackendError:
    return missing_api_error(ENGINE, installed_version(), TESTED_VERSIONS, api, INSTALL, detail)


def require(api: str, obj: Any, attr: str) -> Any:
    """``obj.attr``, or a BackendError naming the transformers version and ``api`` (never a silent default)."""
    try:
        return getattr(obj, attr)
    except AttributeError:
        raise missing_api(api) from None


def major_version() -> int:
    version = installed_version()
    if version is None:
        check_version()  # raises the install message
    from packaging.version import Version

    return Version(version).major


# -- loading and generating -----------------------------------------------------------------------------------
def dtype_keyword() -> str:
    """transformers 5 renamed from_pretrained's ``torch_dtype=`` to ``dtype=``; 4.x knows only the old name.
    Both are the same setting, so choosing by major version is exact, not a fallback."""
    return "dtype" if major_version() >= 5 else "torch_dtype"


def load_causal_lm(path: str, dtype: Any, *, trust_remote_code: bool = False) -> Any:
    """AutoModelForCausalLM from safetensors weights in ``dtype`` (a torch dtype). Errors other than a missing
    API are the model's and propagate for the caller to word."""
    check_version()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, use_safetensors=True,
                                                **{dtype_keyword(): dtype})


def generation_config(**settings: Any) -> Any:
    from transformers import GenerationConfig

    return GenerationConfig(**settings)


def llama_decoder(model: Any, where: str) -> Any:
    """``model.model``, the decoder stack of a Llama-family causal LM, with embed_tokens / layers / norm."""
    decoder = getattr(model, "model", None)
    if decoder is None or not all(hasattr(decoder, a) for a in ("embed_tokens", "layers", "norm")):
        raise ModelError(f"{where}: {type(model).__name__} has no model.embed_tokens / layers / norm; only Llama-family decoders are supported")
    return decoder


# -- conventions of a forward pass ----------------------------------------------------------------------------
def layer_hidden_states(output: Any) -> Any:
    """The hidden states a decoder layer returns: the tensor itself in transformers 5, element 0 of a tuple
    in 4.x (which also returned attention weights / caches). Anything else is an unknown convention."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise missing_api("decoder layers returning hidden states (a tensor, or a tuple led by one)",
                      f"a layer returned {type(output).__name__}")


def run_decoder_layer(model: Any, index: int, hidden: Any) -> Any:
    """Decoder layer ``index`` of ``model`` on ``hidden`` [1, positions, width] alone, causal, positions from 0."""
    return run_layer(model.model.layers[index], rotary_embedding(model.model), hidden)


def rotary_embedding(decoder: Any) -> Any:
    """The decoder's rotary embedding module (computes every layer's cos/sin once per forward)."""
    return require("LlamaModel.rotary_emb", decoder, "rotary_emb")


def run_layer(layer: Any, rotary: Any, hidden: Any, *, cache: Any = None, start: int = 0, mask: Any = None) -> Any:
    """One decoder layer on ``hidden`` [batch, positions, width]: causal, positions ``start``.. (each row its own
    sequence), with the attention mask the model's own forward would build for the layer's attention
    implementation (none for sdpa: it is causal by itself; a float mask for eager). With ``cache`` (a KV cache
    from ``kv_cache``), the keys and values of earlier positions come from it and this step's are appended; the
    mask must then be ``attention_mask(...)`` taken before the step's first layer (as the model's forward takes it
    once, before the cache grows).

    In the tested releases the decoder computes the rotary cos/sin once (``model.model.rotary_emb``) and hands
    them to every layer as ``position_embeddings``; the layer no longer computes them itself."""
    import torch

    positions = (torch.arange(hidden.shape[1]) + start).unsqueeze(0)
    if cache is None:
        config = require("LlamaAttention.config", layer.self_attn, "config")
        mask = attention_mask(config, hidden, None, start, attention_kind(config, require("LlamaAttention.layer_idx", layer.self_attn, "layer_idx")))
    output = layer(hidden, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=cache is not None,
                   position_embeddings=rotary(hidden, positions))
    return layer_hidden_states(output)


def attention_kind(config: Any, index: int) -> str:
    """"sliding_attention" or "full_attention": what layer ``index`` attends to, as the model's forward decides it
    (Qwen2/Qwen3 name each layer's kind in ``layer_types``; Mistral slides every layer when ``sliding_window`` is set)."""
    kinds = getattr(config, "layer_types", None)
    if kinds:
        return kinds[index]
    return "full_attention" if getattr(config, "sliding_window", None) is None else "sliding_attention"


def attention_mask(config: Any, hidden: Any, cache: Any, start: int = 0, kind: str = "full_attention") -> Any:
    """The mask the model's forward builds for ``hidden`` at positions ``start``.. for layers of ``kind`` (None
    where the attention implementation is causal by itself)."""
    import torch
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    positions = (torch.arange(hidden.shape[1]) + start).unsqueeze(0)
    build = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
    return build(config=config, inputs_embeds=hidden, attention_mask=None, past_key_values=cache, position_ids=positions)


def kv_cache(model: Any) -> Any:
    """An empty KV cache for ``model``'s layers (what generate() starts from)."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def model_skeleton(path: str, dtype: Any, *, trust_remote_code: bool = False) -> Any:
    """The causal LM at ``path`` built from its config.json with no weights (every parameter on the meta device),
    so that one layer at a time can be given its weights (precision.backends.layerwise). The rotary embedding,
    which holds computed buffers and no weights, is built on the CPU: ``model.model.rotary_emb`` is usable."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    check_version()
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, **{dtype_keyword(): dtype})
    decoder = llama_decoder(model, path)
    rotary = require("LlamaModel.rotary_emb", decoder, "rotary_emb")
    with torch.device("cpu"):
        decoder.rotary_emb = type(rotary)(config=model.config)
    return model.eval()


def set_layer_attn_implementation(layer: Any, implementation: str) -> None:
    """Make one decoder layer's attention run ``implementation`` (it reads its own config's choice), leaving the
    config other layers share untouched."""
    import copy

    attention = layer.self_attn
    config = copy.copy(require("LlamaAttention.config", attention, "config"))
    config._attn_implementation = implementation
    attention.config = config
    if attention.config._attn_implementation != implementation:
        raise missing_api(f"layer attention implementation {implementation!r}")


def attn_implementation(model: Any) -> str:
    """The attention implementation the model runs (sdpa, eager, ...), as recorded in its config."""
    return str(require("PretrainedConfig._attn_implementation", model.config, "_attn_implementation"))


def set_attn_implementation(model: Any, implementation: str) -> None:
    """Switch the loaded model's attention implementation (sdpa -> eager), and check that it switched."""
    require("PreTrainedModel.set_attn_implementation", model, "set_attn_implementation")(implementation)
    if attn_implementation(model) != implementation:
        raise missing_api(f"set_attn_implementation({implementation!r})", f"the model still runs {attn_implementation(model)!r}")


def rms_norm_epsilon(module: Any) -> float:
    """The epsilon of a transformers RMSNorm module (Llama-family ``*RMSNorm`` classes keep it here)."""
    return float(require(f"{type(module).__name__}.variance_epsilon", module, "variance_epsilon"))


def replace_forward(module: Any, forward: Callable) -> None:
    """Make ``module`` compute ``forward(module, *args)`` instead of its class's forward.

    torch's Module.__call__ dispatches to ``self.forward``, so an instance attribute shadows the class method
    (transformers' hub-kernel decorators replace the class attribute, which the instance one still shadows).
    Checked after setting, because a module whose __call__ bypasses ``self.forward`` would keep its own."""
    import torch

    if not isinstance(module, torch.nn.Module) or type(module).__call__ is not torch.nn.Module.__call__:
        raise missing_api(f"{type(module).__name__}.__call__ dispatching to self.forward")
    module.forward = types.MethodType(forward, module)


# -- all at once --------------------------------------------------------------------------------------------------
def check_all() -> list[str]:
    """Check every API above against the installed transformers on a tiny in-memory Llama (a few hundred
    weights, CPU, milliseconds). Returns the APIs checked; raises BackendError naming the first missing one."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    check_version()
    checked = ["version"]
    config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=16)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="precision-compat-") as folder:
        LlamaForCausalLM(config).save_pretrained(folder)
        model = load_causal_lm(folder, torch.bfloat16).eval()
    if model.dtype != torch.bfloat16:
        raise missing_api(f"from_pretrained({dtype_keyword()}=...)", f"the model loaded in {model.dtype}, not bfloat16")
    model = model.float()
    checked.append(f"from_pretrained({dtype_keyword()}=...)")
    llama_decoder(model, "check_all")
    hidden = torch.randn(1, 3, config.hidden_size)
    with torch.inference_mode():
        out = run_decoder_layer(model, 0, hidden)
    if tuple(out.shape) != tuple(hidden.shape):
        raise missing_api("decoder layer output of the input's shape", f"got {tuple(out.shape)} for {tuple(hidden.shape)}")
    checked += ["LlamaModel.rotary_emb + layer(position_embeddings=...)", "decoder layer return convention"]
    generation_config(max_new_tokens=1, do_sample=False)
    checked.append("GenerationConfig")
    attn_implementation(model)
    set_attn_implementation(model, "eager")
    checked += ["PretrainedConfig._attn_implementation", "PreTrainedModel.set_attn_implementation"]
    norm = model.model.norm
    rms_norm_epsilon(norm)
    replace_forward(norm, lambda self, x: x + 1.0)
    if float(norm(torch.zeros(1, config.hidden_size))[0, 0]) != 1.0:
        raise missing_api("instance forward replacement", "the module kept its class forward")
    checked += ["RMSNorm.variance_epsilon", "instance forward replacement"]
    return checked
