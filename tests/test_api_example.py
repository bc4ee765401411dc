"""examples/api_example.py runs on stories260K, and its two ways of doing the job agree number for number."""

from __future__ import annotations

import importlib.util
import json

from tests.conftest import REPO


def _example():
    spec = importlib.util.spec_from_file_location("api_example", REPO / "examples" / "api_example.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_api_example_runs_and_both_ways_give_the_same_numbers(stories_path, tmp_path, capsys):
    outcome = _example().main(stories_path, tmp_path / "work")
    printed = capsys.readouterr().out
    run, steps = outcome["run"], outcome["step_by_step"]
    assert outcome["problems"] == []
    assert f"run: {run.verdict.summary}" in printed and "verify: verified" in printed
    assert run.verdict.status == steps.verdict.status
    for result in (run, steps):
        assert result.files["report.html"].is_file() and result.files["summary.json"].is_file()
    # Same model, prompt, backends and settings, deterministic CPU backends: the same captures, the same metrics.
    sites = [{s["site"]: s["relative_l2"] for s in json.loads(r.files["summary.json"].read_text())["sites"]} for r in (run, steps)]
    assert sites[0] == sites[1] and sites[0]["logits"] > 0
