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
from precision.capture.sites import CaptureSelection, layer_index, site_order
from precision.capture.writer import CapturePlan, capture
from precision.errors import PrecisionError
from precision.io import write_json_atomic
from precision.names import DETAIL_LAYERS, DETAIL_LOGITS, FINAL_NORM, FIRST_DIVERGENCE, LOGITS, NEAR_TIE, RELATIVE_L2
from precision.outputs import claim_output_dir
from precision.planning import plan_from_prompts
from precision.prompts import DEFAULT_MAX_NEW_TOKENS
from precision.reference_side import DEFAULT_REFERENCE, DEFAULT_TRUTH, CapturedReference, CaptureSettings, capture_role, resolve_model
from precision.serving.engine import ServingConfig
from precision.serving import preemption
from precision.serving.invariance import site_invariance
from precision.serving.logprob_level import DETAIL_PROMPT_LOGPROBS, LogprobLevelBackend, served_level

log = logging.getLogger(__name__)

PARITY_FORMAT = "precision-check-parity"
PARITY_SCHEMA_VERSION = 1
BASELINE = "baseline"
LOGITS_SITES = [FINAL_NORM, LOGITS]
"""What a configuration whose model body ran as a compiled graph is compared on."""


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
    context = _Context(config, model, options, cpu, baseline, out)
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


class _Context:
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
        level = _level(served)
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
        _write_comparison(destination, comparison, verdict)
        row = _row(serving, served, comparison, verdict, level)
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
        trials: list[dict] = [{"settings": dict(serving.engine_args), "verdict": verdict.status.value, "level": _level_of(comparison),
                               "first_bitwise_site": _first_site(comparison, lambda s: s[RELATIVE_L2] > 0), "from": "the configuration's own run"}]

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
                           "first_bitwise_site": _first_site(trial_comparison, lambda s: s[RELATIVE_L2] > 0)})
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


def _level_of(comparison: dict) -> str:
    if comparison.get("level") == DETAIL_PROMPT_LOGPROBS:
        return DETAIL_PROMPT_LOGPROBS
    sites = {s["site"] for s in comparison["sites"]}
    return DETAIL_LOGITS if sites <= set(LOGITS_SITES) else DETAIL_LAYERS


def _level(served: CaptureReader) -> str:
    if served_level(served) is not None:
        return DETAIL_PROMPT_LOGPROBS
    levels = {e["level"] for e in served.manifest["backend"]["serving"]["evidence"]}
    return DETAIL_LOGITS if DETAIL_LOGITS in levels else DETAIL_LAYERS


def _write_comparison(destination: Path, comparison: dict, verdict) -> None:
    from precision.report import write_report

    with claim_output_dir(destination, "comparison", force=True, complete_marker="summary.json"):
        write_json_atomic(destination / "comparison.json", comparison)
        write_report(destination, comparison, verdict)


def _first_site(comparison: dict, predicate) -> str | None:
    """The first site in model order (embed, layers, final norm, logits) whose pooled figures satisfy ``predicate``."""
    if "sites" not in comparison:
        return None  # the prompt-logprobs level sees no site
    by_site = {s["site"]: s for s in comparison["sites"]}
    return next((site for site in site_order(list(by_site)) if predicate(by_site[site])), None)


def _evidence_summary(served: CaptureReader, level: str) -> dict:
    """How the level of detail was established, from the worker's own counts over every captured prompt."""
    evidence = served.manifest["backend"]["serving"]["evidence"]
    calls: dict[str, int] = {}
    for entry in evidence:
        for name, count in entry["calls"].items():
            calls[name] = calls.get(name, 0) + count
    layer_calls = sum(c for n, c in calls.items() if layer_index(n) is not None)
    # Counted from this configuration's engine start (precision.serving.engine), not the process's earlier engines.
    # vLLM 0.32 compiles ahead of time on CPU (num_aot_compiles) rather than through num_backend_compilations: every
    # counter that moved is reported.
    counters: dict[str, int] = {}
    for entry in evidence:
        for name, value in entry["engine_compilations"].items():
            if value:
                counters[name] = max(counters.get(name, 0), value)
    compiled = sum(v for k, v in counters.items() if "compile" in k or "artifacts_loaded" in k)
    counted = ", ".join(f"{k} {v}" for k, v in sorted(counters.items())) or "none moved"
    outer = calls.get("outer_model", 0)
    if level == DETAIL_LOGITS:
        why = (f"the model body ran as a compiled graph: the decoder layers' Python hooks fired {layer_calls} times while the outer "
               f"forward ran {outer} time(s) over the captures, and vLLM's compilation counters since this engine started read "
               f"{counted}; final-norm states and full-vocabulary logits of every position were taken outside the graph")
    else:
        steps = max((e["calls"].get("outer_model", 0) for e in evidence), default=0)
        why = (f"the decoder layers' Python hooks fired ({layer_calls} calls over {outer} forward steps, up to {steps} step(s) per "
               f"sequence), so every site of every position was captured; vLLM's compilation counters since this engine started: {counted}")
    preempted = preemption.summarize(evidence)
    if preempted is not None:
        why += "; " + preemption.sentence(preempted)
    cached = [len(e["positions_from_earlier_requests"]) for e in evidence]
    return {"why": why, "preemption": preempted, "hook_calls": calls, "compilations": compiled, "compilation_counters": counters,
            "positions_from_cache": sum(cached), "cached_tokens_reported": [e.get("cached_tokens") for e in evidence],
            "requests_per_sequence": [len(e["requests"]) for e in evidence],
            "steps_per_sequence": [len(e.get("steps", [])) for e in evidence],
            "largest_shared_step": max((step["requests"] for e in evidence for step in e.get("steps", [])), default=None),
            "companion_lengths": evidence[0].get("companion_lengths") if evidence else None}


def _row(serving: ServingConfig, served: CaptureReader, comparison: dict, verdict, level: str) -> dict:
    sites = comparison["sites"]
    envelope = (comparison.get("analysis") or {}).get("envelope") or {}
    env_rows = envelope.get("sites") or []
    largest = max(sites, key=lambda s: s[RELATIVE_L2])
    # A site where the configuration equals the baseline has ratio 0/0 = 1 by compare.ratio's convention; it is not a
    # difference to size, so the largest ratio is taken over the sites that differ (0 when none does).
    differing = [r for r in env_rows if r["target"] > 0]
    worst_envelope = max(differing, key=lambda r: r["ratio"]) if differing else None
    logits = next((s for s in sites if s["site"] == LOGITS), None)
    flips = [f for p in comparison["prompts"] for f in (p.get(LOGITS) or {}).get("flips", [])]
    return {
        "name": serving.name, "settings": serving.to_json(), "verdict": verdict.status.value, "summary": verdict.summary,
        "findings": [f.message for p in verdict.prompts for f in p.findings if f.status is not Status.PASS][:5]
                    + [f.message for f in verdict.findings if f.status is not Status.PASS],
        "level": level, "evidence": _evidence_summary(served, level),
        "bitwise_identical": all(s[RELATIVE_L2] == 0.0 for s in sites),
        "first_bitwise_site": _first_site(comparison, lambda s: s[RELATIVE_L2] > 0),
        "largest": {"site": largest["site"], RELATIVE_L2: largest[RELATIVE_L2]},
        "logits_relative_l2": logits[RELATIVE_L2] if logits else None,
        "logits_R": logits.get("R") if logits else None,
        "envelope_ratio": ({"site": None, "ratio": 0.0, "configuration": 0.0, "envelope_max": None} if env_rows else None)
        if worst_envelope is None else {"site": worst_envelope["site"], "ratio": worst_envelope["ratio"],
                                                               "configuration": worst_envelope["target"], "envelope_max": worst_envelope["max"]},
        "first_site_beyond_envelope": next((r["site"] for r in sorted(env_rows, key=lambda r: site_order([x["site"] for x in env_rows]).index(r["site"]))
                                            if r["target"] > 0 and r["ratio"] > 1.0), None),
        "flips": {"total": len(flips), "real": sum(1 for f in flips if not f.get(NEAR_TIE, True))},
        "tokens": [{"id": p["id"], FIRST_DIVERGENCE: p["tokens"].get(FIRST_DIVERGENCE), "match_rate": p["tokens"].get("match_rate")}
                   for p in comparison["prompts"]],
        "comparison": f"configuration-{serving.name}/comparison.json",
    }
