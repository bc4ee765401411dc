"""Command line: argument parsing and exit codes only; the work is done by the importable API.

Exit codes: 0 pass (or warn), 1 a verdict or regression failed, 2 bad input or configuration (one line naming
the problem and the fix), 3 an internal error (one line; the traceback is saved to a file the line names).
Nothing here imports torch or vLLM at module level, so ``precision-check --help`` stays fast.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import sys
import tempfile
import traceback
from datetime import datetime, timezone
from pathlib import Path

from precision.cli.parser import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERNAL, EXIT_OK, build_parser
from precision.errors import PrecisionError

_BARE_WORD = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:/+-]*$")
log = logging.getLogger("precision")


def _engine_args(pairs: list[str], additional_config: str | None) -> dict:
    args: dict = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise PrecisionError(f"--engine-arg {pair!r}: write it as key=value, e.g. --engine-arg max_num_seqs=1")
        try:
            args[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            # A bare word (bfloat16, fp8, auto) is a string; anything else that is not JSON is a typo that
            # vLLM would only reject after the whole CPU side was captured (max_model_len=2O48).
            if not _BARE_WORD.match(value):
                raise PrecisionError(f"--engine-arg {pair!r}: {value!r} is neither JSON nor a plain word; write numbers as numbers "
                                     f"(max_model_len=2048) and other strings in JSON quotes ({key.strip()}='\"...\"')") from None
            args[key.strip()] = value
    if additional_config:
        try:
            args["additional_config"] = json.loads(additional_config)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise PrecisionError(f"--additional-config is not valid JSON ({exc}); pass an object like '{{\"ascend_scheduler_config\": {{}}}}'") from exc
        if not isinstance(args["additional_config"], dict):
            raise PrecisionError("--additional-config must be a JSON object, like '{\"ascend_scheduler_config\": {}}'")
    return args


def _selection(args):
    from precision.capture.sites import CaptureSelection

    return CaptureSelection.parse(args.positions, args.layers)


def _config_table(path: str | None, table: str) -> dict:
    if path is None:
        return {}
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise PrecisionError(f"cannot read config file {path}: {exc}") from exc
    return data.get(table, {})


def _overrides(pairs: list[str] | None, flag: str) -> dict:
    values = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        try:
            values[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise PrecisionError(f"{flag} {pair!r}: write it as name=number, e.g. {flag} r_logits_fail=1.3")
    return values


def _thresholds(path: str | None, pairs: list[str] | None = None):
    """Verdict thresholds: command line over the config file's [thresholds] table over the defaults."""
    from precision.analysis.verdict import Thresholds

    return Thresholds.from_mapping({**_config_table(path, "thresholds"), **_overrides(pairs, "--threshold")})


def _run(args) -> int:
    from precision.analysis.envelope import DEFAULT_MEMBERS
    from precision.pipeline import RunConfig, run

    out = Path(args.out) if args.out else Path("runs") / datetime.now(timezone.utc).strftime("run-%Y%m%d-%H%M%S")
    config = RunConfig(
        prompts=Path(args.prompts), out=out, model=Path(args.model) if args.model else None,
        reference=args.reference, target=args.target, truth=None if args.truth.lower() == "none" else args.truth,
        max_new_tokens=args.max_new_tokens, selection=_selection(args),
        engine_args=_engine_args(args.engine_arg, args.additional_config), trust_remote_code=args.trust_remote_code,
        thresholds=_thresholds(args.config, args.threshold), force=args.force, resume=args.resume, command=args.command_line,
        target_model=Path(args.target_model) if args.target_model else None, target_variants=tuple(args.target_variant),
        envelope=DEFAULT_MEMBERS if args.envelope == "default" else (), replay=not args.no_replay, repeats=args.repeats,
        metric_convention=args.metric_convention,
        show_progress=not args.quiet,
    )
    result = run(config)
    if args.junit:
        from precision.report.junit import write_junit

        write_junit(args.junit, result.verdict, timestamp=result.comparison["created_at"])
    return _finish(result.verdict, result.files)


def _capture(args) -> int:
    from precision.backends import BackendOptions, create_backend, parse_spec
    from precision.capture.reader import CaptureReader
    from precision.capture.writer import CapturePlan, capture
    from precision.pipeline import resolve_model
    from precision.planning import plan_from_prompts

    spec = parse_spec(args.backend)
    _check_count(args.max_new_tokens, "--max-new-tokens", upper=4096)
    model = resolve_model(Path(args.model) if args.model else None)
    options = BackendOptions(trust_remote_code=args.trust_remote_code, engine_args=_engine_args(args.engine_arg, args.additional_config))
    backend = create_backend(spec, model, options)
    backend.validate()
    if args.teacher_forcing:
        plan = CapturePlan.following(CaptureReader(args.teacher_forcing))
    elif args.prompts:
        plan = plan_from_prompts(args.prompts, model, max_new_tokens=args.max_new_tokens, trust_remote_code=args.trust_remote_code)
    else:
        raise PrecisionError("capture needs --prompts (for a reference) or --teacher-forcing REFERENCE_CAPTURE (for a target)")
    reader = capture(backend, plan, Path(args.out), selection=_selection(args), resume=args.resume, force=args.force)
    print(f"captured {len(reader.prompts)} prompts with {spec} into {reader.path}")
    return EXIT_OK


def _compare(args) -> int:
    from precision.capture.reader import CaptureReader
    from precision.outputs import claim_output_dir

    expected, actual = CaptureReader(args.expected), CaptureReader(args.actual)
    truth = CaptureReader(args.truth) if args.truth else None
    if args.envelope_dir and not Path(args.envelope_dir).is_dir():
        raise PrecisionError(f"--envelope-dir {args.envelope_dir} is not a directory; pass captures/envelope of a run or a golden store")
    model_path = expected.manifest["model"].get("path")
    if args.replay and not (model_path and Path(model_path).is_dir()):
        raise PrecisionError(f"--replay needs the reference model at {model_path}, which is not on this machine; compare without --replay "
                             "(the report then says the replay was skipped), or run where the model is")
    out = Path(args.out)
    inputs = [args.expected, args.actual, args.truth, args.envelope_dir]
    with claim_output_dir(out, "comparison", force=args.force, complete_marker="comparison.json", inputs=inputs, can_resume=False):
        return _compare_into(args, out, expected, actual, truth)


def _compare_into(args, out: Path, expected, actual, truth) -> int:
    from precision.analysis.compare import compare_captures
    from precision.analysis.explain import build_analysis
    from precision.analysis.replay import Replayer
    from precision.capture.reader import CaptureReader
    from precision.io import write_json_atomic

    comparison = compare_captures(expected, actual, truth=truth, show_progress=not args.quiet, metric_convention=args.metric_convention)
    members, envelope_ids = {}, None
    if args.envelope_dir:
        members = {p.name: CaptureReader(p) for p in sorted(Path(args.envelope_dir).iterdir()) if p.is_dir()}
        envelope_ids = sorted(set.intersection(*({r.id for r in m.prompts} for m in members.values()))) if members else None
    replayer = Replayer(expected.manifest["model"]["path"], expected.dtype) if args.replay else None
    comparison["analysis"] = build_analysis(comparison, reference=expected, target=actual, members=members or None,
                                            envelope_prompts=envelope_ids, replayer=replayer)
    write_json_atomic(out / "comparison.json", comparison)
    print(f"wrote {out / 'comparison.json'}")
    return EXIT_OK


def _report(args) -> int:
    from precision.analysis.verdict import judge
    from precision.io import read_result_json
    from precision.outputs import claim_for_update
    from precision.report import write_report

    path = Path(args.comparison)
    path = path / "comparison.json" if path.is_dir() else path
    try:
        comparison = read_result_json(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise PrecisionError(f"cannot read comparison {path}: {exc}; pass the comparison.json written by 'precision-check compare'") from exc
    if not isinstance(comparison, dict) or comparison.get("format") != "precision-check-comparison":
        raise PrecisionError(f"{path} is not a precision-check comparison.json")
    thresholds = _thresholds(args.config, args.threshold)
    out = Path(args.out) if args.out else path.parent
    with claim_for_update(out, ("run", "comparison", "selftest-case"), new_kind="comparison"):
        try:
            verdict = judge(comparison, thresholds)
            files = write_report(out, comparison, verdict, command=args.command_line)
        except (KeyError, TypeError, AttributeError, IndexError) as exc:
            raise PrecisionError(f"{path} is damaged or of another version (missing or malformed {exc}); "
                                 "recreate it with 'precision-check compare'") from exc
    return _finish(verdict, files)


def _selftest(args) -> int:
    from precision.selftest import all_as_expected, format_table, run_selftest, sensitivity

    prompts = Path(args.prompts) if args.prompts else Path(__file__).resolve().parents[2] / "golden" / "default.jsonl"
    out = Path(args.out) if args.out else Path("runs") / datetime.now(timezone.utc).strftime("selftest-%Y%m%d-%H%M%S")
    sweep = tuple(args.sweep) if args.sweep else not args.no_sweep
    results = run_selftest(prompts, out, model=Path(args.model) if args.model else None, sweep=sweep, force=args.force,
                           show_progress=not args.quiet)
    print(format_table(results))
    print("\nsensitivity (smallest planted error still failed at the right layer):")
    for check, text in sensitivity(results).items():
        print(f"  {check}: {text}")
    print(f"details: {out}/selftest.json and {out}/cases/*/report.html")
    return EXIT_OK if all_as_expected(results) else EXIT_FAILED


def _golden(args) -> int:
    from precision.golden import create_store, verify_store

    if args.golden_command == "create":
        store = create_store(Path(args.prompts), Path(args.out), model=Path(args.model) if args.model else None, force=args.force,
                             show_progress=not args.quiet)
        print(f"golden store {args.out}: {len(store['prompt_ids'])} prompts, reference + truth + {len(store['captures']['envelope'])} envelope captures; "
              f"compact form {store['compact']['bytes'] / 1024:.0f} KiB")
        return EXIT_OK
    problems = verify_store(args.store)
    for problem in problems:
        print(f"MISMATCH: {problem}")
    print(f"{args.store}: " + ("intact" if not problems else f"{len(problems)} problem(s)"))
    return EXIT_FAILED if problems else EXIT_OK


def _regress(args) -> int:
    import jinja2

    from precision.analysis.regress import RegressTolerance, regress
    from precision.io import write_json_atomic, write_text_atomic
    from precision.outputs import claim_for_update
    from precision.report import TEMPLATE_DIR

    tolerance = RegressTolerance.from_mapping({**_config_table(args.config, "regress"), **_overrides(args.tolerance, "--tolerance")})
    result = regress(Path(args.baseline), Path(args.candidate), tolerance)
    out = Path(args.out) if args.out else Path(args.candidate)
    with claim_for_update(out, ("run", "comparison"), new_kind="comparison"):
        write_json_atomic(out / "regression.json", result)
        template = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)), trim_blocks=True, lstrip_blocks=True).get_template("regression.md.j2")
        write_text_atomic(out / "regression.md", template.render(r=result))
    if args.junit:
        from precision.environment import utc_now
        from precision.report.junit import write_junit

        write_junit(args.junit, None, regression=result, timestamp=utc_now())
    print(f"regress: {result['status']}: {result['message']}")
    print(f"  regression.md: {out / 'regression.md'}")
    return EXIT_FAILED if result["status"] == "FAIL" else EXIT_OK


def _plant_fault(args) -> int:
    from precision.faults import write_scaled_checkpoint
    from precision.model import inspect_model

    path = write_scaled_checkpoint(inspect_model(args.model), Path(args.out), layer=args.layer, factor=args.factor, force=args.force)
    print(f"wrote {path}: layer {args.layer} down_proj weight x {args.factor}")
    return EXIT_OK


def _verify(args) -> int:
    from precision.verify import verify_run

    notes: list[str] = []
    problems = verify_run(args.run_dir, notes)
    for problem in problems:
        print(f"MISMATCH: {problem}")
    for note in notes:
        print(f"NOT CHECKED HERE: {note}")
    if problems:
        print(f"{args.run_dir}: {len(problems)} problem(s)")
    else:
        scope = "the report, summaries and comparison" if not notes else "everything this machine can recompute (see above)"
        print(f"{args.run_dir}: verified: {scope} are what the stored captures give")
    return EXIT_FAILED if problems else EXIT_OK


def _finish(verdict, files: dict) -> int:
    print(verdict.summary)
    for name in ("report.html", "summary.md", "summary.json"):
        if name in files:
            print(f"  {name}: {files[name]}")
    return EXIT_FAILED if verdict.status.value == "FAIL" else EXIT_OK


_COMMANDS = {"run": _run, "capture": _capture, "compare": _compare, "report": _report, "selftest": _selftest, "verify": _verify,
             "golden": _golden, "regress": _regress, "plant-fault": _plant_fault}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    args.command_line = "precision-check " + " ".join(shlex.quote(a) for a in argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _COMMANDS[args.command](args)
    except PrecisionError as exc:
        print(f"precision-check: error: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("precision-check: interrupted; an unfinished capture continues with --resume", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not a verdict: exit 3 so that CI never reads it as "the build is wrong"
        saved = _save_traceback(args.command_line)
        print(f"precision-check: internal error ({type(exc).__name__}: {_one_line(str(exc))[:300]}); this is a bug in precision-check, "
              f"not a verdict; the traceback is in {saved}: please report it", file=sys.stderr)
        return EXIT_INTERNAL


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _save_traceback(command_line: str) -> str:
    handle = tempfile.NamedTemporaryFile("w", prefix="precision-check-crash-", suffix=".txt", delete=False, encoding="utf-8")
    with handle:
        handle.write(f"{command_line}\n\n{traceback.format_exc()}")
    return handle.name


def _check_count(value: int, flag: str, *, lower: int = 1, upper: int | None = None) -> None:
    if value < lower or (upper is not None and value > upper):
        bounds = f"between {lower} and {upper}" if upper is not None else f"at least {lower}"
        raise PrecisionError(f"{flag} {value}: must be {bounds}")
