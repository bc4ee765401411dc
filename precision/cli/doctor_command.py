"""``precision-check doctor [--backend SPEC] [--model DIR] [--json]``: what can run here, with the fix for what cannot.

Exit codes: 0 when everything asked for can run (without --backend: always, the list says what cannot); 2 when the
asked backend cannot run here or its engine does not start (the message names the fix); 1 when the asked vLLM
engine starts but its hook logits disagree with its own prompt logprobs (a capture there would be wrong).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from precision.cli.parser import EXIT_FAILED, EXIT_OK


def add_command(subparsers: Any) -> None:
    p = subparsers.add_parser("doctor", help="check what can run on this host; with --backend vllm, start the engine and show its preflight")
    p.add_argument("--backend", help="a backend spec to check for real (e.g. vllm, hf:npu); vllm starts an engine on a small model")
    p.add_argument("--model", help="with --backend vllm: the model to start it on (default: the built-in synthetic Llama)")
    p.add_argument("--json", action="store_true", help="print the whole record as JSON (to send back with a report)")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from precision.doctor import doctor

    report = doctor(args.backend, args.model)
    if args.json:
        print(json.dumps(report.to_json(), indent=2, default=str))
    else:
        print("\n".join(report_lines(report)))
    check = report.logprob_check
    return EXIT_FAILED if check is not None and check["status"] == "FAIL" else EXIT_OK


def report_lines(report: Any) -> list[str]:
    lines = [f"host: {report.host['platform']} ({report.host['machine']}, {report.host['cpu_count']} CPUs)",
             "versions: " + ", ".join(f"{k} {v or 'not installed'}" for k, v in report.versions.items()),
             "numerics environment: " + (", ".join(f"{k}={v}" for k, v in report.environment.items()) or "none set")]
    lines.append("backends:")
    for status in report.backends:
        where = f" on {status.device}" if status.device else ""
        lines.append(f"  {status.spec:<16} {'can run' + where if status.can_run else 'cannot run: ' + str(status.reason)}"
                     + (f"\n  {'':<16} fix: {status.fix}" if status.fix and not status.can_run else ""))
    lines += [f"warning: {w}" for w in report.warnings]
    if report.engine is not None:
        lines += _engine_lines(report.engine)
    if report.logprob_check is not None:
        from precision.backends.vllm_logprob_check import LogprobCheck

        lines.append("prompt-logprob check: " + LogprobCheck(**report.logprob_check).describe())
    return lines


def _engine_lines(record: dict[str, Any]) -> list[str]:
    engine, modules, fingerprint = record.get("engine") or {}, record.get("modules") or {}, record.get("fingerprint") or {}
    lines = ["engine preflight (read in the worker):",
             "  " + ", ".join(f"{k}={v}" for k, v in engine.items()),
             "  modules: " + ", ".join(f"{k}={v}" for k, v in modules.items())]
    set_fields = {k: v for k, v in fingerprint.items() if v is not None}
    lines.append("  fingerprint: " + ", ".join(f"{k}={v}" for k, v in set_fields.items()))
    environment = {k: v for k, v in (record.get("environment") or {}).items() if v is not None}
    lines.append("  worker environment: " + (", ".join(f"{k}={v}" for k, v in environment.items()) or "none set"))
    if record.get("ascend_config") is not None:
        lines.append("  ascend config: " + json.dumps(record["ascend_config"], default=str))
    from precision.backends.vllm_preflight import graph_mode_reasons

    reasons = graph_mode_reasons(record)
    lines.append("  graph mode: " + (", ".join(reasons) if reasons else "none (the model runs eagerly: hooks fire)"))
    return lines
