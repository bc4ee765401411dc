"""Model families: Llama, Qwen2 (q/k/v biases), Qwen3 (q/k norms) and Mistral (here with a 16-token sliding window,
shorter than the prompts), each on a tiny random checkpoint of its architecture built here; unsupported architectures refused, naming what they lack, before any model loads.

The vLLM runs are the whole job (reference, FP32 truth, 8-member envelope, vLLM CPU target with 2 repeats, compare,
replay, verdict), one per family, shared by the assertions. Llama's vLLM run is the main job's on stories260K
(tests/test_cli.py) and the built-in model's (tests/backends/test_vllm.py); here it is checked without vLLM.
"""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from precision.analysis.compare import compare_captures
from precision.analysis.envelope import DEFAULT_MEMBERS as DEFAULT_ENVELOPE, member_name
from precision.analysis.verdict import Status, judge
from precision.backends import BackendOptions, create_backend
from precision.backends.vllm import KV_CACHE_SPACE_VARIABLE
from precision.capture.reader import CaptureReader
from precision.capture.writer import CapturePlan, capture
from precision.cli import main
from precision.default_model import TINY_FAMILIES, build_tiny_model
from precision.errors import BackendError, ModelError
from precision.model import inspect_model
from precision.planning import plan_from_prompts
from tests.conftest import requires_vllm

VLLM_FAMILIES = ("qwen2", "qwen3", "mistral")


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: build_tiny_model(family, root / family) for family in TINY_FAMILIES}


def _copy_with(source, destination, change):
    """A copy of checkpoint ``source`` whose tensors ``change`` edits (a dict of name -> tensor, edited in place)."""
    shutil.copytree(source, destination)
    weights = load_file(str(destination / "model.safetensors"))
    change(weights)
    save_file(weights, str(destination / "model.safetensors"), metadata={"format": "pt"})
    return destination


# -- what each tiny checkpoint is ------------------------------------------------------------------------------------
def test_each_tiny_checkpoint_is_its_family_with_its_feature(family_models):
    features = {"qwen2": "self_attn.q_proj.bias", "qwen3": "self_attn.q_norm.weight"}
    for family, path in family_models.items():
        info = inspect_model(path)
        assert info.architecture == TINY_FAMILIES[family][1]
        assert (info.num_layers, info.hidden_size) == (2, 64)
        names = set(load_file(str(path / "model.safetensors")))
        for other_family, feature in features.items():
            assert (f"model.layers.1.{feature}" in names) == (family == other_family), (family, feature)
    config = json.loads((family_models["mistral"] / "config.json").read_text())
    assert config["sliding_window"] == 16 and config["model_type"] == "mistral"


# -- refusals: named, exit 2, before anything runs -------------------------------------------------------------------
def _gpt2(path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=300, n_positions=64, bos_token_id=0, eos_token_id=0)).save_pretrained(path)
    return path


def _qwen2_moe(path):
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    config = Qwen2MoeConfig(hidden_size=64, intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                            num_experts=4, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                            vocab_size=300, max_position_embeddings=64)
    config.architectures = ["Qwen2MoeForCausalLM"]
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


@pytest.mark.parametrize("build, expected", [
    (_gpt2, ["GPT2LMHeadModel", "not a supported model family", "lack model.embed_tokens.weight", "Qwen3 (Qwen3ForCausalLM)"]),
    (_qwen2_moe, ["Qwen2MoeForCausalLM", "mixture-of-experts", "num_experts=4", "mlp.gate_proj"]),
], ids=["gpt2", "qwen2-moe"])
def test_an_unsupported_architecture_is_refused_naming_what_it_lacks(build, expected, short_prompts, tmp_path, capsys, monkeypatch):
    model = build(tmp_path / "model")
    from precision.backends import hf

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the architecture was checked")

    monkeypatch.setattr(hf, "load_hf_model", no_loading)
    out = tmp_path / "run"
    assert main(["-q", "run", "--prompts", str(short_prompts), "--model", str(model), "--out", str(out)]) == 2
    message = capsys.readouterr().err
    assert all(part in message for part in expected), message
    assert "Traceback" not in message and not out.exists()


@pytest.mark.parametrize("family, dropped, named", [
    ("qwen2", ".self_attn.k_proj.bias", "model.layers.0.self_attn.k_proj.bias"),
    ("qwen3", ".self_attn.q_norm.weight", "model.layers.0.self_attn.q_norm.weight"),
])
def test_a_checkpoint_without_its_familys_tensors_is_refused(family_models, family, dropped, named, tmp_path):
    inspect_model(family_models[family])  # the complete checkpoint passes the same check
    broken = _copy_with(family_models[family], tmp_path / "broken", lambda w: [w.pop(n) for n in [n for n in w if n.endswith(dropped)]])
    with pytest.raises(ModelError, match="lack") as refusal:
        inspect_model(broken)
    assert named in str(refusal.value) and TINY_FAMILIES[family][1] in str(refusal.value)


# -- capture + replay through transformers, every family ---------------------------------------------------------------
@pytest.fixture(scope="module")
def references(family_models, short_prompts, tmp_path_factory):
    """BF16 reference captures (6 new tokens) of every family: transformers' hooks on each."""
    root = tmp_path_factory.mktemp("family-refs")
    captured = {}
    for family, path in family_models.items():
        model = inspect_model(path)
        captured[family] = capture(create_backend("hf:cpu:bf16", model), plan_from_prompts(short_prompts, model, max_new_tokens=6),
                                   root / family, show_progress=False)
    return captured


@pytest.mark.parametrize("family", list(TINY_FAMILIES))
def test_replaying_a_familys_reference_on_itself_is_exact(references, family):
    from precision.pipeline import analysed_comparison

    reference = references[family]
    if family == "mistral":  # the window (16 tokens) is shorter than every sequence: the replay must mask by it
        assert min(len(r.prompt_ids) for r in reference.prompts) > 16
    analysis = analysed_comparison(reference, reference, None, show_progress=False)["analysis"]
    steps = analysis["local"]["steps"]
    assert [s["site"] for s in steps] == ["layer.0", "layer.1", "final_norm", "logits"]
    assert all(s["local"] == 0.0 for s in steps), [(s["site"], s["local"]) for s in steps]


def _bit_identical(expected: CaptureReader, actual: CaptureReader) -> list[str]:
    """The (prompt, tensor) pairs that differ in any bit; empty when the captures are the same."""
    import torch

    differing = []
    for e_rec, a_rec in zip(expected.prompts, actual.prompts):
        with expected.open_tensors(e_rec) as eh, actual.open_tensors(a_rec) as ah:
            differing += [f"{e_rec.id}/{name}" for name in eh.keys() if not torch.equal(eh.get_tensor(name), ah.get_tensor(name))]
    return differing


@pytest.mark.parametrize("spec", ["hf-layers:cpu:bf16", "hf-streamed:cpu:bf16"])
def test_layer_by_layer_captures_of_each_family_equal_the_transformers_forward(references, family_models, spec, tmp_path):
    for family, reference in references.items():
        layered = capture(create_backend(spec, inspect_model(family_models[family])), CapturePlan.following(reference), tmp_path / family,
                          show_progress=False)
        assert not _bit_identical(reference, layered), family


# -- vLLM CPU against transformers, the whole job ---------------------------------------------------------------------
@pytest.fixture(scope="module", params=VLLM_FAMILIES)
def family_run(request, family_models, short_prompts, tmp_path_factory):
    from precision.pipeline import RunConfig, run

    family = request.param
    out = tmp_path_factory.mktemp("family-runs") / family
    with pytest.MonkeyPatch.context() as env:
        # A KV cache the size of these models' needs (64 MiB, not the default GiB), as a user would set it.
        env.delenv(KV_CACHE_SPACE_VARIABLE, raising=False)
        result = run(RunConfig(prompts=short_prompts, out=out, model=family_models[family], target="vllm", max_new_tokens=6, repeats=2,
                               engine_args={"kv_cache_memory_bytes": 64 << 20}, show_progress=False))
    return family, result


@requires_vllm
@pytest.mark.vllm
def test_vllm_cpu_passes_against_transformers_on_each_family(family_run):
    family, result = family_run
    findings = [(f.status.name, f.rule, f.site) for f in result.verdict.findings]
    assert result.verdict.status is Status.PASS, findings
    assert [f.rule for f in result.verdict.findings] == ["explained"], findings
    analysis = result.comparison["analysis"]
    assert analysis["local"]["available"] and len(analysis["local"]["steps"]) == 4
    assert analysis["envelope"]["members"] == [member_name(m) for m in DEFAULT_ENVELOPE]
    assert all(step["local_R"] < 1.5 for step in analysis["local"]["steps"])
    target = CaptureReader(result.out / "captures" / "target")
    assert target.manifest["backend"]["model_transform"] is None  # head_dim 32 runs as it is: no padded copy
    assert target.manifest["backend"]["model_class"] == TINY_FAMILIES[family][1]  # vLLM's own implementation of the family
    assert target.manifest["backend"]["settings"]["kv_cache_memory_bytes"] == 64 << 20
    logits = next(site for site in result.comparison["sites"] if site["site"] == "logits")
    assert 0.0 < logits["relative_l2"] < 0.05, logits  # the engines differ, by rounding


@requires_vllm
@pytest.mark.vllm
def test_a_kv_cache_size_the_environment_would_override_is_refused(family_models, monkeypatch):
    """vLLM's CPU build lets VLLM_CPU_KVCACHE_SPACE replace kv_cache_memory_bytes silently: the two together are refused
    before anything runs; the engine setting alone is passed on (the family runs above start vLLM with it)."""
    model = inspect_model(family_models["llama"])
    sized = BackendOptions(engine_args={"kv_cache_memory_bytes": 64 << 20})
    monkeypatch.setenv(KV_CACHE_SPACE_VARIABLE, "1")
    with pytest.raises(BackendError, match="VLLM_CPU_KVCACHE_SPACE=1 in the environment overrides"):
        create_backend("vllm", model, sized).validate()
    create_backend("vllm", model).validate()  # the variable alone is vLLM's CPU default
    monkeypatch.delenv(KV_CACHE_SPACE_VARIABLE)
    create_backend("vllm", model, sized).validate()


def _without_window(destination):
    config = json.loads((destination / "config.json").read_text())
    config["sliding_window"] = None
    (destination / "config.json").write_text(json.dumps(config))


FEATURE_DROPPED = {
    # An engine that ignored the family's feature computes what the reference computes on these copies: weights
    # changed (a tensor edit) or config.json changed (a directory edit).
    "qwen2": (lambda w: [w[n].zero_() for n in w if n.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))], None),
    "qwen3": (lambda w: [w[n].fill_(1.0) for n in w if n.endswith(("q_norm.weight", "k_norm.weight"))], None),
    "mistral": (lambda w: None, _without_window),
}


@pytest.mark.parametrize("family", list(FEATURE_DROPPED))
def test_an_engine_ignoring_the_familys_feature_fails(references, family_models, family, tmp_path):
    """The vLLM PASS above is not vacuous: the family's own computation moves the result far beyond rounding, so an
    engine that skipped it would FAIL."""
    reference = references[family]
    following = CapturePlan.following(reference)
    truth = capture(create_backend("hf:cpu:fp32", inspect_model(family_models[family])), following, tmp_path / "truth", show_progress=False)
    change_weights, change_directory = FEATURE_DROPPED[family]
    copy = _copy_with(family_models[family], tmp_path / "without", change_weights)
    if change_directory is not None:
        change_directory(copy)
    without = inspect_model(copy)
    ignoring = capture(create_backend("hf:cpu:bf16", without), following, tmp_path / "ignoring", show_progress=False)
    comparison = compare_captures(reference, ignoring, truth=truth)
    verdict = judge(comparison)
    logits = next(site for site in comparison["sites"] if site["site"] == "logits")
    assert verdict.status is Status.FAIL, ([(f.status.name, f.rule, f.site) for f in verdict.findings], logits)
    assert logits["R"] > 1.5, logits


@requires_vllm
@pytest.mark.vllm
def test_a_qk_norm_model_whose_heads_vllm_cpu_cannot_run_is_refused_before_any_capture(family_models, tmp_path):
    """Head padding (precision.backends.head_padding) is exact for Llama-shaped heads; an RMSNorm over each head would
    average the padding's zeros too, so a Qwen3 with an unsupported head size is refused, not silently approximated."""
    create_backend("vllm", inspect_model(family_models["qwen3"])).validate()  # head_dim 32: runs as it is
    narrow = tmp_path / "narrow"
    shutil.copytree(family_models["qwen3"], narrow)
    config = json.loads((narrow / "config.json").read_text())
    config.update(head_dim=16, num_attention_heads=4, num_key_value_heads=2)  # the same weight shapes, heads of 16
    (narrow / "config.json").write_text(json.dumps(config))
    weights = load_file(str(narrow / "model.safetensors"))
    for name in [n for n in weights if n.endswith(("q_norm.weight", "k_norm.weight"))]:
        weights[name] = weights[name][:16].clone()
    save_file(weights, str(narrow / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(BackendError, match="q/k norms rule out the exact head padding"):
        create_backend("vllm", inspect_model(narrow)).validate()
