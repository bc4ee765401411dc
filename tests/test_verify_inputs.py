"""`verify` checks a run against its own captures and the model it recorded, never against look-alikes: with
captures/ deleted it does not follow the absolute paths recorded in comparison.json, and a changed model
directory is named by its weight hashes instead of blaming comparison.json."""

from __future__ import annotations

import shutil

import pytest

from precision.cli import main


@pytest.fixture(scope="module")
def replayed_run(stories_path, short_prompts, tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    model = root / "model"
    shutil.copytree(stories_path, model)
    out = root / "run"
    assert main(["-q", "run", "--prompts", str(short_prompts), "--model", str(model), "--target", "hf:cpu:fp16", "--envelope", "none",
                 "--repeats", "1", "--max-new-tokens", "4", "--out", str(out)]) == 0
    assert main(["-q", "verify", str(out)]) == 0
    return {"root": root, "model": model, "run": out}


def test_verify_without_captures_does_not_follow_recorded_paths(replayed_run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(replayed_run["run"], copy)
    shutil.rmtree(copy / "captures")
    capsys.readouterr()
    assert main(["verify", str(copy)]) == 1
    out = capsys.readouterr().out
    assert f"{copy / 'captures' / 'reference'} is missing" in out and "verified" not in out


def test_verify_names_a_changed_model_by_its_hashes(replayed_run, tmp_path, capsys):
    bad = tmp_path / "bad"
    assert main(["plant-fault", "--model", str(replayed_run["model"]), "--layer", "1", "--factor", "1.5", "--out", str(bad)]) == 0
    original = (replayed_run["model"] / "model.safetensors").read_bytes()
    shutil.copy(bad / "model.safetensors", replayed_run["model"] / "model.safetensors")
    try:
        capsys.readouterr()
        assert main(["verify", str(replayed_run["run"])]) == 1
        out = capsys.readouterr().out
        assert "changed since the run" in out and "comparison.json" not in out
    finally:
        (replayed_run["model"] / "model.safetensors").write_bytes(original)
    assert main(["-q", "verify", str(replayed_run["run"])]) == 0


def test_verify_on_a_machine_without_the_model_checks_the_rest_and_says_what_it_skipped(replayed_run, tmp_path, capsys):
    """The README's split workflow: the run directory travels, the model does not."""
    copy = tmp_path / "run"
    shutil.copytree(replayed_run["run"], copy)
    away = replayed_run["root"] / "model-away"
    replayed_run["model"].rename(away)
    try:
        capsys.readouterr()
        assert main(["verify", str(copy)]) == 0
        out = capsys.readouterr().out
        assert "NOT CHECKED HERE: the layer replay was not recomputed" in out and "summary.json was checked" in out
        summary = copy / "summary.json"
        summary.write_text(summary.read_text().replace('"PASS"', '"FAIL"', 1))
        assert main(["verify", str(copy)]) == 1
        assert "summary.json differs" in capsys.readouterr().out
    finally:
        away.rename(replayed_run["model"])
