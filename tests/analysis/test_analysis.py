"""Analysis on real captures of stories260K and the built-in model: exact replay, planted faults, envelope,
theory band, determinism and a target checkpoint of its own."""

from __future__ import annotations

import json
import math

import pytest

from precision.analysis.replay import Replayer
from precision.analysis.theory import ONE_ROUNDING, theory_band
from precision.backends import BackendOptions, create_backend
from precision.capture.writer import CapturePlan, capture
from precision.cli import main
from precision.model import inspect_model
from precision.planning import plan_from_prompts
from tests.conftest import GOLDEN


@pytest.fixture(scope="module")
def stories(stories_path):
    return inspect_model(stories_path)


@pytest.fixture(scope="module")
def reference(stories, short_prompts, tmp_path_factory):
    plan = plan_from_prompts(short_prompts, stories, max_new_tokens=8)
    return capture(create_backend("hf:cpu:bf16", stories), plan, tmp_path_factory.mktemp("an") / "ref", show_progress=False, repeats=3)


def test_replaying_the_reference_on_itself_is_exact(stories, reference):
    steps = Replayer(stories.path).replay(reference, reference)
    assert [s["site"] for s in steps] == [f"layer.{i}" for i in range(5)] + ["final_norm", "logits"]
    for step in steps:
        assert step["local"] == 0.0, step
        # The reference's own distance from FP32 over max(that distance, one rounding): 1, or below 1 at a step
        # whose BF16 replay is closer to FP32 than one rounding (the floor that keeps R bounded).
        assert 0.0 < step["local_R"] <= 1.0, step


def test_replay_separates_local_from_inherited_error(stories, reference, tmp_path):
    """A fault planted in layer 3 shows local error at layer 3 only; later layers only inherit it."""
    faulty = capture(create_backend("hf:cpu:bf16", stories, BackendOptions(variants=("fault:scale-weight:3:1.05",))),
                     CapturePlan.following(reference), tmp_path / "faulty", show_progress=False)
    steps = {s["site"]: s for s in Replayer(stories.path).replay(faulty, reference)}
    assert steps["layer.0"]["local"] == steps["layer.2"]["local"] == 0.0
    assert steps["layer.3"]["local"] > 1e-2 and steps["layer.3"]["local_gain"] > 0.01
    assert steps["layer.4"]["local"] == 0.0 and steps["layer.4"]["inherited"] > 1e-2
    assert steps["layer.4"]["amplification"] > 0.5


def test_reference_is_deterministic_over_repeats(reference):
    for record in reference.prompts:
        assert record.determinism == {"runs": 3, "tokens_identical": True, "tensors_identical": True, "max_relative_l2": 0.0}


def test_theory_band_from_the_model_shape():
    band = theory_band(["embed", "layer.0", "layer.3", "final_norm", "logits"], hidden_size=64, intermediate_size=172, head_dim=8, sequence_length=100)
    rows = {r["site"]: r for r in band}
    assert rows["embed"]["roundings"] == 1 and rows["layer.3"]["roundings"] == 16 and rows["logits"]["roundings"] == 18
    accumulation = math.sqrt(172) * 2.0**-24
    assert rows["layer.3"]["vs_truth_high"] == pytest.approx(4 * (ONE_ROUNDING + accumulation))
    assert rows["layer.0"]["between_engines_low"] == pytest.approx(math.sqrt(2) * (ONE_ROUNDING + accumulation))


def test_selftest_on_stories260k_catches_every_planted_fault(stories_path, tmp_path, capsys):
    out = tmp_path / "selftest"
    assert main(["-q", "selftest", "--model", str(stories_path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "sensitivity" in printed and "weight scale: caught down to" in printed
    cases = {c["name"]: c for c in json.loads((out / "selftest.json").read_text())["cases"]}
    assert cases["reordered reduction"]["verdict"] == "PASS"
    assert cases["bf16 accumulation in layer 2"]["verdict"] == "FAIL" and cases["bf16 accumulation in layer 2"]["named_site"] == "layer.2"
    assert cases["layer 2 weight x (1 + 1e-2)"]["verdict"] == "FAIL" and cases["layer 2 weight x (1 + 1e-2)"]["named_site"] == "layer.2"
    assert cases["NaN in layer 1 at position 3"]["verdict"] == "FAIL" and cases["NaN in layer 1 at position 3"]["ok"]
    for name in ("bf16 accumulation in layer 0", "bf16 accumulation in layer 4"):
        assert cases[name]["ok"], cases[name]
    report = (out / "cases" / "02" / "report.html").read_text()
    assert "local-gain" in report and "layer.2" in report


def test_selftest_on_the_builtin_model(builtin_path, tmp_path):
    assert main(["-q", "selftest", "--model", str(builtin_path), "--no-sweep", "--prompts", str(GOLDEN / "default.jsonl"), "--out", str(tmp_path / "st")]) == 0


def test_target_model_of_another_architecture_is_refused(stories_path, builtin_path, short_prompts, tmp_path, capsys):
    code = main(["run", "--prompts", str(short_prompts), "--model", str(stories_path), "--target", "hf:cpu:bf16",
                 "--target-model", str(builtin_path), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "same architecture" in capsys.readouterr().err


def test_target_model_exact_copy_passes(stories, short_prompts, tmp_path):
    """The head-padded copy computes the same function: as a --target-model it must PASS with zero error."""
    from precision.backends.head_padding import pad_heads

    copy_dir = pad_heads(stories, 32, tmp_path / "models")
    out = tmp_path / "run"
    assert main(["-q", "run", "--prompts", str(short_prompts), "--model", stories.path, "--target", "hf:cpu:bf16", "--target-model", str(copy_dir),
                 "--max-new-tokens", "8", "--envelope", "none", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verdict"]["status"] == "PASS"
    assert all(site["relative_l2"] == 0.0 for site in summary["sites"])
