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
    from precision import doctor_lines, doctor_report

    report = doctor_report(args.backend, args.model)
    if args.json:
        print(json.dumps(report.to_json(), indent=2, default=str))
    else:
        print("\n".join(doctor_lines(report)))
    check = report.logprob_check
    return EXIT_FAILED if check is not None and check["status"] == "FAIL" else EXIT_OK
