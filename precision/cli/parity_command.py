"""``precision-check parity``: serving configurations against the eager capture baseline (precision.serving)."""

from __future__ import annotations

import argparse

from precision.errors import PrecisionError


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
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="engine argument of the eager baseline, under every configuration's own (vLLM LLM(...)); repeatable")
    p.add_argument("--additional-config", metavar="JSON", help="vllm-ascend additional_config of the baseline, as a JSON object")
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens the reference generates per prompt (default: the prompt set's)")
    p.add_argument("--no-truth", action="store_true", help="skip the FP32 truth (R is then not measured)")
    p.add_argument("--envelope", choices=("default", "none"), default="default", help="implementation envelope members (default: default)")
    p.add_argument("--no-bisect", action="store_true", help="do not bisect failing configurations")
    p.add_argument("--threshold", action="append", metavar="NAME=VALUE", help="override one verdict threshold; repeatable")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--force", action="store_true", help="replace an earlier parity result in --out")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from pathlib import Path

    from precision import DEFAULT_ENVELOPE, ParityConfig, run_parity, serving_configurations
    from precision.cli.parser import EXIT_FAILED, EXIT_OK
    from precision.cli.values import engine_args, thresholds

    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise PrecisionError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    config = ParityConfig(
        prompts=Path(args.prompts), out=Path(args.out), serving=serving_configurations(args.serving, args.config),
        model=Path(args.model) if args.model else None,
        max_new_tokens=args.max_new_tokens, truth=not args.no_truth,
        envelope=DEFAULT_ENVELOPE if args.envelope == "default" else (), bisect=not args.no_bisect,
        thresholds=thresholds(args.config, args.threshold), force=args.force, show_progress=False,
        command=getattr(args, "command_line", None), engine_args=engine_args(args.engine_arg, args.additional_config),
    )
    result = run_parity(config)
    print("\n".join(result.lines()))
    return EXIT_FAILED if result.status.value == "FAIL" else EXIT_OK
