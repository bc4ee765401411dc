"""precision-check: measure, explain and report the numerical differences between a trusted reference and an
accelerator inference engine for large language models.

The Python API mirrors the CLI:
    from precision import RunConfig, run                       # the whole job
    from precision import capture, CapturePlan, CaptureReader  # capture / read capture directories
    from precision import compare_captures, judge, write_report
Heavy modules (torch, transformers, vllm) load only when these names are first used.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "RunConfig": "precision.pipeline",
    "run": "precision.pipeline",
    "capture": "precision.capture.writer",
    "CapturePlan": "precision.capture.writer",
    "CaptureReader": "precision.capture.reader",
    "CaptureSelection": "precision.capture.sites",
    "compare_captures": "precision.analysis.compare",
    "judge": "precision.analysis.verdict",
    "Thresholds": "precision.analysis.verdict",
    "write_report": "precision.report",
    "create_backend": "precision.backends",
    "inspect_model": "precision.model",
    "load_prompts": "precision.prompts",
    "PrecisionError": "precision.errors",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'precision' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
