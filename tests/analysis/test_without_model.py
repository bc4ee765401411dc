"""compare and judge on a machine without the reference model directory (the split CPU-box / NPU-box workflow):
whatever needs the model is skipped with the reason recorded, never a crash."""

from __future__ import annotations

import json
import shutil

import pytest

from precision.analysis.compare import compare_captures
from precision.analysis.explain import build_analysis
from precision.analysis.replay import Replayer
from precision.analysis.verdict import judge
from precision.backends import create_backend
from precision.capture.writer import CapturePlan, capture
from precision.cli import main
from precision.model import inspect_model
from precision.planning import plan_from_prompts


@pytest.fixture(scope="module")
def moved_model_pair(stories_path, short_prompts, tmp_path_factory):
    """A reference and a target captured from a model copy that is then moved away."""
    root = tmp_path_factory.mktemp("no_model")
    model = inspect_model(shutil.copytree(stories_path, root / "model"))
    reference = capture(create_backend("hf:cpu:bf16", model), plan_from_prompts(short_prompts, model, max_new_tokens=4), root / "ref",
                        show_progress=False)
    target = capture(create_backend("hf:cpu:fp16", model), CapturePlan.following(reference), root / "target", show_progress=False)
    replayer = Replayer(str(root / "model"))
    (root / "model").rename(root / "elsewhere")
    return reference, target, replayer, root


def test_analysis_skips_the_replay_and_says_why(moved_model_pair):
    reference, target, replayer, root = moved_model_pair
    comparison = compare_captures(reference, target)
    analysis = build_analysis(comparison, reference=reference, target=target, replayer=replayer)
    assert analysis["local"]["available"] is False
    assert analysis["local"]["reason"] == f"replay skipped: model directory {root / 'model'} not found on this machine"
    assert analysis["theory"] and "capture manifest" in analysis["theory_source"]
    comparison["analysis"] = analysis
    assert judge(comparison).status.value in ("PASS", "WARN")


def test_compare_command_succeeds_without_the_model(moved_model_pair, tmp_path):
    reference, target, _, _ = moved_model_pair
    code = main(["-q", "compare", str(reference.path), str(target.path), "--out", str(tmp_path / "cmp")])
    assert code == 0
    comparison = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert comparison["analysis"]["local"]["available"] is False
