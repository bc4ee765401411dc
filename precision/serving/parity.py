"""Serving-configuration parity: each serving configuration against the eager capture baseline, on the same
teacher-forced sequences, judged by the same rules as the cross-engine comparison.

    OUT/
      run.json                         the parity settings (kind "run": outputs.py's rules for --force)
      captures/reference, truth, envelope/<member>   the CPU side (transformers BF16, FP32 truth, variants)
      captures/baseline                vLLM eager, one request at a time, whole prompt in one step: the capture backend
      captures/serving-<name>          each configuration (precision.serving.engine), at its level of detail
      captures/view-<role>-<sites>     a capture restricted to the sites a compiled configuration holds
      captures/bisect-<name>-trial<N>  the bisection's trials
      configuration-<name>/            comparison.json, report.html, summary.md/json of baseline vs configuration
    (every directory carries its own marker: precision.outputs removes each by its own kind's rules)
      summary.json, summary.md, report.html   the parity document and its "serving configurations" report

The scale (decided here, stated in the report): a configuration is compared with the eager baseline as the
baseline is with the reference, i.e. ``compare_captures(baseline, configuration, truth=FP32 truth)`` and
``judge``. So R = err(configuration, truth) / err(baseline, truth): the configuration may differ from the
baseline, but not be markedly less accurate than it (R at the logits > 1.5 FAILs); top-1 flips between them are
near-ties or real by the same near-tie bound; a relative L2 above 0.1 anywhere FAILs. The implementation
envelope (the reference re-run with legitimate implementation variants) gives the size of a difference that is
"just another correct implementation": the configuration's difference from the baseline is divided by the
largest member's difference from the reference at the same site (the envelope ratio; above envelope_warn = 2,
WARN, as for the cross-engine envelope rule). The layer replay (local error) is not run: the configuration and
the baseline are the same engine, and the replay explains a target against the reference, which the cross-engine
run already does for the baseline.

A configuration captured at the prompt-logprobs level (precision.serving.logprob_level: forced by its ``detail`` key,
or the fallback when no hook saw every position) holds no site: it is compared on the engine's top-K logprobs by
precision.serving.logprob_compare, with the same scale (R against FP32 truth, the envelope's same statistic, the
near-tie bound), and its row says why it got that level; its bisection trials are captured at that level too.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from precision.analysis.compare import compare_captures
from precision.analysis.envelope import DEFAULT_MAX_TOKENS, DEFAULT_MEMBERS
from precision.analysis.verdict import Status, Thresholds, judge, worst
from precision.backends import BackendOptions
from precision.capture.reader import CaptureReader
from precision.capture.sites import CaptureSelection
from precision.capture.writer import CapturePlan, capture
from precision.errors import PrecisionError
from precision.io import write_json_atomic
from precision.names import DETAIL_LOGITS, RELATIVE_L2
from precision.outputs import claim_output_dir
from precision.planning import plan_from_prompts
from precision.prompts import DEFAULT_MAX_NEW_TOKENS
from precision.reference_side import DEFAULT_REFERENCE, DEFAULT_TRUTH, CapturedReference, CaptureSettings, capture_role, resolve_model
from precision.serving.engine import ServingConfig
from precision.serving.invariance import site_invariance
from precision.serving.logprob_level import DETAIL_PROMPT_LOGPROBS, LogprobLevelBackend
from precision.serving.rows import LOGITS_SITES, configuration_row, first_site, level_of, served_level_of, write_comparison

log = logging.getLogger(__name__)

PARITY_FORMAT = "precision-check-parity"
PARITY_SCHEMA_VERSION = 1
BASELINE = "baseline"


@dataclass(frozen=True)
class ParityConfig:
    prompts: Path
    out: Path
    serving: tuple[ServingConfig, ...]
    model: Path | None = None
    max_new_tokens: int | None = None
    """Tokens the reference generates per prompt; None: the prompt set's own (or the default)."""
    truth: bool = True
    envelope: tuple[tuple[str, ...], ...] = DEFAULT_MEMBERS
    bisect: bool = True
    bisect_prompts: int = 1
    """Prompts each bisection trial captures (the first ones where the configuration failed): a short capture."""
    thresholds: Thresholds = field(default_factory=Thresholds)
    force: bool = False
    show_progress: bool = False
    command: str | None = None
    engine_args: dict[str, Any] = field(default_factory=dict)
    """Engine arguments of the eager baseline (e.g. vllm-ascend's additional_config); every configuration starts from
    them, its own settings over them, as ``run``'s serving stage starts from the run target's."""


@dataclass(frozen=True)
class ParityResult:
    out: Path
    status: Status
    document: dict[str, Any]

    def lines(self) -> list[str]:
        """One line per configuration and the overall status, as the parity command prints them."""
        rows = [_line(row) for row in self.document["configurations"]]
        return rows + [f"parity {self.status.value}: {self.out / 'report.html'}"]


def _line(row: dict) -> str:
    if row["level"] == DETAIL_PROMPT_LOGPROBS:
        from precision.serving.logprob_compare import TOPK_DELTA

        return (f"{row['name']}: {row['verdict']} ({row['level']}, {row['level_reason'].split(' (')[0]}; largest top-K logprob "
                f"difference {row['largest'][TOPK_DELTA]:.3g}; first layer n/a (logprobs only))")
    return (f"{row['name']}: {row['verdict']} ({row['level']}; largest difference {row['largest'][RELATIVE_L2]:.3g} at "
            f"{row['largest']['site']}; first bitwise difference {row['first_bitwise_site'] or 'none'})")


def _validate(config: ParityConfig) -> None:
    if not config.serving:
        raise PrecisionError("no serving configuration to check: give at least one --serving NAME:key=value,... or a [serving.NAME] table")
    names = [s.name for s in config.serving]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise PrecisionError(f"serving configuration name(s) {duplicated} given twice; name each configuration once")
    bad = [n for n in names if not n.replace("-", "").replace("_", "").isalnum() or n == BASELINE]
    if bad:
        raise PrecisionError(f"serving configuration name(s) {bad}: use letters, digits, '-' and '_' (and not {BASELINE!r})")


def run_parity(config: ParityConfig) -> ParityResult:
    """Baseline, every configuration, their comparisons, verdicts, bisections and the report (see module docstring)."""
    _validate(config)
    started = time.perf_counter()
    model = resolve_model(config.model)
    plan = plan_from_prompts(config.prompts, model, max_new_tokens=config.max_new_tokens or DEFAULT_MAX_NEW_TOKENS)
    options = BackendOptions(max_model_len=min(plan.max_tokens_needed + 1, model.max_position_embeddings or 1 << 30),
                             engine_args=dict(config.engine_args))
    for serving in config.serving:
        LogprobLevelBackend(model, serving, options).validate()  # unknown engine settings fail before anything runs
    settings = CaptureSettings(selection=CaptureSelection(), trust_remote_code=False, resume=False, show_progress=config.show_progress)
    out = Path(config.out)
    record = _record(config, model)
    with claim_output_dir(out, "run", force=config.force, complete_marker="summary.json", inputs=[model.path, config.prompts]):
        write_json_atomic(out / "run.json", record)
        side = CapturedReference(DEFAULT_REFERENCE, DEFAULT_TRUTH if config.truth else None, config.envelope, DEFAULT_MAX_TOKENS)
        cpu = side.open(model, plan, out, settings)
        baseline = capture_role(BASELINE, "vllm", model, cpu.following, out, settings, options=options)
        document = parity_document(config, model, options, cpu, baseline, out, started)
    return ParityResult(out=out, status=Status(document["status"]), document=document)


def parity_document(config: ParityConfig, model, options: BackendOptions, cpu, baseline: CaptureReader, out: Path,
                    started: float | None = None) -> dict:
    """Every configuration of ``config`` captured, compared with ``baseline`` and judged (bisected when it fails);
    the parity document, written with its report into ``out`` (summary.json last)."""
    from precision.serving.report import write_parity_report

    started = time.perf_counter() if started is None else started
    context = ParityContext(config, model, options, cpu, baseline, out)
    rows = [context.check(serving) for serving in config.serving]
    document = {
        "format": PARITY_FORMAT, "schema_version": PARITY_SCHEMA_VERSION, "model": model.path, "prompts": str(config.prompts),
        "baseline": {"capture": str(baseline.path), "settings": baseline.manifest["backend"].get("settings")},
        "scale": SCALE_TEXT, "status": worst(Status(r["verdict"]) for r in rows).value,
        "configurations": rows, "wall_seconds": round(time.perf_counter() - started, 1),
    }
    write_parity_report(out, document)
    write_json_atomic(out / "summary.json", document)
    return document


def check_serving_tables(tables: dict, model) -> tuple[ServingConfig, ...]:
    """A run configuration's [serving.NAME] tables as configurations, checked before any model loads."""
    configs = tuple(ServingConfig.from_mapping(name, values) for name, values in tables.items())
    _validate(ParityConfig(prompts=Path("."), out=Path("."), serving=configs))
    for serving in configs:
        LogprobLevelBackend(model, serving).validate()
    return configs


def _record(config: ParityConfig, model) -> dict:
    return {"format": PARITY_FORMAT, "schema_version": PARITY_SCHEMA_VERSION, "prompts": str(config.prompts), "model": model.path,
            "max_new_tokens": config.max_new_tokens, "truth": config.truth, "serving": [s.to_json() for s in config.serving],
            "bisect": config.bisect, "command": config.command, "engine_args": dict(config.engine_args)}


SCALE_TEXT = ("each configuration is compared with the eager baseline (vLLM, one request at a time, the whole prompt in one eager step) "
              "by the cross-engine rules, with the FP32 truth as the accuracy scale: R = err(configuration, FP32) / err(baseline, FP32), "
              "real top-1 flips by the near-tie bound, relative L2 above the gross-error limit; the envelope ratio divides the "
              "configuration's difference from the baseline by the largest difference any implementation variant of the reference "
              "makes at that site")


class ParityContext:
    """What every configuration's check shares: the CPU side, the baseline, restricted views of them."""

    def __init__(self, config: ParityConfig, model, options: BackendOptions, cpu, baseline: CaptureReader, out: Path) -> None:
        self.config, self.model, self.options, self.cpu, self.baseline, self.out = config, model, options, cpu, baseline, out
        self._views: dict[tuple[str, tuple[str, ...]], CaptureReader] = {}
        self.sequences = [list(r.forced_ids) for r in baseline.prompts]

    def view(self, role: str, capture_reader: CaptureReader | None, sites: list[str] | None) -> CaptureReader | None:
        """``capture_reader`` as is, or restricted to ``sites`` (a compiled configuration's level of detail)."""
        if capture_reader is None or sites is None:
            return capture_reader
        key = (role, tuple(sites))
        if key not in self._views:
            from precision.serving.views import restricted_capture

            self._views[key] = restricted_capture(capture_reader, sites, self.out / "captures" / f"view-{role}-{'-'.join(sites)}")
        return self._views[key]

    def capture_configuration(self, serving: ServingConfig, plan: CapturePlan, out: Path) -> CaptureReader:
        # The hook levels' backend, falling back to (or forced to) the prompt-logprobs level: a bisection trial of a
        # configuration at that level is captured at that level too.
        backend = LogprobLevelBackend(self.model, serving, self.options, companions=self.sequences)
        return capture(backend, plan, out, force=True, show_progress=self.config.show_progress)

    def compare(self, served: CaptureReader, prompt_ids: list[str] | None = None) -> tuple[dict, Any, str]:
        """The comparison of ``served`` with the baseline (restricted to the sites ``served`` holds), and its verdict;
        at the prompt-logprobs level, that level's document (precision.serving.logprob_compare)."""
        level = served_level_of(served)
        if level == DETAIL_PROMPT_LOGPROBS:
            document, verdict = self._compare_logprobs(served, prompt_ids)
            return document, verdict, level
        sites = LOGITS_SITES if level == DETAIL_LOGITS else None
        comparison = compare_captures(self.view(BASELINE, self.baseline, sites), served,
                                      truth=self.view("truth", self.cpu.truth, sites), prompt_ids=prompt_ids)
        comparison["analysis"] = self._analysis(comparison, sites, prompt_ids)
        return comparison, judge(comparison, self.config.thresholds), level

    def _compare_logprobs(self, served: CaptureReader, prompt_ids: list[str] | None) -> tuple[dict, Any]:
        from precision.serving.logprob_compare import compare_logprob_level, judge_logprob_level
        from precision.serving.logprob_level import served_logprobs

        records = [(pid, logprobs) for pid, logprobs in served_logprobs(served) if prompt_ids is None or pid in prompt_ids]
        prompts = [p for p in self.cpu.envelope_prompts if prompt_ids is None or p in prompt_ids]
        document = compare_logprob_level(self.baseline, records, top_k=served.manifest["backend"]["serving"]["prompt_logprobs_top_k"],
                                         truth=self.cpu.truth, reference=self.cpu.reference, members=self.cpu.members,
                                         envelope_prompts=prompts, target_dtype=served.dtype)
        return document, judge_logprob_level(document, self.config.thresholds)

    def _analysis(self, comparison: dict, sites: list[str] | None, prompt_ids: list[str] | None) -> dict:
        from precision.analysis.explain import build_analysis

        prompts = [p for p in self.cpu.envelope_prompts if prompt_ids is None or p in prompt_ids]
        members = {name: self.view(f"envelope-{name}", member, sites) for name, member in self.cpu.members.items()}
        reference = self.view("reference", self.cpu.reference, sites)
        analysis = build_analysis(comparison, reference=reference, target=reference, members=members or None,
                                  envelope_prompts=prompts or None, replayer=None)
        analysis["local"]["reason"] = ("parity compares one engine with itself in two configurations; the layer replay explains the "
                                       "baseline against the reference in the cross-engine run")
        return analysis

    def check(self, serving: ServingConfig) -> dict:
        served = self.capture_configuration(serving, self.cpu.following, self.out / "captures" / f"serving-{serving.name}")
        comparison, verdict, level = self.compare(served)
        if level == DETAIL_PROMPT_LOGPROBS:
            from precision.serving.logprob_level import logprob_row

            row = logprob_row(serving, served, comparison, verdict)
            if self.config.bisect and verdict.status is Status.FAIL:
                row["bisection"] = self.bisect(serving, comparison, verdict)
            return row
        destination = self.out / f"configuration-{serving.name}"
        write_comparison(destination, comparison, verdict)
        row = configuration_row(serving, served, comparison, verdict, level)
        row["invariance"] = site_invariance(self.view(BASELINE, self.baseline, LOGITS_SITES if level == DETAIL_LOGITS else None), served)
        if self.config.bisect and verdict.status is Status.FAIL:
            row["bisection"] = self.bisect(serving, comparison, verdict)
        return row

    def bisect(self, serving: ServingConfig, comparison: dict, verdict) -> dict:
        """ddmin over the configuration's engine settings (precision.serving.bisect); each trial a capture of the first
        failing prompts, judged like the configuration itself."""
        from precision.serving.bisect import BisectionError, bisect_settings, vllm_setting_dependencies

        failing = [p.id for p in verdict.prompts if p.status is Status.FAIL] or [p["id"] for p in comparison["prompts"]]
        prompt_ids = failing[: self.config.bisect_prompts]
        plan = self.cpu.following.subset(prompt_ids)
        # The configuration itself: its own capture already failed on these prompts (bisect_settings is told so and
        # runs no engine for it); recorded first, apart from the trials.
        trials: list[dict] = [{"settings": dict(serving.engine_args), "verdict": verdict.status.value, "level": level_of(comparison),
                               "first_bitwise_site": first_site(comparison, lambda s: s[RELATIVE_L2] > 0), "from": "the configuration's own run"}]

        def fails(subset: dict[str, Any]) -> bool | None:
            name = f"{serving.name}-trial{len(trials)}"
            trial = replace(serving, name=name, engine_args=dict(subset))
            try:
                served = self.capture_configuration(trial, plan, self.out / "captures" / f"bisect-{serving.name}-trial{len(trials)}")
            except PrecisionError as exc:
                trials.append({"settings": subset, "error": str(exc)})
                return None
            trial_comparison, trial_verdict, level = self.compare(served, prompt_ids)
            trials.append({"settings": subset, "verdict": trial_verdict.status.value, "level": level,
                           "first_bitwise_site": first_site(trial_comparison, lambda s: s[RELATIVE_L2] > 0)})
            return trial_verdict.status is Status.FAIL

        baseline_settings = self.baseline.manifest["backend"].get("settings") or {}
        dependencies = vllm_setting_dependencies(baseline_settings, serving.engine_args)
        try:
            result = bisect_settings(baseline_settings, serving.engine_args, fails, dependencies=dependencies, check_baseline=True,
                                     known_to_fail=True)
        except BisectionError as exc:
            return {"error": str(exc), "trials": trials}
        culprit_trial = next((t for t in trials if t["settings"] == result.responsible), None)
        return {"prompts": prompt_ids, "responsible": result.responsible, "culprit": result.culprit, "required": result.required,
                "sentence": result.describe(), "trials": trials,
                "first_bitwise_site": culprit_trial.get("first_bitwise_site") if culprit_trial else None}
