"""A real package: the wheel built from this source tree holds the package, its templates and prompt sets and
nothing else (no tests, no captures); installed NON-editable into a fresh virtual environment (its dependencies
borrowed from the project's .venv through a .pth file), it answers `python -m precision --help`, loads its shipped
prompt sets, runs and renders `report`, from a directory outside the checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO, SHORT_PROMPTS, write_prompts

pytestmark = pytest.mark.slow

NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "runs", ".cache", ".pytest_cache", "__pycache__", "*.egg-info",
                                    "*.pyc", "*.nbi", "*.nbc")
"""What a source tree holds beside the source: the build copies the checkout without it (and builds in the copy, so
the checkout gains no build/ directory)."""


def _run(cmd: list, cwd: Path, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd} exited {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    shutil.copytree(REPO, source, symlinks=True, ignore=NOT_SOURCE)
    # --no-build-isolation: setuptools comes from the project's environment; nothing is downloaded
    _run([sys.executable, "-m", "pip", "wheel", source, "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", root / "dist"], cwd=root)
    (built,) = (root / "dist").glob("precision_check-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    """A fresh venv with the wheel installed (not editable); torch, transformers, ... from the project's .venv."""
    root = tmp_path_factory.mktemp("fresh")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=root)
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root).stdout.strip())
    # A plain path line: the project's site-packages joins sys.path after the fresh one, and its own .pth files (the
    # editable install of this checkout among them) are not processed.
    (site / "borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n", encoding="utf-8")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel], cwd=root)
    work = root / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["HF_HUB_OFFLINE"] = "1"
    return {"venv": venv, "python": python, "site": site, "work": work, "env": env}


def test_the_wheel_holds_the_package_templates_and_prompt_sets_only(wheel):
    from precision import PROMPT_SETS

    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"precision", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}, top
    assert not [n for n in names if n.startswith("tests/") or "/tests/" in n or "captures" in n or n.endswith((".safetensors", ".pt", ".bin"))]
    templates = {p.name for p in (REPO / "precision" / "report" / "templates").iterdir()}
    assert templates >= {"report.html.j2", "report.css", "summary.md.j2", "regression.md.j2"}
    assert {f"precision/report/templates/{t}" for t in templates} <= set(names)
    prompt_sets = sorted(p.name for p in PROMPT_SETS.glob("*.jsonl"))
    assert prompt_sets and {f"precision/prompt_sets/{p}" for p in [*prompt_sets, "README.md"]} <= set(names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "precision-check = precision.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_the_installed_package_is_the_wheel_not_the_checkout(installed):
    where = _run([installed["python"], "-c", "import precision, precision.api as a; print(precision.__file__); print(a.PROMPT_SETS)"],
                 cwd=installed["work"], env=installed["env"]).stdout.split()
    assert all(Path(p).is_relative_to(installed["site"]) for p in where), where
    assert not any(Path(p).is_relative_to(REPO) for p in where)


def test_python_m_precision_and_the_script_answer_help_outside_the_checkout(installed):
    top = _run([installed["python"], "-m", "precision", "--help"], cwd=installed["work"], env=installed["env"], timeout=120).stdout
    assert top.startswith("usage: precision-check") and all(c in top for c in ("run", "capture", "compare", "report")), top
    run = _run([installed["venv"] / "bin" / "precision-check", "run", "--help"], cwd=installed["work"], env=installed["env"], timeout=120).stdout
    assert run.startswith("usage: precision-check run") and "--config RUN_TOML" in run, run


def test_the_shipped_prompt_sets_load_from_the_installed_package(installed):
    from precision import PROMPT_SETS, load_prompts

    code = "from precision import PROMPT_SETS, load_prompts; print(PROMPT_SETS); print(' '.join(p.id for p in load_prompts(PROMPT_SETS)))"
    where, ids = _run([installed["python"], "-c", code], cwd=installed["work"], env=installed["env"]).stdout.splitlines()
    assert Path(where).is_relative_to(installed["site"])
    assert ids.split() == [p.id for p in load_prompts(PROMPT_SETS)]


def test_a_run_and_its_report_render_from_the_installed_package(installed, stories_path):
    """One short prompt (the shipped sets' long prompts would make this test slow; the test above loads them)."""
    work, python, env = installed["work"], installed["python"], installed["env"]
    write_prompts(work / "one.jsonl", SHORT_PROMPTS[:1])
    _run([python, "-m", "precision", "-q", "run", "--prompts", "one.jsonl", "--model", stories_path, "--target", "hf:cpu:fp16", "--truth", "none",
          "--envelope", "none", "--no-replay", "--repeats", "1", "--max-new-tokens", "4", "--out", "run"], cwd=work, env=env)
    out = _run([python, "-m", "precision", "report", "run", "--out", "again"], cwd=work, env=env).stdout
    html = (work / "again" / "report.html").read_text(encoding="utf-8")
    summary = json.loads((work / "again" / "summary.json").read_text())
    assert summary["verdict"]["status"] in out and html.startswith("<!DOCTYPE html>") and "Once upon a time" in html
    assert "<style>" in html  # report.css inlined from the installed templates
