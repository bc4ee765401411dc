"""The main job as one function: capture reference, FP32 truth, target and the implementation envelope; compare;
analyse; judge; report.

    RUN_DIR/
      run.json                                 the configuration of this run
      captures/reference|truth|target/         capture directories (see precision.capture)
      captures/envelope/<member>/              the reference re-run with each implementation variant
      comparison.json                          precision.analysis.compare + the analysis section
      report.html, summary.md, summary.json    precision.report (summary.json is written last)
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path

from precision.analysis.compare import compare_captures
from precision.analysis.envelope import DEFAULT_MAX_TOKENS, DEFAULT_MEMBERS, envelope_prompt_ids, member_name
from precision.analysis.verdict import Thresholds, Verdict, judge
from precision.backends import BackendOptions, create_backend, parse_spec
from precision.capture.reader import CaptureReader
from precision.capture.sites import CaptureSelection
from precision.capture.writer import CapturePlan, capture, capture_identity, check_finished_capture
from precision.errors import MismatchedCapturesError, PrecisionError
from precision.io import write_json_atomic
from precision.model import ModelInfo, inspect_model
from precision.outputs import claim_output_dir
from precision.planning import plan_from_prompts
from precision.prompts import DEFAULT_MAX_NEW_TOKENS, MAX_NEW_TOKENS_LIMIT

log = logging.getLogger(__name__)

DEFAULT_REFERENCE = "hf:cpu:bf16"
DEFAULT_TRUTH = "hf:cpu:fp32"
FALLBACK_TARGET = "hf:cpu:fp16"
DEFAULT_REPEATS = 3


def default_target() -> str:
    """vLLM when it is installed (the engine users deploy); otherwise transformers in FP16 on CPU."""
    return "vllm" if importlib.util.find_spec("vllm") is not None else FALLBACK_TARGET


@dataclass(frozen=True)
class RunConfig:
    prompts: Path
    out: Path
    model: Path | None = None
    target_model: Path | None = None
    """A different checkpoint for the target (a converted or quantized model); same architecture."""
    reference: str = DEFAULT_REFERENCE
    target: str | None = None
    target_variants: tuple[str, ...] = ()
    """Implementation variants or planted faults applied to a transformers target (precision.backends.variants)."""
    truth: str | None = DEFAULT_TRUTH
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    selection: CaptureSelection = field(default_factory=CaptureSelection)
    engine_args: dict = field(default_factory=dict)
    envelope: tuple[tuple[str, ...], ...] = DEFAULT_MEMBERS
    envelope_max_tokens: int = DEFAULT_MAX_TOKENS
    replay: bool = True
    repeats: int = DEFAULT_REPEATS
    trust_remote_code: bool = False
    thresholds: Thresholds = field(default_factory=Thresholds)
    metric_convention: str = "precision-check"
    """"msprobe" computes the element-wise metrics exactly as msprobe's compare does (precision.metrics.msprobe)."""
    force: bool = False
    resume: bool = False
    show_progress: bool = True
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


def capture_role(role: str, spec: str, model: ModelInfo, plan: CapturePlan, run_dir: Path, config: RunConfig, *,
                 options: BackendOptions | None = None, repeats: int = 1) -> CaptureReader:
    out = run_dir / "captures" / role
    options = options or BackendOptions(trust_remote_code=config.trust_remote_code)
    if options.max_model_len is None:
        # +1: an engine's capture pass asks for one token after the whole teacher-forced sequence
        options = BackendOptions(**{**options.__dict__, "max_model_len": min(plan.max_tokens_needed + 1, model.max_position_embeddings)})
    backend = create_backend(parse_spec(spec), model, options)
    if config.resume and (out / "manifest.json").is_file():
        reader = CaptureReader(out)
        check_finished_capture(reader, capture_identity(backend, plan, config.selection, repeats))
        log.info("reusing the finished %s capture in %s (same settings)", role, out)
        return reader
    return capture(backend, plan, out, selection=config.selection, resume=config.resume, show_progress=config.show_progress, repeats=repeats)


def _check_same_architecture(reference: ModelInfo, target: ModelInfo) -> None:
    for key in ("num_layers", "hidden_size", "vocab_size"):
        if getattr(reference, key) != getattr(target, key):
            raise MismatchedCapturesError(f"--target-model {target.path} has {key} {getattr(target, key)}, the reference model "
                                          f"{getattr(reference, key)}; the target must be the same architecture")


def validate_config(config: RunConfig) -> None:
    """Refuse settings that cannot be honoured, before any model loads."""
    if config.repeats < 1:
        raise PrecisionError(f"--repeats {config.repeats}: runs per prompt must be at least 1 (1 turns the determinism check off)")
    if not 1 <= config.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
        raise PrecisionError(f"--max-new-tokens {config.max_new_tokens}: must be between 1 and {MAX_NEW_TOKENS_LIMIT}")
    if config.metric_convention not in ("precision-check", "msprobe"):
        raise PrecisionError(f"--metric-convention {config.metric_convention!r}: use precision-check or msprobe")
    if config.envelope_max_tokens < 1:
        raise PrecisionError(f"envelope_max_tokens {config.envelope_max_tokens} must be at least 1")


def _run_record(config: RunConfig, model: ModelInfo, target_model: ModelInfo, target_spec: str, store: str | None) -> dict:
    return {
        "prompts": str(config.prompts), "model": model.path, "target_model": target_model.path, "reference": config.reference,
        "target": target_spec, "target_variants": list(config.target_variants),
        "truth": "golden store" if store else config.truth,
        "max_new_tokens": config.max_new_tokens, "selection": config.selection.to_json(), "engine_args": config.engine_args,
        "envelope": "golden store" if store else [member_name(m) for m in config.envelope], "replay": config.replay,
        "repeats": config.repeats, "metric_convention": config.metric_convention, "command": config.command,
    }


def _check_resumed_run(out: Path, record: dict) -> None:
    """A resumed run continues only the run it was: same prompts, models, backends and settings."""
    from precision.io import read_result_json

    try:
        stored = read_result_json(out / "run.json")
    except (OSError, ValueError, RecursionError) as exc:
        raise PrecisionError(f"{out} has no readable run.json ({exc}); it cannot be resumed: use --force to start over") from exc
    differing = [key for key in record if key != "command" and stored.get(key) != record[key]]
    if differing:
        raise PrecisionError(f"{out} was started with another {', '.join(differing)} ({', '.join(f'{k}: {stored.get(k)!r}' for k in differing[:3])}); "
                             "resume it with the same settings, or use --force to start over")


def _reference_store(config: RunConfig) -> str | None:
    from precision.golden import is_store

    if is_store(config.reference):
        if config.truth != DEFAULT_TRUTH:
            raise PrecisionError("--truth cannot be combined with --reference STORE: the golden store brings its own FP32 truth")
        if tuple(config.envelope) != DEFAULT_MEMBERS:
            raise PrecisionError("--envelope cannot be combined with --reference STORE: the golden store brings its own envelope")
        return config.reference
    if Path(config.reference).is_dir():
        raise PrecisionError(f"--reference {config.reference} is a directory but not a golden store (no store.json); "
                             "pass a backend spec such as hf:cpu:bf16, or a store made by 'precision-check golden create'")
    return None


def run(config: RunConfig) -> RunResult:
    from precision.golden import open_store

    validate_config(config)
    target_spec = config.target or default_target()
    store = _reference_store(config)
    for spec in (None if store else config.reference, target_spec, config.truth):
        if spec is not None:
            parse_spec(spec)  # fail on a misspelled backend before any model is loaded
    model = resolve_model(config.model)
    target_model = inspect_model(config.target_model) if config.target_model else model
    _check_same_architecture(model, target_model)
    target_options = BackendOptions(trust_remote_code=config.trust_remote_code, engine_args=config.engine_args, variants=config.target_variants)
    create_backend(parse_spec(target_spec), target_model, target_options).validate()
    plan = plan_from_prompts(config.prompts, model, max_new_tokens=config.max_new_tokens, trust_remote_code=config.trust_remote_code)
    record = _run_record(config, model, target_model, target_spec, store)
    inputs = [model.path, target_model.path, config.prompts, store]
    with claim_output_dir(config.out, "run", force=config.force, resume=config.resume, complete_marker="summary.json", inputs=inputs) as claimed:
        if claimed.resumed and (config.out / "run.json").is_file():
            _check_resumed_run(config.out, record)
        write_json_atomic(config.out / "run.json", record)
        # The CPU side comes from a golden store (checked for this model, tokenizer and prompt set) or is captured now.
        cpu = CpuSide(*open_store(store, model, plan)) if store else capture_cpu_side(model, plan, config.out, config)
        actual = capture_role("target", target_spec, target_model, cpu.following, config.out, config, options=target_options, repeats=config.repeats)
        return compare_and_report(cpu.reference, actual, cpu.truth, config.out, members=cpu.members, envelope_prompts=cpu.envelope_prompts,
                                  replay=config.replay, thresholds=config.thresholds, command=config.command, show_progress=config.show_progress,
                                  metric_convention=config.metric_convention)


@dataclass(frozen=True)
class CpuSide:
    """The reference, FP32 truth and envelope captures a target is judged against."""

    reference: CaptureReader
    truth: CaptureReader | None
    members: dict[str, CaptureReader]
    envelope_prompts: list[str]

    @property
    def following(self) -> CapturePlan:
        return CapturePlan.following(self.reference)


def capture_cpu_side(model: ModelInfo, plan: CapturePlan, out: Path, config: RunConfig) -> CpuSide:
    """Capture the reference, then the FP32 truth and the envelope fed the reference's tokens, under ``out``."""
    reference = capture_role("reference", config.reference, model, plan, out, config)
    following = CapturePlan.following(reference)
    truth = capture_role("truth", config.truth, model, following, out, config) if config.truth else None
    members, envelope_ids = capture_envelope(reference, model, following, config)
    return CpuSide(reference, truth, members, envelope_ids)


def capture_envelope(reference: CaptureReader, model: ModelInfo, following: CapturePlan, config: RunConfig) -> tuple[dict[str, CaptureReader], list[str]]:
    """The reference re-run with each envelope member, on the prompts short enough for all of them."""
    ids = envelope_prompt_ids(reference, config.envelope_max_tokens)
    if not config.envelope or not ids:
        return {}, ids
    members = {}
    for member in config.envelope:
        name = member_name(member)
        options = BackendOptions(trust_remote_code=config.trust_remote_code, variants=member)
        members[name] = capture_role(f"envelope/{name}", config.reference, model, following.subset(ids), config.out, config, options=options)
    return members, ids


def compare_and_report(expected: CaptureReader, actual: CaptureReader, truth: CaptureReader | None, out: Path, *,
                       members: dict[str, CaptureReader] | None = None, envelope_prompts: list[str] | None = None,
                       replay: bool = True, replayer=None, thresholds: Thresholds | None = None, command: str | None = None,
                       show_progress: bool = True, metric_convention: str = "precision-check") -> RunResult:
    """Compare, analyse (with ``replayer``, or a new one when ``replay``), judge and write the report into ``out``."""
    from precision.analysis.explain import build_analysis
    from precision.analysis.replay import Replayer
    from precision.report import write_report

    comparison = compare_captures(expected, actual, truth=truth, show_progress=show_progress, metric_convention=metric_convention)
    if replayer is None and replay:
        replayer = Replayer(expected.manifest["model"]["path"], expected.dtype)
    comparison["analysis"] = build_analysis(comparison, reference=expected, target=actual, members=members,
                                            envelope_prompts=envelope_prompts, replayer=replayer)
    write_json_atomic(out / "comparison.json", comparison)
    verdict = judge(comparison, thresholds)
    files = write_report(out, comparison, verdict, command=command)
    files["comparison.json"] = out / "comparison.json"
    return RunResult(out=out, verdict=verdict, comparison=comparison, files=files)
