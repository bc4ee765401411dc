"""``precision-check parity``: serving configurations against the eager capture baseline (precision.serving)."""

from __future__ import annotations

import argparse
import json
import re

from precision.errors import PrecisionError

_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def add_command(subparsers) -> None:
    p = subparsers.add_parser(
        "parity", help="does a serving configuration compute what the eager capture computes? (prefix cache, chunked prefill, "
                       "co-batching, tensor parallel, compiled mode)",
        description="Captures the eager baseline (vLLM, one request at a time) and each serving configuration on the same "
                    "teacher-forced sequences, compares them with the cross-engine rules and bisects a failing configuration "
                    "to the setting responsible.")
    p.add_argument("--model", help="Hugging Face model directory (default: the built-in model)")
    p.add_argument("--prompts", required=True, help="prompt set (.jsonl file or directory of them)")
    p.add_argument("--serving", action="append", default=[], metavar="NAME:key=value,key=value",
                   help="a serving configuration: engine arguments over the baseline's (values are JSON when they parse), plus "
                        "workload=alone|cobatch|warm-prefix and companions=N; repeatable")
    p.add_argument("--config", help="TOML file with [serving.NAME] tables (and [thresholds])")
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens the reference generates per prompt (default: the prompt set's)")
    p.add_argument("--no-truth", action="store_true", help="skip the FP32 truth (R is then not measured)")
    p.add_argument("--envelope", choices=("default", "none"), default="default", help="implementation envelope members (default: default)")
    p.add_argument("--no-bisect", action="store_true", help="do not bisect failing configurations")
    p.add_argument("--threshold", action="append", metavar="NAME=VALUE", help="override one verdict threshold; repeatable")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--force", action="store_true", help="replace an earlier parity result in --out")
    p.set_defaults(handler=handle)


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_serving(spec: str) -> tuple[str, dict]:
    """``NAME:key=value,key=value`` -> (name, settings). A JSON value may not contain a comma."""
    name, sep, body = spec.partition(":")
    if not sep or not _NAME.match(name):
        raise PrecisionError(f"--serving {spec!r}: write it as NAME:key=value,key=value, e.g. --serving chunked:max_num_batched_tokens=16,"
                             "enable_chunked_prefill=true (NAME of letters, digits, '-', '_')")
    settings = {}
    for pair in filter(None, (part.strip() for part in body.split(","))):
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise PrecisionError(f"--serving {spec!r}: {pair!r} is not key=value")
        settings[key.strip()] = _value(value.strip())
    return name, settings


def serving_configurations(specs: list[str], config_path: str | None):
    from precision.cli.values import config_table
    from precision.serving.engine import ServingConfig

    tables = config_table(config_path, "serving")
    if not isinstance(tables, dict) or any(not isinstance(v, dict) for v in tables.values()):
        raise PrecisionError(f"{config_path}: [serving] must hold tables [serving.NAME] of engine settings")
    configs = [ServingConfig.from_mapping(name, values) for name, values in tables.items()]
    configs += [ServingConfig.from_mapping(*parse_serving(spec)) for spec in specs]
    return tuple(configs)


def handle(args: argparse.Namespace) -> int:
    from pathlib import Path

    from precision.analysis.envelope import DEFAULT_MEMBERS
    from precision.cli.parser import EXIT_FAILED, EXIT_OK
    from precision.cli.values import thresholds
    from precision.prompts import DEFAULT_MAX_NEW_TOKENS
    from precision.serving.parity import ParityConfig, run_parity

    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise PrecisionError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    config = ParityConfig(
        prompts=Path(args.prompts), out=Path(args.out), serving=serving_configurations(args.serving, args.config),
        model=Path(args.model) if args.model else None,
        max_new_tokens=args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS, truth=not args.no_truth,
        envelope=DEFAULT_MEMBERS if args.envelope == "default" else (), bisect=not args.no_bisect,
        thresholds=thresholds(args.config, args.threshold), force=args.force, show_progress=False,
        command=getattr(args, "command_line", None),
    )
    result = run_parity(config)
    for row in result.document["configurations"]:
        print(f"{row['name']}: {row['verdict']} ({row['level']}; largest difference {row['largest']['relative_l2']:.3g} at "
              f"{row['largest']['site']}; first bitwise difference {row['first_bitwise_site'] or 'none'})")
    print(f"parity {result.status.value}: {result.out / 'report.html'}")
    return EXIT_FAILED if result.status.value == "FAIL" else EXIT_OK
