"""Regression gating end to end on this machine: a golden store of stories260K, the vLLM CPU build as the "new
build", a planted regression as the bad one. The gate script and gate.toml are taken out of docs/ci-gating.md and
run as written, so the page and this test cannot drift."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import xmlschema

from precision.cli import main
from tests.conftest import REPO, requires_vllm

pytestmark = [requires_vllm, pytest.mark.vllm]
SCHEMA = xmlschema.XMLSchema(str(REPO / "tests" / "data" / "junit.xsd"))
DOC = REPO / "docs" / "ci-gating.md"


def doc_block(language: str, first_line: str) -> str:
    """The fenced ``language`` block of docs/ci-gating.md that starts with ``first_line``."""
    blocks = re.findall(rf"```{language}\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    matching = [b for b in blocks if b.startswith(first_line)]
    assert len(matching) == 1, f"docs/ci-gating.md should hold one {language} block starting {first_line!r}"
    return matching[0]


@pytest.fixture(scope="module")
def store(stories_path, short_prompts, tmp_path_factory):
    out = tmp_path_factory.mktemp("gate") / "store"
    assert main(["-q", "golden", "create", "--model", str(stories_path), "--prompts", str(short_prompts), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def workspace(store, stories_path, short_prompts, tmp_path_factory) -> Path:
    """A CI workspace: gate.sh and gate.toml from the page, a checkpoint with a planted regression."""
    root = tmp_path_factory.mktemp("ci")
    (root / "gate.sh").write_text(doc_block("bash", "#!/usr/bin/env bash\n# gate.sh"), encoding="utf-8")
    (root / "gate.toml").write_text(doc_block("toml", "[thresholds]"), encoding="utf-8")
    assert main(["-q", "plant-fault", "--model", str(stories_path), "--layer", "2", "--factor", "1.01", "--out", str(root / "bad-model")]) == 0
    return root


def gate(workspace: Path, store: Path, stories_path: Path, prompts: Path, build_id: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "STORE": str(store), "MODEL": str(stories_path), "PROMPTS": str(prompts)}
    return subprocess.run(["bash", "gate.sh", build_id, "--repeats", "2", *extra], cwd=workspace, env=env,
                          capture_output=True, text=True, timeout=1800)


def pointer(workspace: Path) -> str | None:
    path = workspace / "runs" / "last-good.path"
    return path.read_text().strip() if path.exists() else None


@pytest.fixture(scope="module")
def builds(workspace, store, stories_path, short_prompts) -> dict:
    """Three builds through the recipe, in order: a first build, an identical second, a planted regression.
    Each entry: the completed process and the last-good pointer after it."""
    results = {}
    for build_id, extra in (("1", ()), ("2", ()), ("3", ("--target-model", str(workspace / "bad-model")))):
        done = gate(workspace, store, stories_path, short_prompts, build_id, *extra)
        results[build_id] = {"process": done, "pointer": pointer(workspace), "run": workspace / "runs" / f"build-{build_id}"}
    return results


@pytest.fixture(scope="module")
def baseline(builds):
    return builds["1"]["run"]


@pytest.fixture(scope="module")
def bad_build(builds):
    return builds["3"]["run"]


# --- the recipe ------------------------------------------------------------------------------------------------

def test_recipe_first_build_passes_and_becomes_last_good(builds):
    first = builds["1"]
    assert first["process"].returncode == 0, first["process"].stdout + first["process"].stderr
    assert first["pointer"] == "runs/build-1"
    assert not (first["run"] / "regression.json").exists()  # nothing to compare the first build with


def test_recipe_identical_second_build_passes_the_regression_gate_against_the_first(builds, workspace):
    second = builds["2"]
    assert second["process"].returncode == 0, second["process"].stdout + second["process"].stderr
    assert second["pointer"] == "runs/build-2"
    result = json.loads((second["run"] / "regression.json").read_text())
    assert result["status"] == "PASS"
    assert result["baseline"]["run"] == str((workspace / "runs" / "build-1").resolve())
    assert result["candidate"]["run"] == str(second["run"].resolve())
    SCHEMA.validate(str(workspace / "runs" / "build-2.regress.xml"))


def test_recipe_planted_regression_exits_1_and_keeps_last_good(builds, workspace):
    bad = builds["3"]
    assert bad["process"].returncode == 1, bad["process"].stdout + bad["process"].stderr
    assert bad["pointer"] == "runs/build-2"
    result = json.loads((bad["run"] / "regression.json").read_text())
    assert result["status"] == "FAIL"
    assert result["baseline"]["run"] == str((workspace / "runs" / "build-2").resolve())
    assert result["candidate"]["run"] == str(bad["run"].resolve())
    assert result["first_worse_scope"] == "layer.2"
    assert "last good stays runs/build-2" in bad["process"].stdout


# --- the store and regress on real vLLM runs ---------------------------------------------------------------------

def test_store_is_intact_and_compact_form_small(store, capsys):
    assert main(["golden", "verify", str(store)]) == 0
    manifest = json.loads((store / "store.json").read_text())
    assert manifest["compact"]["bytes"] < 1024 * 1024
    assert "intact" in capsys.readouterr().out


def test_store_detects_a_changed_file(store, stories_path, short_prompts, tmp_path, capsys):
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    tensor = copy / "captures" / "truth" / "tensors" / "0000.safetensors"
    data = bytearray(tensor.read_bytes())
    data[-10] ^= 0x40
    tensor.write_bytes(bytes(data))
    assert main(["golden", "verify", str(copy)]) == 1
    assert "0000.safetensors" in capsys.readouterr().out
    # A run against the edited store is refused before anything is captured: open_store checks every hash.
    out = tmp_path / "run"
    assert main(["-q", "run", "--prompts", str(short_prompts), "--model", str(stories_path), "--reference", str(copy), "--target", "hf:cpu:bf16",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "does not match its recorded hashes" in err and "0000.safetensors" in err
    assert not (out / "captures").exists()


def test_the_run_used_the_store_not_a_new_reference(baseline, store):
    comparison = json.loads((baseline / "comparison.json").read_text())
    assert comparison["expected"]["path"] == str((store / "captures" / "reference").resolve())
    run = json.loads((baseline / "run.json").read_text())
    assert (run["format"], run["reference"], run["truth"], run["envelope"]) == ("precision-check-run", str(store), "golden store", "golden store")
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
    # the layers before the planted one are bit-identical builds: not worse
    assert not any(r["worse"] for r in result["rows"] if r["site"] in ("embed", "layer.0", "layer.1"))
    SCHEMA.validate(str(junit))
    assert 'failures="0"' not in junit.read_text()


def test_run_junit_validates_against_the_schema(baseline):
    junit = baseline.parent / "build-1.candidate.xml"
    SCHEMA.validate(str(junit))
    text = junit.read_text()
    assert 'classname="prompt.story"' in text and 'name="explained"' in text


def test_runs_against_different_references_exit_2(baseline, stories_path, short_prompts, tmp_path, capsys):
    other = tmp_path / "other"
    assert main(["-q", "run", "--prompts", str(short_prompts), "--model", str(stories_path), "--target", "hf:cpu:fp16", "--envelope", "none",
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


def test_store_for_another_model_is_refused(store, builtin_path, short_prompts, tmp_path, capsys):
    assert main(["run", "--prompts", str(short_prompts), "--reference", str(store), "--model", str(builtin_path), "--target", "hf:cpu:fp16",
                 "--out", str(tmp_path / "o")]) == 2
    assert "made for the model" in capsys.readouterr().err
