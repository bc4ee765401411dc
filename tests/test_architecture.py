"""The import rules of docs/architecture.md, checked on the source of every module of precision/ (imports at module
level and inside functions alike), and a test of the checker: a forbidden import planted in a synthetic package
must be reported."""

from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

import precision

PACKAGE_ROOT = Path(precision.__file__).resolve().parent
MODEL_RUNNERS = ("torch", "transformers", "vllm", "vllm_ascend", "torch_npu", "precision.backends", "precision.analysis.replay")


@dataclass(frozen=True)
class Rule:
    importer: str
    """Modules the rule binds: this module and everything under it."""
    forbidden: tuple[str, ...]
    """Modules (and everything under them) it must never import."""
    why: str


RULES = (
    Rule("precision.metrics", ("precision.backends", "precision.analysis", "precision.report", "precision.capture.writer",
                               "precision.pipeline", "precision.reference_side", "precision.golden", "precision.api", "vllm"),
         "metrics are pure functions of arrays: they never run an engine, analyse, render or write captures"),
    Rule("precision.capture", ("precision.analysis", "precision.report", "precision.pipeline", "precision.reference_side",
                               "precision.golden", "precision.api", "precision.selftest", "precision.verify"),
         "capture records what a backend computed and knows nothing of how it is judged"),
    Rule("precision.report", MODEL_RUNNERS + ("precision.pipeline", "precision.reference_side", "precision.golden", "precision.api",
                                              "precision.capture.writer"),
         "reports render measurements; they never run a model or capture"),
    Rule("precision.analysis", ("precision.report", "precision.pipeline", "precision.reference_side", "precision.golden", "precision.api",
                                "precision.selftest"),
         "analysis measures and judges; rendering and orchestration sit above it"),
    Rule("precision.backends", ("precision.analysis", "precision.report", "precision.pipeline", "precision.reference_side",
                                "precision.golden", "precision.api"),
         "backends run an engine and hand back tensors; they do not judge them"),
    Rule("precision.golden", ("precision.pipeline", "precision.api", "precision.selftest"),
         "a golden store is a reference source the pipeline receives, not something that drives the pipeline"),
    Rule("precision.reference_side", ("precision.pipeline", "precision.golden", "precision.api"),
         "the reference side is below the pipeline and the store (both use it)"),
    Rule("precision.pipeline", ("precision.golden", "precision.api", "precision.selftest"),
         "the pipeline receives its reference source; it does not know the golden store"),
    Rule("precision.serving", ("precision.pipeline", "precision.golden", "precision.api", "precision.selftest"),
         "serving parity is a stage the pipeline calls with the run's CPU side; it never drives a run"),
    Rule("precision.interop", ("precision.backends", "precision.reference_side", "precision.pipeline", "precision.golden", "precision.api",
                               "precision.selftest", "vllm", "transformers"),
         "interop translates other tools' files into captures and comparisons into their files; it runs no engine"),
    Rule("precision.canary", MODEL_RUNNERS + ("precision.pipeline", "precision.reference_side", "precision.api"),
         "the canary asks a running server; it never loads or runs a model itself"),
    Rule("precision.doctor", ("precision.analysis", "precision.report", "precision.capture", "precision.pipeline", "precision.golden",
                              "precision.api"),
         "doctor inspects the host and an engine's preflight; it captures and judges nothing"),
    Rule("precision.names", ("precision",), "names is the bottom of the package: it imports nothing of it"),
    Rule("precision.errors", ("precision",), "errors is the bottom of the package: it imports nothing of it"),
)
CLI = "precision.cli"
"""Only the CLI knows exit codes: nothing outside it imports it (precision.__main__ starts it)."""
CLI_STARTERS = ("precision.__main__", CLI)
SCRIPTS = {"precision.contract.publish": "the maintainer's schema publisher, run as python -m; its failures are not verdicts"}
"""Modules besides the CLI that may end the process, and why."""
KNOWN_CYCLES = {
    frozenset({"precision.backends", "precision.capture"}):
        "backends import capture.sites/capture.tensorfile while capture.writer imports backends.base; fixed when the "
        "backends take site names from precision.names and tensorfile moves beside the safetensors reader",
}
"""Cycles that exist today, each with the change that removes it. The test fails on any other cycle, and on a listed
one that is gone (so that the list cannot outlive the cycle)."""


def module_name(path: Path, root: Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([target] if target else []))


def imports_of(source: str, module: str, *, is_package: bool = False, exports: dict[str, str] | None = None,
               submodules: set[str] = frozenset()) -> list[tuple[str, int]]:
    """(imported module, line) for every import in ``source``, at any depth (inside functions, conditions,
    TYPE_CHECKING blocks). ``from P import name`` counts as importing P.name when that is a module, and a public
    name of the package (``exports``: name -> defining module) as importing the module that defines it."""
    found = []
    package = module.split(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_relative(module, is_package, node.level, node.module) if node.level else node.module
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                if candidate in submodules:
                    found.append((candidate, node.lineno))
                elif base == package and exports and alias.name in exports:
                    found.append((exports[alias.name].partition(":")[0], node.lineno))
                else:
                    found.append((base, node.lineno))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.args[0].value, node.lineno))
    return found


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def package_imports(root: Path, package: str, exports: dict[str, str] | None = None) -> dict[str, list[tuple[str, int]]]:
    paths = sorted(root.rglob("*.py"))
    submodules = {module_name(p, root, package) for p in paths}
    return {module_name(p, root, package): imports_of(p.read_text(encoding="utf-8"), module_name(p, root, package),
                                                      is_package=p.name == "__init__.py", exports=exports, submodules=submodules)
            for p in paths}


def rule_violations(graph: dict[str, list[tuple[str, int]]], rules=RULES, cli: str = CLI,
                    cli_starters: tuple[str, ...] = CLI_STARTERS) -> list[str]:
    problems = []
    for module, imported in graph.items():
        for name, line in imported:
            for rule in rules:
                if _under(module, rule.importer) and any(_under(name, f) for f in rule.forbidden) and not _under(name, rule.importer):
                    problems.append(f"{module}:{line} imports {name}: {rule.why}")
            if _under(name, cli) and not any(_under(module, s) for s in cli_starters):
                problems.append(f"{module}:{line} imports {name}: only the CLI knows exit codes, nothing else imports it")
    return problems


def unit_of(module: str, package: str) -> str | None:
    """The top-level module or subpackage a module belongs to (precision.capture.reader -> precision.capture);
    None for the package itself, whose public names are resolved to their modules."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == package and len(parts) > 1 else None


def import_cycles(graph: dict[str, list[tuple[str, int]]], package: str) -> list[list[str]]:
    """Cycles between the top-level modules and subpackages of ``package`` (each cycle once, smallest first)."""
    edges: dict[str, set[str]] = {}
    for module, imported in graph.items():
        source = unit_of(module, package)
        if source is None:
            continue
        for name, _ in imported:
            target = unit_of(name, package)
            if target is not None and target != source:
                edges.setdefault(source, set()).add(target)
    cycles, seen = [], set()
    for start in sorted(edges):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in sorted(edges.get(node, ())):
                if nxt == start:
                    key = frozenset(path)
                    if key not in seen:
                        seen.add(key)
                        cycles.append(path + [start])
                elif nxt not in path and nxt > start:
                    stack.append((nxt, path + [nxt]))
    return sorted(cycles, key=len)


def exit_calls(source: str) -> list[int]:
    """Lines that end the process (sys.exit, os._exit, exit(), quit(), raise SystemExit): only the CLI may."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            func = node.func
            if (isinstance(func, ast.Attribute) and func.attr in ("exit", "_exit") and isinstance(func.value, ast.Name)
                    and func.value.id in ("sys", "os")) or (isinstance(func, ast.Name) and func.id in ("exit", "quit")):
                lines.append(node.lineno)
        elif isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, ast.Name) and exc.id == "SystemExit":
                lines.append(node.lineno)
    return lines


@pytest.fixture(scope="module")
def graph():
    return package_imports(PACKAGE_ROOT, "precision", exports=precision._EXPORTS)


def test_every_import_rule_holds(graph):
    assert rule_violations(graph) == []


def test_no_import_cycle_between_top_level_modules(graph):
    found = {frozenset(cycle) for cycle in import_cycles(graph, "precision")}
    assert found - set(KNOWN_CYCLES) == set(), "a new import cycle"
    assert set(KNOWN_CYCLES) - found == set(), "a listed cycle is gone: remove it from KNOWN_CYCLES"


def test_golden_and_pipeline_do_not_import_each_other(graph):
    golden = {name for name, _ in graph["precision.golden"]}
    pipeline = {name for name, _ in graph["precision.pipeline"]}
    assert not any(_under(name, "precision.pipeline") for name in golden)
    assert not any(_under(name, "precision.golden") for name in pipeline)


def test_only_the_cli_ends_the_process():
    offenders = []
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        name = module_name(path, PACKAGE_ROOT, "precision")
        if not any(_under(name, s) for s in CLI_STARTERS) and name not in SCRIPTS:
            offenders += [f"{name}:{line}" for line in exit_calls(path.read_text(encoding="utf-8"))]
    assert offenders == []


def test_cli_talks_only_to_the_public_api(graph):
    """Every command is parse -> one call into ``precision`` (its exports) -> print: the CLI imports nothing of the
    package but the public names, its own modules and the error type."""
    public = {module.partition(":")[0] for module in precision._EXPORTS.values()}
    allowed = public | {"precision.errors"}
    for module, imported in graph.items():
        if _under(module, CLI):
            inner = [n for n, _ in imported if _under(n, "precision") and not _under(n, CLI)]
            assert set(inner) <= allowed, (module, set(inner) - allowed)


def test_selftest_uses_only_the_public_api(graph):
    """No pipeline internals: the package's own modules it imports are the public API's and the shared ground
    (names, errors, io, outputs)."""
    public = {module.partition(":")[0] for module in precision._EXPORTS.values()}
    ground = {"precision.names", "precision.errors", "precision.io", "precision.outputs"}
    reached = {n for n, _ in graph["precision.selftest"] if _under(n, "precision")}
    assert reached <= public | ground, reached - public - ground
    source = (PACKAGE_ROOT / "selftest.py").read_text(encoding="utf-8")
    assert "RunConfig" not in source and "pipeline." not in source


# --- the checker, checked: planted forbidden imports must be reported -------------------------------------------

def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "precision"
    for relative, text in {"__init__.py": "", **files}.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return root


CLEAN = {
    "metrics/__init__.py": "",
    "metrics/tensor.py": "import numpy\nfrom precision.names import RELATIVE_L2\n",
    "names.py": "",
    "backends/__init__.py": "from precision.metrics import tensor\n",
    "cli/__init__.py": "from precision.errors import PrecisionError\n",
    "errors.py": "",
}


def test_checker_passes_a_clean_synthetic_package(tmp_path):
    graph = package_imports(_package(tmp_path, CLEAN), "precision")
    assert rule_violations(graph) == [] and import_cycles(graph, "precision") == []


@pytest.mark.parametrize("module, source, expected", [
    ("metrics/tensor.py", "from precision.backends import create_backend\n", "precision.metrics.tensor:1 imports precision.backends"),
    # An import inside a function counts as much as one at the top.
    ("metrics/tensor.py", "def f():\n    from precision.analysis import verdict\n", "precision.metrics.tensor:2 imports precision.analysis"),
    # A relative import is resolved: from the metrics package, ..backends is precision.backends.
    ("metrics/tensor.py", "from ..backends import base\n", "imports precision.backends"),
    ("capture/reader.py", "import precision.analysis.compare\n", "precision.capture.reader:1 imports precision.analysis.compare"),
    ("report/view.py", "def f():\n    import torch\n", "precision.report.view:2 imports torch"),
    ("report/view.py", "import importlib\nimportlib.import_module('vllm')\n", "precision.report.view:2 imports vllm"),
    ("golden.py", "def f():\n    from precision.pipeline import run\n", "precision.golden:2 imports precision.pipeline"),
    ("verify.py", "from precision.cli.parser import EXIT_OK\n", "precision.verify:1 imports precision.cli.parser: only the CLI"),
])
def test_checker_reports_a_planted_forbidden_import(tmp_path, module, source, expected):
    root = _package(tmp_path, {**CLEAN, "capture/__init__.py": "", "report/__init__.py": "", module: source})
    problems = rule_violations(package_imports(root, "precision"))
    assert any(expected in p for p in problems), problems


def test_checker_sees_through_the_public_api(tmp_path):
    """``from precision import X`` is an import of the module that defines X."""
    root = _package(tmp_path, {**CLEAN, "metrics/tensor.py": "from precision import create_backend\n"})
    graph = package_imports(root, "precision", exports={"create_backend": "precision.backends"})
    assert any("imports precision.backends" in p for p in rule_violations(graph))


def test_checker_reports_a_planted_cycle(tmp_path):
    root = _package(tmp_path, {"golden.py": "from precision.pipeline import run\n",
                               "pipeline.py": "def run():\n    from precision.golden import open_store\n"})
    assert import_cycles(package_imports(root, "precision"), "precision") == [["precision.golden", "precision.pipeline", "precision.golden"]]


def test_checker_finds_process_exits_outside_the_cli():
    assert exit_calls("import sys\ndef f():\n    sys.exit(1)\n") == [3]
    assert exit_calls("def f():\n    raise SystemExit(2)\n") == [2]
    assert exit_calls("def f():\n    return 1\n") == []


def test_a_forbidden_import_planted_in_a_copy_of_the_real_package_is_reported(tmp_path):
    import shutil

    copy = tmp_path / "precision"
    shutil.copytree(PACKAGE_ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = rule_violations(package_imports(copy, "precision", exports=precision._EXPORTS))
    tensor = copy / "metrics" / "tensor.py"
    tensor.write_text(tensor.read_text(encoding="utf-8") + "\n\ndef _planted():\n    from precision import create_backend\n", encoding="utf-8")
    after = rule_violations(package_imports(copy, "precision", exports=precision._EXPORTS))
    assert before == [] and len(after) == 1 and "precision.metrics.tensor" in after[0] and "precision.backends" in after[0]


def test_every_public_name_is_what_it_says_even_after_every_module_is_loaded():
    """A public name equal to a submodule's name is shadowed by the submodule (``from precision import capture``
    gave the capture package, not the function, which is why the function is exported as write_capture)."""
    import importlib

    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        name = module_name(path, PACKAGE_ROOT, "precision")
        if name not in ("precision.__main__", "precision.contract.publish") and "vllm" not in name:
            importlib.import_module(name)
    shadowed = set()
    for public, target in precision._EXPORTS.items():
        module, _, attribute = target.partition(":")
        if getattr(precision, public) is not getattr(importlib.import_module(module), attribute or public):
            shadowed.add(public)
    assert shadowed == set()
