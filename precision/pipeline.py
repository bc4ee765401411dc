"""The main job as one function: capture reference (+ FP32 truth) and target, compare, judge, report.

    RUN_DIR/
      run.json                      the configuration of this run
      captures/reference|truth|target/   capture directories (see precision.capture)
      comparison.json               precision.analysis.compare
      report.html, summary.md, summary.json   precision.report (summary.json is written last)
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path

from precision.analysis.compare import compare_captures
from precision.analysis.verdict import Thresholds, Verdict, judge
from precision.backends import BackendOptions, create_backend, parse_spec
from precision.capture.reader import CaptureReader
from precision.capture.sites import CaptureSelection
from precision.capture.writer import CapturePlan, capture
from precision.io import prepare_output_dir, write_json_atomic
from precision.model import ModelInfo, inspect_model
from precision.planning import plan_from_prompts
from precision.prompts import DEFAULT_MAX_NEW_TOKENS

log = logging.getLogger(__name__)

DEFAULT_REFERENCE = "hf:cpu:bf16"
DEFAULT_TRUTH = "hf:cpu:fp32"
FALLBACK_TARGET = "hf:cpu:fp16"


def default_target() -> str:
    """vLLM when it is installed (the engine users deploy); otherwise transformers in FP16 on CPU."""
    return "vllm" if importlib.util.find_spec("vllm") is not None else FALLBACK_TARGET


@dataclass(frozen=True)
class RunConfig:
    prompts: Path
    out: Path
    model: Path | None = None
    reference: str = DEFAULT_REFERENCE
    target: str | None = None
    truth: str | None = DEFAULT_TRUTH
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    selection: CaptureSelection = field(default_factory=CaptureSelection)
    engine_args: dict = field(default_factory=dict)
    trust_remote_code: bool = False
    thresholds: Thresholds = field(default_factory=Thresholds)
    force: bool = False
    resume: bool = False
    command: str | None = None


@dataclass(frozen=True)
class RunResult:
    out: Path
    verdict: Verdict
    comparison: dict
    files: dict[str, Path]


def resolve_model(model: Path | None) -> ModelInfo:
    if model is None:
        from precision.default_model import default_model_path

        model = default_model_path()
    return inspect_model(model)


def capture_role(role: str, spec: str, model: ModelInfo, plan: CapturePlan, run_dir: Path, config: RunConfig) -> CaptureReader:
    out = run_dir / "captures" / role
    if config.resume and (out / "manifest.json").is_file():
        log.info("reusing the finished %s capture in %s", role, out)
        return CaptureReader(out)
    options = BackendOptions(trust_remote_code=config.trust_remote_code, engine_args=config.engine_args if role == "target" else {})
    backend = create_backend(parse_spec(spec), model, options)
    return capture(backend, plan, out, selection=config.selection, resume=config.resume)


def run(config: RunConfig) -> RunResult:
    target = config.target or default_target()
    for spec in (config.reference, target, config.truth):
        if spec is not None:
            parse_spec(spec)  # fail on a misspelled backend before any model is loaded
    model = resolve_model(config.model)
    plan = plan_from_prompts(config.prompts, model, max_new_tokens=config.max_new_tokens, trust_remote_code=config.trust_remote_code)
    prepare_output_dir(config.out, force=config.force, complete_marker="summary.json", resume=config.resume)
    write_json_atomic(config.out / "run.json", {
        "prompts": str(config.prompts), "model": model.path, "reference": config.reference, "target": target,
        "truth": config.truth, "max_new_tokens": config.max_new_tokens, "selection": config.selection.to_json(),
        "engine_args": config.engine_args, "command": config.command,
    })
    reference = capture_role("reference", config.reference, model, plan, config.out, config)
    following = CapturePlan.following(reference)
    truth = capture_role("truth", config.truth, model, following, config.out, config) if config.truth else None
    actual = capture_role("target", target, model, following, config.out, config)
    return compare_and_report(reference, actual, truth, config.out, thresholds=config.thresholds, command=config.command)


def compare_and_report(expected: CaptureReader, actual: CaptureReader, truth: CaptureReader | None, out: Path, *,
                       thresholds: Thresholds | None = None, command: str | None = None) -> RunResult:
    from precision.report import write_report

    comparison = compare_captures(expected, actual, truth=truth, show_progress=True)
    write_json_atomic(out / "comparison.json", comparison)
    verdict = judge(comparison, thresholds)
    files = write_report(out, comparison, verdict, command=command)
    files["comparison.json"] = out / "comparison.json"
    return RunResult(out=out, verdict=verdict, comparison=comparison, files=files)
