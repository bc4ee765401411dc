"""The actions of the command line as functions: each reads its inputs, claims its output directory, does the work
and writes its files. The CLI parses and validates arguments, makes one call here (or to another function the
public API exports) and turns the returned result into printed lines and an exit code; nothing here knows exit
codes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from precision.errors import PrecisionError

log = logging.getLogger(__name__)

PROMPT_SETS = Path(__file__).resolve().parent / "prompt_sets"
"""The shipped prompt sets (package data; the repository's golden/ is a link to this directory): the default
``prompts`` of ``run`` and of ``precision-check run`` without --prompts."""
DEFAULT_SELFTEST_PROMPTS = PROMPT_SETS / "default.jsonl"


def run(config, source=None, *, junit: str | Path | None = None):
    """The whole job (``precision-check run``): capture the reference, FP32 truth, envelope and target, compare,
    analyse, judge and write the report into ``config.out``; ``config.reference`` is opened as a golden store when it
    is one (or pass ``source``), and the JUnit XML is written to ``junit`` when given.

    Returns a ``RunResult`` (out, verdict, comparison, files: name -> path of report.html, summary.md,
    summary.json, comparison.json; serving: the serving stage's parity document when ``config.serving`` holds
    [serving.NAME] tables, whose status FAIL the command also exits 1 on). Raises ``PrecisionError`` (or a subclass) for bad input or configuration,
    before any model loads where it can be checked then; a FAIL verdict is a result, not an exception."""
    from precision.golden import GoldenStore, is_store
    from precision.pipeline import run as run_pipeline

    if source is None and is_store(config.reference):
        source = GoldenStore(config.reference)
    result = run_pipeline(config, source)
    if junit:
        from precision.report.junit import write_junit

        write_junit(junit, result.verdict, serving=result.serving, timestamp=result.comparison["created_at"])
    return result


def capture_backend(spec: str, out: str | Path, *, model: str | Path | None = None, prompts: str | Path | None = None,
                    teacher_forcing: str | Path | None = None, max_new_tokens: int = 32, selection=None,
                    engine_args: dict | None = None, trust_remote_code: bool = False, resume: bool = False, force: bool = False,
                    shard: str | None = None):
    """Capture one backend into ``out``: a reference from ``prompts``, or a target fed a reference capture's tokens
    (``teacher_forcing``). ``shard`` "I/N": only the I-th of N parts of the plan (precision.capture.shards; merge
    the parts with ``merge_captures``). Returns the CaptureReader of ``out``. Raises ``PrecisionError`` for an
    unknown backend, settings the backend refuses, an unreadable prompt set or model, or an ``out`` that is not
    precision-check's to write."""
    from precision.backends import BackendOptions, create_backend, parse_spec
    from precision.capture.reader import CaptureReader
    from precision.capture.shards import ShardSpec, shard_plan
    from precision.capture.writer import CapturePlan, capture
    from precision.planning import plan_from_prompts
    from precision.prompts import MAX_NEW_TOKENS_LIMIT
    from precision.reference_side import resolve_model

    shard_spec = ShardSpec.parse(shard) if shard is not None else None

    parsed = parse_spec(spec)
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
        raise PrecisionError(f"--max-new-tokens {max_new_tokens}: must be between 1 and {MAX_NEW_TOKENS_LIMIT}")
    info = resolve_model(Path(model) if model else None)
    options = BackendOptions(trust_remote_code=trust_remote_code, engine_args=engine_args or {})
    backend = create_backend(parsed, info, options)
    backend.validate()
    if teacher_forcing:
        plan = CapturePlan.following(CaptureReader(teacher_forcing))
    elif prompts:
        plan = plan_from_prompts(prompts, info, max_new_tokens=max_new_tokens, trust_remote_code=trust_remote_code)
    else:
        raise PrecisionError("capture needs --prompts (for a reference) or --teacher-forcing REFERENCE_CAPTURE (for a target)")
    if shard_spec is not None:
        plan = shard_plan(plan, shard_spec)
    kwargs = {"selection": selection} if selection is not None else {}
    return capture(backend, plan, Path(out), resume=resume, force=force, **kwargs)


def merge_captures(shards: Iterable[str | Path], out: str | Path, *, prompts: str | Path | None = None,
                   teacher_forcing: str | Path | None = None, max_new_tokens: int = 32, model: str | Path | None = None,
                   trust_remote_code: bool = False, force: bool = False, link: bool = True):
    """Merge the capture directories of ``capture_backend(..., shard="I/N")`` into ``out``, the capture a single
    ``capture_backend`` with the same ``prompts`` / ``teacher_forcing`` and ``max_new_tokens`` writes (the plan is
    rebuilt from them with the tokenizer of ``model``, default the shards' model path, to check every prompt is
    there once). Returns its CaptureReader. Raises ``PrecisionError`` for foreign, overlapping, missing or damaged
    shards."""
    from precision.capture.reader import CaptureReader
    from precision.capture.shards import merge_captures as merge
    from precision.capture.writer import CapturePlan
    from precision.model import inspect_model
    from precision.planning import plan_from_prompts

    shards = [Path(s) for s in shards]
    if not shards:
        raise PrecisionError("merge-captures needs at least one shard capture directory")
    if bool(prompts) == bool(teacher_forcing):
        raise PrecisionError("merge-captures needs the plan the shards were captured from: --prompts (a reference) or "
                             "--teacher-forcing REFERENCE_CAPTURE (a target), as given to 'capture --shard'")
    if teacher_forcing:
        plan = CapturePlan.following(CaptureReader(teacher_forcing))
    else:
        from precision.prompts import MAX_NEW_TOKENS_LIMIT

        if not 1 <= max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise PrecisionError(f"--max-new-tokens {max_new_tokens}: must be between 1 and {MAX_NEW_TOKENS_LIMIT}, as given to 'capture --shard'")
        model = model or CaptureReader(shards[0]).manifest["model"]["path"]
        if not Path(model).is_dir():
            raise PrecisionError(f"the shards' model {model} is not on this machine; pass --model with its copy here (its "
                                 "tokenizer rebuilds the prompt plan)")
        plan = plan_from_prompts(prompts, inspect_model(model, hash_weights=False), max_new_tokens=max_new_tokens,
                                 trust_remote_code=trust_remote_code)
    return merge(shards, out, plan, force=force, link=link)


def compare(expected: str | Path, actual: str | Path, out: str | Path, *, truth: str | Path | None = None,
            envelope_dir: str | Path | None = None, replay: bool = False, metric_convention: str = "precision-check",
            force: bool = False, show_progress: bool = True) -> Path:
    """Compare two capture directories (and the truth, the envelope members, the layer replay) into
    ``out/comparison.json``; returns its path. Raises ``PrecisionError`` for an incomplete or damaged capture,
    captures that cannot be compared (``MismatchedCapturesError``: other token ids, vocabulary, layers) or
    ``replay`` without the reference model on this machine."""
    from precision.capture.reader import CaptureReader
    from precision.outputs import claim_output_dir

    reference, target = CaptureReader(expected), CaptureReader(actual)
    truth_reader = CaptureReader(truth) if truth else None
    if envelope_dir and not Path(envelope_dir).is_dir():
        raise PrecisionError(f"--envelope-dir {envelope_dir} is not a directory; pass captures/envelope of a run or a golden store")
    model_path = reference.manifest["model"].get("path")
    if replay and not (model_path and Path(model_path).is_dir()):
        raise PrecisionError(f"--replay needs the reference model at {model_path}, which is not on this machine; compare without --replay "
                             "(the report then says the replay was skipped), or run where the model is")
    out = Path(out)
    inputs = [expected, actual, truth, envelope_dir]
    with claim_output_dir(out, "comparison", force=force, complete_marker="comparison.json", inputs=inputs, can_resume=False):
        return _compare_into(out, reference, target, truth_reader, envelope_dir, replay, metric_convention, show_progress)


def _compare_into(out: Path, expected, actual, truth, envelope_dir, replay: bool, metric_convention: str, show_progress: bool) -> Path:
    from precision.analysis.replay import Replayer
    from precision.capture.reader import CaptureReader
    from precision.io import write_json_atomic
    from precision.pipeline import analysed_comparison

    members, envelope_ids = {}, None
    if envelope_dir:
        members = {p.name: CaptureReader(p) for p in sorted(Path(envelope_dir).iterdir()) if p.is_dir()}
        envelope_ids = sorted(set.intersection(*({r.id for r in m.prompts} for m in members.values()))) if members else None
    from precision.interop.msprobe_compare import comparable_captures

    # An msprobe import is compared on the sites both sides hold; captures of this tool must hold the same sites.
    captures = comparable_captures(expected, actual, truth, members=members or None)
    expected, actual, truth, members = captures.expected, captures.actual, captures.truth, captures.members
    for line in captures.one_sided_lines():
        log.warning("not compared (one side only): %s", line)
    replayer = Replayer(expected.manifest["model"]["path"], expected.dtype) if replay else None
    comparison = analysed_comparison(expected, actual, truth, members=members or None, envelope_prompts=envelope_ids, replay=False,
                                     replayer=replayer, show_progress=show_progress, metric_convention=metric_convention)
    from precision.analysis.verdict import judge
    from precision.interop.msprobe_export import write_msprobe_csv

    write_msprobe_csv(out, comparison, judge(comparison))  # msprobe's compare result layout; Result by the default thresholds
    write_json_atomic(out / "comparison.json", comparison)  # last: a comparison directory with it is complete
    return out / "comparison.json"


def render_report(comparison: str | Path, *, out: str | Path | None = None, thresholds=None, command: str | None = None):
    """Judge a comparison.json (or the directory holding it) and write report.html, summary.md and summary.json
    beside it or into ``out``; ``thresholds``: a ``Thresholds`` (default: the rule table's). Returns a
    ``RunResult``. Raises ``PrecisionError`` for a file that is not a readable comparison.json of a known version."""
    from precision.analysis.verdict import judge
    from precision.io import read_comparison
    from precision.outputs import claim_for_update
    from precision.pipeline import RunResult
    from precision.report import write_report

    path, document = read_comparison(comparison)
    out = Path(out) if out else path.parent
    serving = _serving_stage_document(path.parent)
    with claim_for_update(out, ("run", "comparison", "selftest-case"), new_kind="comparison"):
        try:
            verdict = judge(document, thresholds)
            files = write_report(out, document, verdict, command=command, serving=serving)
        except (KeyError, TypeError, AttributeError, IndexError) as exc:
            raise PrecisionError(f"{path} is damaged or of another version (missing or malformed {exc}); "
                                 "recreate it with 'precision-check compare'") from exc
    return RunResult(out=out, verdict=verdict, comparison=document, files=files)


def _serving_stage_document(run_dir: Path) -> dict | None:
    """The serving stage's document of the run in ``run_dir`` (its report summarizes it), or None for a run without
    [serving.NAME] tables or a directory that is not a run."""
    from precision.io import read_result_json
    from precision.names import SERVING_STAGE_DIRECTORY

    record, stage = run_dir / "run.json", run_dir / SERVING_STAGE_DIRECTORY / "summary.json"
    try:
        has_tables = record.is_file() and bool(read_result_json(record).get("serving"))
    except (OSError, ValueError, AttributeError):
        return None
    if not has_tables:
        return None
    if not stage.is_file():
        raise PrecisionError(f"{run_dir} had a serving stage ([serving.NAME] tables in its run.json) but {stage} is missing; "
                             "its report cannot be rendered without it: run the run again (precision-check run --force)")
    return read_result_json(stage)


@dataclass(frozen=True)
class Regression:
    result: dict
    """regression.json's content (precision.analysis.regress.regress)."""
    files: dict[str, Path]


def regress(baseline: str | Path, candidate: str | Path, *, out: str | Path | None = None, tolerance=None,
            junit: str | Path | None = None) -> Regression:
    """Compare a candidate build's run with a baseline build's run; write regression.json and regression.md into
    ``out`` (default: the candidate run) and the JUnit XML to ``junit`` when given; ``tolerance``: a
    ``RegressTolerance``. Returns a ``Regression`` (its ``result["status"]`` is "PASS" or "FAIL"). Raises
    ``PrecisionError`` for a directory that is not a finished run, and ``MismatchedCapturesError`` (a subclass) for
    runs measured against different references or FP32 truths."""
    from precision.analysis.regress import regress as regress_runs
    from precision.outputs import claim_for_update
    from precision.report import write_regression

    result = regress_runs(Path(baseline), Path(candidate), tolerance)
    out = Path(out) if out else Path(candidate)
    with claim_for_update(out, ("run", "comparison"), new_kind="comparison"):
        files = write_regression(out, result)
    if junit:
        from precision.environment import utc_now
        from precision.report.junit import write_junit

        write_junit(junit, None, regression=result, timestamp=utc_now())
    return Regression(result, files)


@dataclass(frozen=True)
class Selftest:
    out: Path
    results: list
    """One precision.selftest.CaseResult per case."""
    table: str
    sensitivity: dict[str, str]
    as_expected: bool
    """Every planted fault got its expected verdict (the sweeps measure sensitivity and are only reported)."""


def self_test(out: str | Path, *, prompts: str | Path | None = None, model: str | Path | None = None,
             sweep: bool | Iterable[str] = True, force: bool = False, show_progress: bool = True) -> Selftest:
    """Plant faults in copies of the reference and check that the analysis catches them (precision.selftest);
    ``prompts`` defaults to the shipped default set, ``sweep`` True runs every sensitivity sweep, a list of names
    only those. Returns a ``Selftest`` (``as_expected`` False when a planted fault did not get its verdict)."""
    from precision.selftest import all_as_expected, format_table, run_selftest, sensitivity

    out = Path(out)
    results = run_selftest(Path(prompts) if prompts else DEFAULT_SELFTEST_PROMPTS, out, model=Path(model) if model else None,
                           sweep=sweep, force=force, show_progress=show_progress)
    return Selftest(out, results, format_table(results), sensitivity(results), all_as_expected(results))


def plant_fault(model: str | Path, out: str | Path, *, layer: int, factor: float, force: bool = False) -> Path:
    """A copy of the checkpoint at ``model`` with ``layer``'s MLP down-projection weight scaled by ``factor``,
    written to ``out`` (never in place); returns ``out``. Raises ``PrecisionError`` for a layer the model lacks, a
    factor that is not a finite number > 0, or an ``out`` in, on or around the model."""
    from precision.faults import write_scaled_checkpoint
    from precision.model import inspect_model

    return write_scaled_checkpoint(inspect_model(model), Path(out), layer=layer, factor=factor, force=force)
