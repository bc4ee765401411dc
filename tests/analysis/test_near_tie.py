"""The near-tie bound on real logits of stories260K: healthy re-roundings of the BF16 reference (transformers
FP16 and FP32) flip only at near-ties; a +1.0 bias planted on the logit of the reference's most frequent
runner-up token flips positions for real, and the verdict FAILs naming the logits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from precision.analysis.compare import compare_captures
from precision.analysis.near_tie import FAMILY_ALPHA, classify_flips, family_z, ulp
from precision.analysis.verdict import Status, judge
from precision.backends import create_backend
from precision.capture.writer import CapturePlan, capture
from precision.model import inspect_model
from precision.planning import plan_from_prompts
from tests.analysis.planting import planted_copy
from tests.conftest import GOLDEN


@pytest.fixture(scope="module")
def captures(stories_path, tmp_path_factory):
    """Reference (BF16) and healthy targets (FP16, FP32) of the golden prompts the model's context holds."""
    stories = inspect_model(stories_path)
    root = tmp_path_factory.mktemp("near_tie")
    plan = plan_from_prompts(GOLDEN / "default.jsonl", stories, max_new_tokens=32)
    reference = capture(create_backend("hf:cpu:bf16", stories), plan, root / "ref", show_progress=False)
    following = CapturePlan.following(reference)
    targets = {dtype: capture(create_backend(f"hf:cpu:{dtype}", stories), following, root / dtype, show_progress=False)
               for dtype in ("fp16", "fp32")}
    return reference, targets, root


def _flips(comparison):
    return [f for p in comparison["prompts"] for f in p["logits"]["flips"]]


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_healthy_targets_flip_only_at_near_ties(captures, dtype):
    reference, targets, _ = captures
    comparison = compare_captures(reference, targets[dtype])
    flips = _flips(comparison)
    assert flips, "the healthy target must flip somewhere, or this test proves nothing"
    assert all(f["near_tie"] for f in flips), [f for f in flips if not f["near_tie"]]
    verdict = judge(comparison)
    assert not any(f.rule == "real-flip" for p in verdict.prompts for f in p.findings)
    for flip in flips:  # every number the bound is made of is recorded with the flip
        assert flip["bound"] == pytest.approx(flip["rounding_allowance"] + flip["z"] * math.sqrt(2) * flip["other_rms"])
        assert flip["flip_margin"] >= flip["expected_margin"] >= 0.0


def _most_frequent_runner_up(reference) -> int:
    counts: dict[int, int] = {}
    for record in reference.prompts:
        with reference.open_tensors(record) as handle:
            logits = handle.get_tensor("logits").float()
        runner_up = logits.topk(2, dim=-1).indices[:, 1]
        for token in runner_up.tolist():
            counts[token] = counts.get(token, 0) + 1
    return max(counts, key=counts.get)


def test_planted_logit_bias_gives_real_flips(captures):
    reference, targets, root = captures
    token = _most_frequent_runner_up(reference)

    def bias(_prompt, site, tensor):
        if site == "logits":
            tensor = tensor.float()
            tensor[:, token] += 1.0
            return tensor
        return None

    biased = planted_copy(targets["fp16"], root / "biased", bias)
    comparison = compare_captures(reference, biased)
    flips = _flips(comparison)
    real = [f for f in flips if not f["near_tie"]]
    assert real and all(f["actual_token"] == token for f in real)
    assert all(f["flip_margin"] > f["bound"] for f in real)
    verdict = judge(comparison)
    assert verdict.status is Status.FAIL
    finding = next(f for p in verdict.prompts for f in p.findings if f.rule == "real-flip")
    assert finding.site == "logits" and f"-> {token}" in finding.message


def test_the_bias_is_judged_by_the_other_tokens_noise():
    """The biased token's own error is left out of sigma: the same flip is real whatever that error is."""
    flip = {"flip_margin": 0.5, "other_rms": 0.01, "flip_scale": 8.0}
    classify_flips([flip], 100, reference_dtype="bfloat16", target_dtype="bfloat16")
    assert not flip["near_tie"]
    assert flip["rounding_allowance"] == 2 * 2.0 ** (3 - 7)  # one BF16 ULP at 8 on each side
    close = {"flip_margin": 0.0625, "other_rms": 0.01, "flip_scale": 8.0}
    classify_flips([close], 100, reference_dtype="bfloat16", target_dtype="bfloat16")
    assert close["near_tie"]


def test_z_holds_the_family_wise_rate():
    # Sidak: n two-sided tests at level alpha_1 give a family-wise rate 1 - (1 - alpha_1)^n = alpha.
    for n in (1, 48, 10_000):
        z = family_z(n)
        alpha_1 = math.erfc(z / math.sqrt(2))
        assert 1 - (1 - alpha_1) ** n == pytest.approx(FAMILY_ALPHA, rel=1e-6)
    assert family_z(1) == pytest.approx(2.5758, abs=1e-4)  # the familiar two-sided 1% point


def test_ulp():
    assert ulp(1.0, 7) == 2.0**-7 and ulp(-3.0, 7) == 2.0**-6 and ulp(0.0, 7) == 0.0
    assert np.float32(1.0) + np.float32(ulp(1.0, 23)) != np.float32(1.0)
    assert torch.tensor(8.0, dtype=torch.bfloat16) + ulp(8.0, 7) == torch.tensor(8.0 + 2.0**-4, dtype=torch.bfloat16)
