"""Command line: every command parses its arguments, checks their values (precision.cli.values), makes ONE call
into the public API (``precision``) and turns the result into printed lines and an exit code. No capturing,
comparing, rendering or file writing happens here; the exit codes live only here.

Exit codes: 0 pass (or warn), 1 a verdict or regression failed, 2 bad input or configuration (one line naming
the problem and the fix), 3 an internal error (one line; the traceback is saved to a file the line names).
Nothing here imports torch or vLLM at module level, so ``precision-check --help`` stays fast.
"""

from __future__ import annotations

import logging
import shlex
import sys
import tempfile
import traceback
from datetime import datetime, timezone
from pathlib import Path

from precision.cli import values
from precision.cli.parser import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERNAL, EXIT_OK, build_parser
from precision.errors import PrecisionError

log = logging.getLogger("precision")


def _run(args) -> int:
    from precision import run
    from precision.run_file import build_run_config, merge_settings, read_run_file

    file = read_run_file(args.config) if args.config else None
    settings = merge_settings(file.run if file else {}, values.given_run_settings(args))
    thresholds = {**(file.thresholds if file else {}), **values.overrides(args.threshold, "--threshold")}
    config = build_run_config(settings, thresholds=thresholds, serving=file.serving if file else {}, config_file=file, force=args.force,
                              resume=args.resume, show_progress=not args.quiet, command=args.command_line)
    result = run(config, junit=settings.get("junit"))
    code = _finish(result.verdict, result.files)
    if result.serving is not None:
        print(f"serving configurations: {result.serving['status']} ({config.out / 'serving' / 'summary.md'})")
        if result.serving["status"] == "FAIL":
            return EXIT_FAILED
    return code


def _capture(args) -> int:
    from precision import capture_backend

    reader = capture_backend(args.backend, args.out, model=args.model, prompts=args.prompts, teacher_forcing=args.teacher_forcing,
                             max_new_tokens=args.max_new_tokens, selection=values.selection(args),
                             engine_args=values.engine_args(args.engine_arg, args.additional_config),
                             trust_remote_code=args.trust_remote_code, resume=args.resume, force=args.force, shard=args.shard)
    part = f" (shard {args.shard})" if args.shard else ""
    print(f"captured {len(reader.prompts)} prompts{part} with {reader.manifest['backend']['spec']} into {reader.path}")
    return EXIT_OK


def _merge_captures(args) -> int:
    from precision import merge_captures

    reader = merge_captures(args.shards, args.out, prompts=args.prompts, teacher_forcing=args.teacher_forcing,
                            max_new_tokens=args.max_new_tokens, model=args.model, trust_remote_code=args.trust_remote_code, force=args.force,
                            link=not args.copy)
    print(f"merged {len(args.shards)} shards ({len(reader.prompts)} prompts, {reader.manifest['backend']['spec']}) into {reader.path}")
    return EXIT_OK


def _compare(args) -> int:
    from precision import compare

    path = compare(args.expected, args.actual, args.out, truth=args.truth, envelope_dir=args.envelope_dir, replay=args.replay,
                   metric_convention=args.metric_convention, force=args.force, show_progress=not args.quiet)
    print(f"wrote {path}")
    return EXIT_OK


def _report(args) -> int:
    from precision import render_report

    result = render_report(args.comparison, out=args.out, thresholds=values.thresholds(args.config, args.threshold), command=args.command_line)
    return _finish(result.verdict, result.files)


def _selftest(args) -> int:
    from precision import self_test

    out = Path(args.out) if args.out else Path("runs") / datetime.now(timezone.utc).strftime("selftest-%Y%m%d-%H%M%S")
    sweep = tuple(args.sweep) if args.sweep else not args.no_sweep
    outcome = self_test(out, prompts=args.prompts, model=args.model, sweep=sweep, force=args.force, show_progress=not args.quiet)
    print(outcome.table)
    print("\nsensitivity (smallest planted error still failed at the right layer):")
    for check, text in outcome.sensitivity.items():
        print(f"  {check}: {text}")
    print(f"details: {out}/selftest.json and {out}/cases/*/report.html")
    return EXIT_OK if outcome.as_expected else EXIT_FAILED


def _golden(args) -> int:
    from precision import create_store, verify_store

    if args.golden_command == "create":
        store = create_store(Path(args.prompts), Path(args.out), model=values.optional_path(args.model), force=args.force,
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
    from precision import regress

    outcome = regress(args.baseline, args.candidate, out=args.out, tolerance=values.tolerance(args.config, args.tolerance), junit=args.junit)
    print(f"regress: {outcome.result['status']}: {outcome.result['message']}")
    print(f"  regression.md: {outcome.files['regression.md']}")
    return EXIT_FAILED if outcome.result["status"] == "FAIL" else EXIT_OK


def _plant_fault(args) -> int:
    from precision import plant_fault

    path = plant_fault(args.model, args.out, layer=args.layer, factor=args.factor, force=args.force)
    print(f"wrote {path}: layer {args.layer} down_proj weight x {args.factor}")
    return EXIT_OK


def _verify(args) -> int:
    from precision import verify_run

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
    for name in ("report.html", "summary.md", "summary.json", "msprobe_compare.csv"):
        if name in files:
            print(f"  {name}: {files[name]}")
    return EXIT_FAILED if verdict.status.value == "FAIL" else EXIT_OK


_COMMANDS = {"run": _run, "capture": _capture, "compare": _compare, "report": _report, "selftest": _selftest, "verify": _verify,
             "golden": _golden, "regress": _regress, "plant-fault": _plant_fault, "merge-captures": _merge_captures}


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
        handler = getattr(args, "handler", None) or _COMMANDS[args.command]
        return handler(args)
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

