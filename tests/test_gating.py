"""Regression gating end to end on this machine: a golden store of stories260K, the vLLM CPU build as the "new
build", a planted regression as the bad one (the recipe of docs/ci-gating.md)."""

from __future__ import annotations

import json
import shutil

import pytest
import xmlschema

from precision.cli import main
from tests.conftest import GOLDEN, REPO, requires_vllm

pytestmark = [requires_vllm, pytest.mark.vllm]
SCHEMA = xmlschema.XMLSchema(str(REPO / "tests" / "data" / "junit.xsd"))


@pytest.fixture(scope="module")
def store(stories_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("gate") / "store"
    assert main(["-q", "golden", "create", "--model", str(stories_path), "--prompts", str(GOLDEN), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def baseline(store, stories_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("gate") / "baseline"
    junit = out.parent / "baseline.xml"
    assert main(["-q", "run", "--prompts", str(GOLDEN), "--reference", str(store), "--model", str(stories_path), "--target", "vllm",
                 "--out", str(out), "--junit", str(junit)]) == 0
    return out


@pytest.fixture(scope="module")
def bad_build(store, stories_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("gate")
    assert main(["-q", "plant-fault", "--model", str(stories_path), "--layer", "2", "--factor", "1.01", "--out", str(root / "bad-model")]) == 0
    out = root / "candidate"
    code = main(["-q", "run", "--prompts", str(GOLDEN), "--reference", str(store), "--model", str(stories_path), "--target", "vllm",
                 "--target-model", str(root / "bad-model"), "--out", str(out)])
    assert code == 1  # its own verdict already fails
    return out


def test_store_is_intact_and_compact_form_small(store, capsys):
    assert main(["golden", "verify", str(store)]) == 0
    manifest = json.loads((store / "store.json").read_text())
    assert manifest["compact"]["bytes"] < 1024 * 1024
    assert "intact" in capsys.readouterr().out


def test_store_detects_a_changed_file(store, tmp_path, capsys):
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    tensor = copy / "captures" / "truth" / "tensors" / "0000.safetensors"
    data = bytearray(tensor.read_bytes())
    data[-10] ^= 0x40
    tensor.write_bytes(bytes(data))
    assert main(["golden", "verify", str(copy)]) == 1
    assert "0000.safetensors" in capsys.readouterr().out


def test_the_run_used_the_store_not_a_new_reference(baseline, store):
    comparison = json.loads((baseline / "comparison.json").read_text())
    assert comparison["expected"]["path"] == str((store / "captures" / "reference").resolve())
    assert not (baseline / "captures" / "reference").exists()


def test_identical_candidate_exits_0(baseline, tmp_path):
    assert main(["regress", str(baseline), str(baseline), "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "regression.json").read_text())["status"] == "PASS"


def test_planted_regression_exits_1_and_names_the_layer(baseline, bad_build, tmp_path, capsys):
    junit = tmp_path / "regress.xml"
    assert main(["regress", str(baseline), str(bad_build), "--out", str(tmp_path), "--junit", str(junit)]) == 1
    printed = capsys.readouterr().out
    assert "layer.2" in printed
    result = json.loads((tmp_path / "regression.json").read_text())
    assert result["first_worse_scope"] == "layer.2"
    SCHEMA.validate(str(junit))
    assert 'failures="0"' not in junit.read_text()


def test_run_junit_validates_against_the_schema(baseline):
    junit = baseline.parent / "baseline.xml"
    SCHEMA.validate(str(junit))
    text = junit.read_text()
    assert 'classname="prompt.zh-knowledge-01"' in text and 'name="explained"' in text


def test_runs_against_different_references_exit_2(baseline, stories_path, tmp_path, capsys):
    other = tmp_path / "other"
    assert main(["-q", "run", "--prompts", str(GOLDEN), "--model", str(stories_path), "--target", "hf:cpu:fp16", "--envelope", "none",
                 "--no-replay", "--repeats", "1", "--out", str(other)]) == 0
    capsys.readouterr()
    assert main(["regress", str(baseline), str(other), "--out", str(tmp_path / "r")]) == 2
    assert "different references" in capsys.readouterr().err


def test_store_for_another_prompt_set_is_refused(store, stories_path, tmp_path, capsys):
    prompts = tmp_path / "other.jsonl"
    prompts.write_text('{"id": "x", "category": "c", "text": "A dog ran."}\n')
    assert main(["run", "--prompts", str(prompts), "--reference", str(store), "--model", str(stories_path), "--target", "hf:cpu:fp16",
                 "--out", str(tmp_path / "o")]) == 2
    assert "another prompt set" in capsys.readouterr().err


def test_store_for_another_model_is_refused(store, builtin_path, tmp_path, capsys):
    assert main(["run", "--prompts", str(GOLDEN), "--reference", str(store), "--model", str(builtin_path), "--target", "hf:cpu:fp16",
                 "--out", str(tmp_path / "o")]) == 2
    assert "made for the model" in capsys.readouterr().err
