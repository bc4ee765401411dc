"""The layer-by-layer backends and the one-pass replay (precision.backends.layerwise, precision.analysis.replay):
the same captures bit for bit as the transformers backend, one step's weights at a time when streamed, and the
faster split-k variant computing what the old one did."""

from __future__ import annotations

import pytest
import torch

from precision.analysis.replay import Replayer
from precision.backends import BackendOptions, create_backend
from precision.backends.model_steps import ModelSteps
from precision.backends.variants import apply_variants
from precision.capture.writer import CapturePlan, capture
from precision.errors import BackendError
from precision.planning import plan_from_prompts
from precision.safetensors_io import SafetensorsFile


def _same_files(a, b) -> list[str]:
    """Names of the tensors that differ between two captures (every prompt)."""
    differing = []
    for ra, rb in zip(a.prompts, b.prompts):
        fa, fb = SafetensorsFile(a.path / ra.file), SafetensorsFile(b.path / rb.file)
        assert fa.keys() == fb.keys()
        differing += [f"{ra.id}:{n}" for n in fa.keys() if not torch.equal(fa.get_tensor(n), fb.get_tensor(n))]
    return differing


@pytest.fixture(scope="module")
def captured(stories, short_prompts, tmp_path_factory):
    root = tmp_path_factory.mktemp("layerwise")
    plan = plan_from_prompts(short_prompts, stories, max_new_tokens=6)
    reference = capture(create_backend("hf:cpu:bf16", stories), plan, root / "hf", show_progress=False)
    streamed = capture(create_backend("hf-streamed:cpu:bf16", stories), plan, root / "streamed", show_progress=False)
    following = CapturePlan.following(reference)
    truth = capture(create_backend("hf:cpu:fp32", stories), following, root / "truth-hf", show_progress=False)
    truth_layers = capture(create_backend("hf-layers:cpu:fp32", stories), following, root / "truth-layers", show_progress=False)
    return reference, streamed, truth, truth_layers


def test_streamed_reference_is_the_whole_model_reference_bit_for_bit(captured):
    reference, streamed, _, _ = captured
    assert [r.generated_ids for r in streamed.prompts] == [r.generated_ids for r in reference.prompts]
    assert _same_files(reference, streamed) == []
    assert streamed.manifest["backend"]["execution"] == "layer-streamed"


def test_teacher_forced_truth_layer_by_layer_is_the_whole_model_truth(captured):
    _, _, truth, truth_layers = captured
    assert _same_files(truth, truth_layers) == []
    # Its picks are the argmax at each forced position: equal to free generation until the first difference.
    for free, forced in zip(truth.prompts, truth_layers.prompts):
        agree = next((i for i, (x, y) in enumerate(zip(free.generated_ids, forced.generated_ids)) if x != y), len(forced.generated_ids))
        assert forced.generated_ids[:agree] == free.generated_ids[:agree] and len(forced.generated_ids) == len(forced.continuation_ids)


def test_streamed_steps_hold_no_weights_between_steps(stories):
    steps = ModelSteps(stories.path, streamed=True)
    with steps.step("layer.1") as layer:
        assert all(p.device.type == "cpu" for p in layer.parameters())
    assert all(p.device.type == "meta" for p in steps.model.parameters()), "a streamed model keeps no weights of its own"


@pytest.mark.parametrize("streamed", [False, True])
def test_a_varied_step_is_freed_when_it_ends(stories, streamed):
    """Without the garbage collector: a layer-streamed run holds one step, not every step it has run."""
    import gc
    import weakref

    steps = ModelSteps(stories.path, streamed=streamed)
    gc.disable()
    try:
        with steps.step("layer.0", variants=("attn:eager", "norm:fused", "mlp:fused", "split-k:16", "permute-k:1")) as layer:
            steps.run_layer(layer, torch.ones(1, 3, steps.model.config.hidden_size, dtype=torch.bfloat16))
            alive = weakref.ref(layer)
            weight = weakref.ref(layer.mlp.down_proj._split_k_weight) if hasattr(layer.mlp.down_proj, "_split_k_weight") else None
        del layer
        assert alive() is None and (weight is None or weight() is None)
    finally:
        gc.enable()


def test_streamed_replay_equals_the_resident_one_and_one_pass_serves_many(stories, captured):
    reference, streamed, _, _ = captured
    resident = Replayer(stories.path)
    alone = resident.replay(reference, reference)
    together = Replayer(stories.path, streamed=True).replay_all(reference, {"a": reference, "b": streamed}, without_truth=("b",))
    assert together["a"] == alone, "the target's replay (alone, BF16 and FP32) is the same streamed or resident"
    # A capture replayed without truth (an envelope member's) runs batched with the others: the same computation,
    # free in its last bits, so the reference replayed that way shows a small local error where alone it shows 0.
    assert all(s["local"] == 0.0 for s in alone)
    assert 0.0 < max(s["local"] for s in together["b"]) < 1e-3
    assert all(s["local_R"] is None for s in together["b"]), "a capture replayed without truth has no local R"


def _split_k_sequential(x, weight, chunk):
    """The original split-k (each chunk's FP32 partial, added one after another), as the oracle of the batched one."""
    total = None
    for start in range(0, weight.shape[1], chunk):
        part = torch.nn.functional.linear(x[..., start:start + chunk].float(), weight[:, start:start + chunk].float())
        total = part if total is None else total + part
    return total.to(x.dtype)


@pytest.mark.parametrize("inner,chunk", [(64, 16), (70, 16), (37, 64)])
def test_batched_split_k_computes_the_sequential_chunks(inner, chunk):
    torch.manual_seed(inner)
    linear = torch.nn.Linear(inner, 48, bias=False).to(torch.bfloat16)
    x = torch.randn(2, 5, inner).to(torch.bfloat16)
    expected = _split_k_sequential(x, linear.weight, chunk)
    apply_variants(linear, (f"split-k:{chunk}",))
    assert torch.equal(linear(x), expected)


def test_variants_apply_to_one_step_and_faults_do_not(stories):
    steps = ModelSteps(stories.path)
    with steps.step("layer.0", variants=("attn:eager",)) as varied:
        assert varied.self_attn.config._attn_implementation == "eager"
    assert steps.model.model.layers[0].self_attn.config._attn_implementation != "eager", "the model's own layer is untouched"
    before = {name: p.clone() for name, p in steps.model.named_parameters()}
    for variant in ("permute-k:3", "split-k:16", "norm:fused", "mlp:fused"):
        for site in steps.sites()[1:]:
            with steps.step(site, variants=(variant,)):
                pass
    assert all(torch.equal(before[name], p) for name, p in steps.model.named_parameters()), "variants share, never change, the weights"
    with pytest.raises(BackendError, match="whole model"):
        with steps.step("layer.0", variants=("fault:scale-weight:0:2",)):
            pass


def test_layer_backends_refuse_faults_and_devices(stories):
    with pytest.raises(BackendError, match="faults apply"):
        create_backend("hf-layers", stories, BackendOptions(variants=("fault:nan:0:0",))).validate()
    with pytest.raises(BackendError, match="CPU only"):
        create_backend("hf-streamed:cuda", stories).validate()
