"""The main job as one function: capture reference, FP32 truth, target and the implementation envelope; compare;
analyse; judge; report.

    RUN_DIR/
      run.json                                 the configuration of this run
      captures/reference|truth|target/         capture directories (see precision.capture)
      captures/envelope/<member>/              the reference re-run with each implementation variant
      comparison.json                          precision.analysis.compare + the analysis section
      report.html, summary.md, summary.json    precision.report (summary.json is written last)
      serving/                                 with [serving.NAME] tables: each configuration against the target
                                               (precision.serving.run_stage)

The reference side comes from a reference source (precision.reference_side): captured now from the backends the
configuration names, or a golden store (precision.golden.GoldenStore) that the caller opens and passes in; the
pipeline never imports the golden store (precision.run opens --reference STORE for it).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path

from precision.analysis.compare import compare_captures
from precision.analysis.envelope import DEFAULT_MAX_TOKENS, DEFAULT_MEMBERS
from precision.analysis.verdict import Thresholds, Verdict, judge
from precision.backends import BackendOptions, create_backend, parse_spec
from precision.capture.reader import CaptureReader
from precision.capture.sites import CaptureSelection
from precision.errors import MismatchedCapturesError, PrecisionError
from precision.io import write_json_atomic
from precision.model import ModelInfo, inspect_model
from precision.outputs import claim_output_dir
from precision.planning import plan_from_prompts
from precision.prompts import DEFAULT_MAX_NEW_TOKENS, MAX_NEW_TOKENS_LIMIT
from precision.reference_side import (DEFAULT_REFERENCE, DEFAULT_TRUTH, CapturedReference, CaptureSettings, ReferenceSource,
                                      capture_role, resolve_model, streamed_spec)

log = logging.getLogger(__name__)

RUN_FORMAT = "precision-check-run"
RUN_SCHEMA_VERSION = 1
FALLBACK_TARGET = "hf:cpu:fp16"
DEFAULT_REPEATS = 3


def default_target() -> str:
    """vLLM when it is installed (the engine users deploy); otherwise transformers in FP16 on CPU."""
    return "vllm" if importlib.util.find_spec("vllm") is not None else FALLBACK_TARGET


@dataclass(frozen=True)
class RunConfig:
    """What ``run`` does: every setting of ``precision-check run`` (precision.run_file builds one from a run.toml and
    the flags). Only ``prompts`` and ``out`` have no default; ``target`` None means vLLM when installed, else
    transformers FP16; ``truth`` None runs without FP32 truth (no R); ``envelope`` () runs no envelope."""

    prompts: Path
    out: Path
    model: Path | None = None
    target_model: Path | None = None
    """A different checkpoint for the target (a converted or quantized model); same architecture."""
    reference: str = DEFAULT_REFERENCE
    """A backend spec; precision.run also takes a golden store's directory here (and opens it as the source)."""
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
    layer_streamed: bool = False
    """The reference, truth, envelope and replay hold one step's weights at a time (a model larger than memory)."""
    serving: dict = field(default_factory=dict)
    """[serving.NAME] tables of the run configuration file, paths resolved (precision.run_file): the serving stage's
    configurations, each the target's engine settings with the table's over them (precision.serving.run_stage).
    Recorded in run.json; a resumed run must have the same."""
    config_file: dict | None = None
    """{"path", "sha256"} of the run configuration file the settings came from (recorded in run.json), or None."""
    force: bool = False
    resume: bool = False
    show_progress: bool = True
    command: str | None = None

    @property
    def capture_settings(self) -> CaptureSettings:
        return CaptureSettings(selection=self.selection, trust_remote_code=self.trust_remote_code, resume=self.resume,
                               show_progress=self.show_progress)

    def captured_reference(self) -> CapturedReference:
        """The reference source this configuration describes when no golden store is given."""
        if self.layer_streamed:
            return CapturedReference(streamed_spec(self.reference), self.truth and streamed_spec(self.truth), self.envelope,
                                     self.envelope_max_tokens)
        return CapturedReference(self.reference, self.truth, self.envelope, self.envelope_max_tokens)


@dataclass(frozen=True)
class RunResult:
    """A judged comparison: where it was written, its verdict, comparison.json's content and the files written
    (name -> path: report.html, summary.md, summary.json, comparison.json, ...)."""

    out: Path
    verdict: Verdict
    comparison: dict
    files: dict[str, Path]
    serving: dict | None = None
    """The serving stage's parity document (precision.serving.parity) when the run had [serving.NAME] tables."""


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


def _run_record(config: RunConfig, source: ReferenceSource, model: ModelInfo, target_model: ModelInfo, target_spec: str) -> dict:
    return {
        "format": RUN_FORMAT, "schema_version": RUN_SCHEMA_VERSION,
        "prompts": str(config.prompts), "model": model.path, "target_model": target_model.path, **source.record(),
        "target": target_spec, "target_variants": list(config.target_variants),
        "max_new_tokens": config.max_new_tokens, "selection": config.selection.to_json(), "engine_args": config.engine_args,
        "replay": config.replay, "layer_streamed": config.layer_streamed, "repeats": config.repeats, "metric_convention": config.metric_convention, "command": config.command,
        "config_file": config.config_file, "serving": config.serving,
    }


_NOT_SETTINGS = {"command", "format", "schema_version", "config_file"}
"""run.json keys that say nothing about what was run: a resumed run may differ in them (one started by an older
version has no format; the settings a config file gave are compared one by one, so an edited comment is no change)."""
_ADDED_LATER = {"serving": {}}
"""Settings run.json records since a later version, with the value a run.json written before them means."""
_FIELD_NAMES = {"serving": "[serving.NAME] tables"}


def _check_resumed_run(out: Path, record: dict) -> None:
    """A resumed run continues only the run it was: same prompts, models, backends and settings."""
    from precision.io import read_result_json

    try:
        stored = read_result_json(out / "run.json")
    except (OSError, ValueError, RecursionError) as exc:
        raise PrecisionError(f"{out} has no readable run.json ({exc}); it cannot be resumed: use --force to start over") from exc
    differing = [key for key in record if key not in _NOT_SETTINGS and stored.get(key, _ADDED_LATER.get(key)) != record[key]]
    if differing:
        names = ", ".join(_FIELD_NAMES.get(k, k) for k in differing)
        was = ", ".join(f"{_FIELD_NAMES.get(k, k)}: {stored.get(k, _ADDED_LATER.get(k))!r}" for k in differing[:3])
        raise PrecisionError(f"{out} was started with other {names} ({was}); resume it with the same settings, or use --force "
                             "to start over (or another --out to keep this run)")


def _check_source(config: RunConfig, source: ReferenceSource) -> None:
    """A stored CPU side brings its own truth and envelope: settings for them would be silently ignored."""
    if source.stored_at is None:
        return
    if config.truth != DEFAULT_TRUTH:
        raise PrecisionError("--truth cannot be combined with --reference STORE: the golden store brings its own FP32 truth")
    if tuple(config.envelope) != DEFAULT_MEMBERS:
        raise PrecisionError("--envelope cannot be combined with --reference STORE: the golden store brings its own envelope")


def run(config: RunConfig, source: ReferenceSource | None = None) -> RunResult:
    """The whole job. ``source`` is where the CPU side comes from (a golden store); by default it is captured
    from the backends ``config`` names."""
    validate_config(config)
    target_spec = config.target or default_target()
    source = source or config.captured_reference()
    _check_source(config, source)
    source.check_specs()
    for spec in (target_spec, config.truth):
        if spec is not None:
            parse_spec(spec)  # fail on a misspelled backend before any model is loaded
    model = resolve_model(config.model)
    target_model = inspect_model(config.target_model) if config.target_model else model
    _check_same_architecture(model, target_model)
    target_options = BackendOptions(trust_remote_code=config.trust_remote_code, engine_args=config.engine_args, variants=config.target_variants)
    create_backend(parse_spec(target_spec), target_model, target_options).validate()
    if config.serving:
        from precision.serving.run_stage import check_stage

        check_stage(config.serving, target_spec, target_model, target_options)
    plan = plan_from_prompts(config.prompts, model, max_new_tokens=config.max_new_tokens, trust_remote_code=config.trust_remote_code)
    record = _run_record(config, source, model, target_model, target_spec)
    inputs = [model.path, target_model.path, config.prompts, source.stored_at]
    settings = config.capture_settings
    with claim_output_dir(config.out, "run", force=config.force, resume=config.resume, complete_marker="summary.json", inputs=inputs) as claimed:
        if claimed.resumed and (config.out / "run.json").is_file():
            _check_resumed_run(config.out, record)
        write_json_atomic(config.out / "run.json", record)
        cpu = source.open(model, plan, config.out, settings)
        actual = capture_role("target", target_spec, target_model, cpu.following, config.out, settings, options=target_options, repeats=config.repeats)
        serving = None
        if config.serving:  # [serving.NAME] tables: each configuration against this eager target (precision.serving)
            from precision.serving.run_stage import STAGE_DIRECTORY, run_serving_stage

            serving = run_serving_stage(config, target_model, target_options, cpu, actual, config.out / STAGE_DIRECTORY)
        return compare_and_report(cpu.reference, actual, cpu.truth, config.out, members=cpu.members, envelope_prompts=cpu.envelope_prompts,
                                  replay=config.replay, thresholds=config.thresholds, command=config.command, show_progress=config.show_progress,
                                  metric_convention=config.metric_convention, streamed=config.layer_streamed, serving=serving)


def analysed_comparison(expected: CaptureReader, actual: CaptureReader, truth: CaptureReader | None, *,
                        members: dict[str, CaptureReader] | None = None, envelope_prompts: list[str] | None = None,
                        replay: bool = True, replayer=None, show_progress: bool = True, metric_convention: str = "precision-check",
                        streamed: bool = False) -> dict:
    """comparison.json's content: the comparison with its analysis section (the layer replay with ``replayer``,
    or a new one when ``replay``, layer-streamed when ``streamed``)."""
    from precision.analysis.explain import build_analysis
    from precision.analysis.replay import Replayer

    comparison = compare_captures(expected, actual, truth=truth, show_progress=show_progress, metric_convention=metric_convention)
    if replayer is None and replay:
        replayer = Replayer(expected.manifest["model"]["path"], expected.dtype, streamed=streamed)
    comparison["analysis"] = build_analysis(comparison, reference=expected, target=actual, members=members,
                                            envelope_prompts=envelope_prompts, replayer=replayer)
    return comparison


def compare_and_report(expected: CaptureReader, actual: CaptureReader, truth: CaptureReader | None, out: Path, *,
                       members: dict[str, CaptureReader] | None = None, envelope_prompts: list[str] | None = None,
                       replay: bool = True, replayer=None, thresholds: Thresholds | None = None, command: str | None = None,
                       show_progress: bool = True, metric_convention: str = "precision-check", streamed: bool = False,
                       serving: dict | None = None) -> RunResult:
    """Compare, analyse (with ``replayer``, or a new one when ``replay``), judge and write the report into ``out``;
    ``serving``: the run's serving stage document, which the report summarizes (precision.report.serving)."""
    from precision.report import write_report

    comparison = analysed_comparison(expected, actual, truth, members=members, envelope_prompts=envelope_prompts, replay=replay,
                                     replayer=replayer, show_progress=show_progress, metric_convention=metric_convention,
                                     streamed=streamed)
    write_json_atomic(out / "comparison.json", comparison)
    verdict = judge(comparison, thresholds)
    files = write_report(out, comparison, verdict, command=command, serving=serving)
    files["comparison.json"] = out / "comparison.json"
    return RunResult(out=out, verdict=verdict, comparison=comparison, files=files, serving=serving)
