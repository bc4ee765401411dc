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


DOCUMENTED = ("run", "RunConfig", "load_run_config", "capture_backend", "merge_captures", "compare", "render_report", "regress",
              "verify_run", "create_store", "verify_store", "self_test", "plant_fault")
"""docs/api.md's headed functions: the commands the README and precision's docstring list."""


def test_docs_api_md_gives_every_command_function_with_its_real_parameters():
    import inspect
    import re

    import precision

    doc = (REPO / "docs" / "api.md").read_text(encoding="utf-8")
    headings = {m.group(1): m.group(2) for m in re.finditer(r"^### `(\w+)\((.*?)\)(?: -> [^`]+)?`$", doc, re.MULTILINE)}
    assert set(headings) == set(DOCUMENTED), set(headings) ^ set(DOCUMENTED)
    for name, params in headings.items():
        documented = [p.split("=")[0].strip(" *") for p in params.split(",") if p.strip(" *")]
        real = [p.name for p in inspect.signature(getattr(precision, name)).parameters.values()]
        assert documented == real, (name, documented, real)
        assert inspect.getdoc(getattr(precision, name)), f"{name} has no docstring"
    for name in DOCUMENTED:  # every documented name is exported, and precision's own docstring points here
        assert name in precision.__all__
    assert "docs/api.md" in precision.__doc__
