"""Rounding alone never fails a run: healthy FP16 and FP32 targets against the BF16 reference pass the layer
replay rules without an envelope; a target off by a rounding at a step where every envelope member is exact
(the final norm of a model with unit norm weights) passes; real faults at the same steps still fail."""

from __future__ import annotations

import shutil

import pytest
from safetensors.torch import load_file, save_file

from precision.analysis.compare import compare_captures
from precision.analysis.explain import build_analysis
from precision.analysis.replay import Replayer
from precision.analysis.verdict import Status, judge
from precision.backends import BackendOptions, create_backend
from precision.capture.writer import CapturePlan, capture
from precision.model import inspect_model
from precision.planning import plan_from_prompts
from tests.conftest import requires_vllm


def _judged(reference, target, truth, replayer, members=None):
    comparison = compare_captures(reference, target, truth=truth)
    ids = [r.id for r in reference.prompts] if members else None
    comparison["analysis"] = build_analysis(comparison, reference=reference, target=target, members=members, envelope_prompts=ids,
                                            replayer=replayer)
    return comparison, judge(comparison)


def _failures(verdict):
    return [f for f in verdict.findings if f.status is Status.FAIL] + [f for p in verdict.prompts for f in p.findings if f.status is Status.FAIL]


@pytest.fixture(scope="module")
def stories_side(stories, stories_reference, stories_truth, tmp_path_factory):
    return stories, stories_reference, stories_truth, Replayer(stories.path), tmp_path_factory.mktemp("rounding")


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_wider_dtype_targets_pass_without_an_envelope(stories_side, dtype):
    stories, reference, truth, replayer, root = stories_side
    target = capture(create_backend(f"hf:cpu:{dtype}", stories), CapturePlan.following(reference), root / dtype, show_progress=False)
    comparison, verdict = _judged(reference, target, truth, replayer)
    assert verdict.status is not Status.FAIL, _failures(verdict)
    steps = {s["site"]: s for s in comparison["analysis"]["local"]["steps"]}
    assert steps["final_norm"]["local_gain"] is None and steps["logits"]["local_gain"] is None
    assert steps["final_norm"]["local"] > 0.0  # the step differs, by rounding: the rules had something to judge


def test_a_scaled_layer_still_fails_on_gain(stories_side):
    stories, reference, truth, replayer, root = stories_side
    faulty = capture(create_backend("hf:cpu:bf16", stories, BackendOptions(variants=("fault:scale-weight:2:1.01",))),
                     CapturePlan.following(reference), root / "scaled", show_progress=False)
    _, verdict = _judged(reference, faulty, truth, replayer)
    finding = next(f for f in verdict.findings if f.status is Status.FAIL)
    assert finding.rule == "local-gain" and finding.site == "layer.2"


def _unit_norm_copy(source, destination, final_norm_scale=1.0):
    """stories260K with every RMSNorm weight 1 (the final norm's times ``final_norm_scale``)."""
    shutil.copytree(source, destination)
    weights = load_file(str(destination / "model.safetensors"))
    for name, tensor in weights.items():
        if name.endswith("norm.weight"):
            weights[name] = tensor.new_ones(tensor.shape) * (final_norm_scale if name == "model.norm.weight" else 1.0)
    save_file(weights, str(destination / "model.safetensors"), metadata={"format": "pt"})
    return inspect_model(destination)


@pytest.fixture(scope="module")
def unit_norm_side(stories_path, short_prompts, tmp_path_factory):
    root = tmp_path_factory.mktemp("unit_norm")
    model = _unit_norm_copy(stories_path, root / "model")
    reference = capture(create_backend("hf:cpu:bf16", model), plan_from_prompts(short_prompts, model, max_new_tokens=8), root / "ref",
                        show_progress=False)
    following = CapturePlan.following(reference)
    truth = capture(create_backend("hf:cpu:fp32", model), following, root / "truth", show_progress=False)
    members = {name: capture(create_backend("hf:cpu:bf16", model, BackendOptions(variants=(name,))), following, root / name.replace(":", "-"),
                             show_progress=False) for name in ("norm:fused", "mlp:fused")}
    return model, reference, truth, members, Replayer(model.path), root


@requires_vllm
def test_healthy_vllm_passes_where_the_envelope_is_exact(unit_norm_side):
    model, reference, truth, members, replayer, root = unit_norm_side
    target = capture(create_backend("vllm", model), CapturePlan.following(reference), root / "vllm", show_progress=False)
    comparison, verdict = _judged(reference, target, truth, replayer, members)
    assert verdict.status is not Status.FAIL, _failures(verdict)
    norm = next(s for s in comparison["analysis"]["local"]["steps"] if s["site"] == "final_norm")
    assert norm["envelope_local_max"] == 0.0  # fused and unfused norms agree bit for bit with unit weights


def test_a_wrong_final_norm_still_fails_where_the_envelope_is_exact(unit_norm_side, tmp_path):
    model, reference, truth, members, replayer, root = unit_norm_side
    wrong = _unit_norm_copy(model.path, tmp_path / "wrong", final_norm_scale=1.02)
    target = capture(create_backend("hf:cpu:bf16", wrong), CapturePlan.following(reference), tmp_path / "cap", show_progress=False)
    comparison, verdict = _judged(reference, target, truth, replayer, members)
    finding = next(f for f in verdict.findings if f.status is Status.FAIL)
    assert finding.site == "final_norm" and finding.rule in ("local-R", "local-envelope"), finding
