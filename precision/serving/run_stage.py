"""``run``'s serving stage: the [serving.NAME] tables of a run configuration, each checked against the run's own
vLLM target capture (precision.serving.parity does the checking).

The baseline is the run's target, so a configuration is the target's engine settings with the table's over them:
the engine arguments the run gave the target (--engine-arg, [run.engine_args], additional_config) reach every
configuration and every bisection trial, a key the table names replaces the run's value (a whole value: a table's
additional_config replaces the run's, it is not merged), and the configurations serve the target's checkpoint
(--target-model when given). The stage writes into RUN/serving/ (a directory of its own) and reuses nothing of an
earlier attempt: a resumed run captures its configurations again.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from precision.backends import BackendOptions, parse_spec
from precision.capture.reader import CaptureReader
from precision.capture.writer import CapturePlan
from precision.errors import PrecisionError
from precision.io import write_json_atomic
from precision.names import SERVING_STAGE_DIRECTORY
from precision.outputs import claim_output_dir
from precision.serving.engine import ServingBackend, ServingConfig
from precision.serving.parity import PARITY_FORMAT, PARITY_SCHEMA_VERSION, ParityConfig, check_serving_tables, parity_document

STAGE_DIRECTORY = SERVING_STAGE_DIRECTORY


def serving_configs(tables: dict[str, dict]) -> tuple[ServingConfig, ...]:
    """The run's [serving.NAME] tables as configurations, in the file's order."""
    return tuple(ServingConfig.from_mapping(name, values) for name, values in tables.items())


def stage_options(target_options: BackendOptions, plan: CapturePlan, model) -> BackendOptions:
    """The options every configuration's engine starts from: the run target's own (engine arguments, remote code),
    with the model length the target's capture was given (precision.reference_side.capture_role sizes it the same
    way: +1 for the one token asked after the whole teacher-forced sequence)."""
    if target_options.max_model_len is not None:
        return target_options
    return dataclasses.replace(target_options, max_model_len=min(plan.max_tokens_needed + 1, model.max_position_embeddings or 1 << 30))


def configuration_engine_kwargs(tables: dict[str, dict], model, options: BackendOptions, plan: CapturePlan,
                                companions: list[list[int]] | tuple = ()) -> dict[str, dict[str, Any]]:
    """name -> the LLM(...) arguments each configuration's engine gets (no engine starts): what the stage records.
    ``companions``: the teacher-forced sequences parity serves beside a sequence (a workload sizes its engine by them)."""
    return _engine_kwargs(serving_configs(tables), model, stage_options(options, plan, model), companions)


def _engine_kwargs(configs: tuple[ServingConfig, ...], model, options: BackendOptions, companions) -> dict[str, dict[str, Any]]:
    return {serving.name: ServingBackend(model, serving, options, companions=companions).engine_kwargs() for serving in configs}


def check_stage(tables: dict[str, dict], target_spec: str, model, options: BackendOptions) -> None:
    """Refuse tables the stage cannot run, before any model loads: a target other than vLLM (the baseline must be
    the eager vLLM engine), names and settings parity refuses, the run's engine arguments with a table's."""
    if parse_spec(target_spec).name != "vllm":
        raise PrecisionError(f"the [serving.NAME] tables need the vLLM target as their eager baseline, not {target_spec}: "
                             "use --target vllm or drop the [serving] tables")
    check_serving_tables(tables, model)
    for serving in serving_configs(tables):
        ServingBackend(model, serving, options).validate()


def run_serving_stage(run_config, model, target_options: BackendOptions, cpu, baseline: CaptureReader, out: Path) -> dict:
    """The parity document of ``run_config.serving`` against ``baseline`` (the run's target capture, of ``model``
    with ``target_options``), with the run's CPU side as the scale; written with its report into ``out``."""
    if baseline.manifest["backend"].get("engine") != "vllm":
        raise PrecisionError(f"the run's [serving.NAME] tables need the vLLM target as their eager baseline; this run's target is "
                             f"{baseline.manifest['backend'].get('spec')}: use --target vllm or drop the [serving] tables")
    config = ParityConfig(prompts=run_config.prompts, out=out, model=Path(model.path), max_new_tokens=run_config.max_new_tokens,
                          serving=serving_configs(run_config.serving), truth=cpu.truth is not None, envelope=run_config.envelope,
                          thresholds=run_config.thresholds, force=True, show_progress=run_config.show_progress, command=run_config.command)
    options = stage_options(target_options, cpu.following, model)
    record = {"format": PARITY_FORMAT, "schema_version": PARITY_SCHEMA_VERSION, "prompts": str(config.prompts), "model": model.path,
              "max_new_tokens": config.max_new_tokens, "truth": config.truth, "serving": [s.to_json() for s in config.serving],
              "bisect": config.bisect, "command": config.command, "baseline_capture": str(baseline.path),
              "run_engine_args": dict(target_options.engine_args),
              # parity's engines get the baseline's sequences as companions (precision.serving.parity.ParityContext)
              "engine_kwargs": _engine_kwargs(config.serving, model, options, [list(r.forced_ids) for r in baseline.prompts])}
    with claim_output_dir(out, "run", force=True, complete_marker="summary.json", inputs=[model.path, run_config.prompts]):
        write_json_atomic(out / "run.json", record)
        return parity_document(config, model, options, cpu, baseline, out)
