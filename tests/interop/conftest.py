"""Real msprobe dumps of transformers running stories260K, made by mindstudio-probe itself (a `test` extra) in a
process of its own (tests/interop/msprobe_dump_run.py), and their imports."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

DUMP_SCRIPT = Path(__file__).with_name("msprobe_dump_run.py")
MSPROBE_VERSION = "26.2.0"


def require_msprobe() -> None:
    """Skip without mindstudio-probe; found, never imported here (msprobe patches torch when it runs)."""
    if importlib.util.find_spec("msprobe") is None:
        pytest.skip(f"mindstudio-probe {MSPROBE_VERSION} is in the test extra: pip install -e '.[test]'")


def msprobe_dump(model: Path, out: Path, sequences: list[list[int]], *options: str) -> Path:
    """Run msprobe's PyTorch dump (PrecisionDebugger, L0, task tensor unless ``options`` say otherwise) of transformers
    on ``sequences`` into ``out``."""
    require_msprobe()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, str(DUMP_SCRIPT), str(model), str(out), "--ids", json.dumps(sequences), *options],
                          capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, f"the msprobe dump failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return out


@pytest.fixture(scope="session")
def forced_sequences(stories_reference) -> list[list[int]]:
    """The reference capture's teacher-forced sequences (prompt + continuation), in prompt order."""
    return [list(r.forced_ids) for r in stories_reference.prompts]


@pytest.fixture(scope="session")
def bf16_dump(stories_path, forced_sequences, tmp_path_factory) -> Path:
    """msprobe's dump of transformers BF16 on the reference's sequences: one step per prompt."""
    return msprobe_dump(stories_path, tmp_path_factory.mktemp("msprobe") / "bf16", forced_sequences, "--dtype", "bfloat16")


@pytest.fixture(scope="session")
def fp16_dump(stories_path, forced_sequences, tmp_path_factory) -> Path:
    return msprobe_dump(stories_path, tmp_path_factory.mktemp("msprobe") / "fp16", forced_sequences, "--dtype", "float16")


def import_dump(dump: Path, model: Path, out: Path, *options: str) -> Path:
    from precision.cli import main

    assert main(["-q", "import-msprobe", str(dump), "--model", str(model), "--out", str(out), *options]) == 0
    return out


@pytest.fixture(scope="session")
def imported_bf16(bf16_dump, stories_path, stories_reference, tmp_path_factory) -> Path:
    return import_dump(bf16_dump, stories_path, tmp_path_factory.mktemp("imported") / "bf16", "--teacher-forcing", str(stories_reference.path))


@pytest.fixture(scope="session")
def imported_fp16(fp16_dump, stories_path, stories_reference, tmp_path_factory) -> Path:
    return import_dump(fp16_dump, stories_path, tmp_path_factory.mktemp("imported") / "fp16", "--teacher-forcing", str(stories_reference.path))
