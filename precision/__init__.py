"""precision-check: measure, explain and report the numerical differences between a trusted reference and an
accelerator inference engine for large language models.

The Python API mirrors the CLI (one function per command; the CLI only parses, calls one and prints):
    from precision import RunConfig, run                       # the whole job (--reference may be a golden store)
    from precision import load_run_config, PROMPT_SETS         # a run.toml as a RunConfig; the shipped prompt sets
    from precision import capture_backend, compare, render_report, regress, verify_run, self_test, plant_fault
    from precision import create_store, verify_store           # golden stores
    from precision import import_msprobe, export_msprobe       # msprobe dumps in, msprobe compare CSV out
    from precision import run_canary                           # a served model's prompt logprobs against a golden store
    from precision import ParityConfig, run_parity             # serving configurations against the eager engine
    from precision import doctor_report, doctor_lines          # what can run on this host; an engine's preflight
Building blocks, for jobs of your own:
    from precision import write_capture, CapturePlan, CaptureReader  # capture / read capture directories
    from precision import compare_captures, judge, write_report, compare_and_report
    from precision import resolve_model, plan_from_prompts, CaptureSettings, capture_role, CapturedReference
Heavy modules (torch, transformers, vllm) load only when these names are first used. docs/api.md documents each
function (signature, returns, raises); examples/api_example.py runs a job both ways.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    # The commands.
    "RunConfig": "precision.pipeline",
    "RunResult": "precision.pipeline",
    "run": "precision.api",
    "capture_backend": "precision.api",
    "merge_captures": "precision.api",
    "compare": "precision.api",
    "render_report": "precision.api",
    "regress": "precision.api",
    "Regression": "precision.api",
    "self_test": "precision.api",
    "Selftest": "precision.api",
    "DEFAULT_SELFTEST_PROMPTS": "precision.api",
    "PROMPT_SETS": "precision.api",
    "load_run_config": "precision.run_file",
    "read_run_file": "precision.run_file",
    "plant_fault": "precision.api",
    "import_msprobe": "precision.interop.msprobe_import",
    "export_msprobe": "precision.interop.msprobe_export:export_comparison",
    "run_canary": "precision.canary",
    "doctor_report": "precision.doctor:doctor",
    "doctor_lines": "precision.doctor",
    "read_toml": "precision.config",
    "run_parity": "precision.serving.parity",
    "ParityConfig": "precision.serving.parity",
    "serving_configurations": "precision.serving.config",
    "verify_run": "precision.verify",
    "create_store": "precision.golden",
    "verify_store": "precision.golden",
    "GoldenStore": "precision.golden",
    # Building blocks.
    "write_capture": "precision.capture.writer:capture",
    "CapturePlan": "precision.capture.writer",
    "CaptureReader": "precision.capture.reader",
    "CaptureSelection": "precision.capture.sites",
    "CaptureSettings": "precision.reference_side",
    "CapturedReference": "precision.reference_side",
    "CpuSide": "precision.reference_side",
    "capture_role": "precision.reference_side",
    "resolve_model": "precision.reference_side",
    "plan_from_prompts": "precision.planning",
    "Replayer": "precision.analysis.replay",
    "compare_captures": "precision.analysis.compare",
    "analysed_comparison": "precision.pipeline",
    "compare_and_report": "precision.pipeline",
    "judge": "precision.analysis.verdict",
    "Thresholds": "precision.analysis.verdict",
    "Status": "precision.analysis.verdict",
    "Verdict": "precision.analysis.verdict",
    "RegressTolerance": "precision.analysis.regress",
    "DEFAULT_ENVELOPE": "precision.analysis.envelope:DEFAULT_MEMBERS",
    "SELFTEST_SWEEPS": "precision.selftest:SWEEPS",
    "write_report": "precision.report",
    "create_backend": "precision.backends",
    "BackendOptions": "precision.backends",
    "inspect_model": "precision.model",
    "load_prompts": "precision.prompts",
    "PrecisionError": "precision.errors",
}
"""Public name -> the module that defines it ("module:name" where the module calls it otherwise). A public name
never equals a submodule's name: once imported, ``precision.capture`` (the package) would shadow a function
exported as ``capture`` (importing precision.capture.writer sets ``precision.capture`` to the package, so
``from precision import capture`` never gave the function), which is why capture.writer.capture is exported as
``write_capture``."""


def __getattr__(name: str):
    if name in _EXPORTS:
        module, _, attribute = _EXPORTS[name].partition(":")
        return getattr(importlib.import_module(module), attribute or name)
    raise AttributeError(f"module 'precision' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
