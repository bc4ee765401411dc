"""The argument parser of the command line: every command, option and help text (no work is done here)."""

from __future__ import annotations

import argparse
import importlib
import sys

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3
"""pass or warn; a verdict or regression failed; bad input or configuration; an internal error (a bug)."""

COMMAND_MODULES: tuple[str, ...] = ("precision.cli.parity_command", "precision.cli.canary_command", "precision.cli.msprobe_command",
                                     "precision.cli.doctor_command")
"""Commands that live in a module of their own: each has ``add_command(subparsers)``, which adds its parser and
sets ``handler`` (a function of the parsed arguments returning an exit code) as the parser's default. The modules
import nothing heavy at module level, so ``--help`` stays fast."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own exit code for usage errors is also 2; keep its message short
        self.print_usage(sys.stderr)
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def _add_capture_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--positions", help="positions to keep: all, last, or every:K (default: all)")
    p.add_argument("--layers", help="decoder layers to keep: all or a list like 0,15,31 (default: all)")
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE", help="option passed to the engine (vLLM LLM(...)); repeatable; values are JSON when they parse")
    p.add_argument("--additional-config", metavar="JSON", help="vllm-ascend additional_config, as a JSON object")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code to run (off unless asked)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output directory")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last finished prompt")


def _selftest_sweeps() -> tuple[str, ...]:
    from precision import SELFTEST_SWEEPS

    return tuple(SELFTEST_SWEEPS)


def _add_convention_option(p: argparse.ArgumentParser, default: str | None = "precision-check") -> None:
    p.add_argument("--metric-convention", choices=("precision-check", "msprobe"), default=default,
                   help="element-wise metric definitions: this tool's (default; relative errors with a 1e-6 denominator floor) or "
                        "msprobe's exact ones (Cosine, EucDist, MaxAbsErr, MaxRelativeErr, One/Five Thousandth(s) Err Ratio)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="precision-check", description="Measure, explain and report numerical differences between a reference LLM and an inference engine.")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    # Run options default to None (not given): a value given here overrides --config's [run] table, one not given does not.
    p = sub.add_parser("run", help="capture reference, FP32 truth and target; compare; report")
    p.add_argument("--prompts", help="a .jsonl prompt file or a directory of them (default: the shipped prompt sets, golden/ in a checkout)")
    p.add_argument("--model", help="Hugging Face model directory (default: the built-in synthetic Llama)")
    p.add_argument("--reference", help="reference backend spec (default: hf:cpu:bf16), or a golden store made by 'golden create'")
    p.add_argument("--target", help="target backend spec (default: vllm when installed, else hf:cpu:fp16)")
    p.add_argument("--truth", help="FP32 truth backend spec, or 'none' (default: hf:cpu:fp32)")
    p.add_argument("--out", help="run directory (default: runs/run-<UTC time>)")
    p.add_argument("--max-new-tokens", type=int, help="greedy continuation length per prompt unless the prompt sets its own (default: 32)")
    p.add_argument("--config", metavar="RUN_TOML", help="run configuration file: a [run] table holding any of these options (the flags given "
                                                        "override it), [thresholds], [serving.NAME]; see precision/run_file.py")
    p.add_argument("--threshold", action="append", metavar="NAME=VALUE", help="override one verdict threshold (over --config); repeatable")
    p.add_argument("--junit", metavar="FILE", help="also write JUnit XML (each prompt x check a test case) for CI systems")
    p.add_argument("--target-model", help="a different checkpoint for the target (a converted or quantized model of the same architecture)")
    p.add_argument("--target-variant", action="append", default=[], metavar="VARIANT",
                   help="implementation variant or planted fault for a transformers target, e.g. fault:scale-weight:2:1.01 (repeatable)")
    p.add_argument("--envelope", choices=("default", "none"), help="re-run the reference with implementation variants (default) or not")
    p.add_argument("--no-replay", action="store_true", help="skip the layer replay (local vs inherited error)")
    p.add_argument("--layer-streamed", action="store_true",
                   help="hold one layer's weights at a time in the reference, truth, envelope and replay (for a model larger than memory; "
                        "the same captures bit for bit, slower)")
    p.add_argument("--repeats", type=int, help="target runs per prompt for the determinism check (default: 3)")
    _add_convention_option(p, default=None)
    _add_capture_options(p)

    p = sub.add_parser("selftest", help="plant faults in a copy of the reference and check the analysis catches them")
    p.add_argument("--model", help="Hugging Face model directory (default: the built-in synthetic Llama)")
    p.add_argument("--prompts", default=None, help="prompt set (default: golden/default.jsonl)")
    p.add_argument("--out", help="work directory (default: runs/selftest-<UTC time>)")
    p.add_argument("--no-sweep", action="store_true", help="only the planted faults, no sensitivity sweep")
    p.add_argument("--sweep", action="append", choices=_selftest_sweeps(), metavar="NAME",
                   help=f"run only this sensitivity sweep (repeatable; one of: {', '.join(_selftest_sweeps())})")
    p.add_argument("--force", action="store_true")

    p = sub.add_parser("golden", help="create or verify a golden reference store")
    golden = p.add_subparsers(dest="golden_command", required=True, parser_class=_Parser)
    g = golden.add_parser("create", help="capture and store the reference, FP32 truth and envelope once")
    g.add_argument("--model", help="Hugging Face model directory (default: the built-in synthetic Llama)")
    g.add_argument("--prompts", required=True, help="prompt set the store is made for")
    g.add_argument("--out", required=True, help="store directory")
    g.add_argument("--force", action="store_true")
    g = golden.add_parser("verify", help="check every stored file against its recorded hash")
    g.add_argument("store")

    p = sub.add_parser("regress", help="compare a candidate build's run with a baseline build's run (same reference)")
    p.add_argument("baseline", help="run directory of the baseline build")
    p.add_argument("candidate", help="run directory of the candidate build")
    p.add_argument("--out", help="directory for regression.json and regression.md (default: the candidate run)")
    p.add_argument("--config", help="TOML file with a [regress] table (relative_tolerance, noise_factor, envelope_factor, top1_drop)")
    p.add_argument("--tolerance", action="append", metavar="NAME=VALUE", help="override one [regress] setting; repeatable")
    p.add_argument("--junit", metavar="FILE", help="also write JUnit XML (each prompt x site x metric a test case)")

    p = sub.add_parser("plant-fault", help="write a copy of a checkpoint with one layer's weight scaled (to test a gate)")
    p.add_argument("--model", required=True)
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--factor", type=float, required=True, help="e.g. 1.01")
    p.add_argument("--out", required=True, help="a new directory for the faulty copy (never the model directory)")
    p.add_argument("--force", action="store_true", help="replace a faulty copy this command wrote before")

    p = sub.add_parser("verify", help="recompute a run's comparison and verdict from its captures and check every hash")
    p.add_argument("run_dir", help="the --out directory of 'precision-check run'")

    p = sub.add_parser("capture", help="capture one backend into a capture directory")
    p.add_argument("--backend", required=True, help="backend spec, e.g. hf:cpu:bf16, hf:cuda:bf16, vllm")
    p.add_argument("--model", help="Hugging Face model directory (default: the built-in synthetic Llama)")
    p.add_argument("--prompts", help="prompt set (not needed with --teacher-forcing, which reuses the reference's token ids)")
    p.add_argument("--teacher-forcing", metavar="REFERENCE_CAPTURE", help="feed the token ids and continuations of this reference capture")
    p.add_argument("--out", required=True, help="capture directory to write")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--shard", metavar="I/N", help="capture only the I-th of N parts of the prompts (balanced by tokens; "
                                                  "join the parts with merge-captures)")
    _add_capture_options(p)

    p = sub.add_parser("merge-captures", help="merge the shard captures of 'capture --shard I/N' into one capture directory")
    p.add_argument("shards", nargs="+", metavar="SHARD", help="the capture directories of the shards, in any order")
    p.add_argument("--out", required=True, help="capture directory to write (the shards are never changed)")
    p.add_argument("--prompts", help="the prompt set the shards were captured from (a reference)")
    p.add_argument("--teacher-forcing", metavar="REFERENCE_CAPTURE", help="the reference capture the shards were fed (a target)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="as given to 'capture --shard' with --prompts (default: 32)")
    p.add_argument("--model", help="with --prompts: the model whose tokenizer rebuilds the plan (default: the shards' model path)")
    p.add_argument("--copy", action="store_true", help="copy the tensor files instead of hard-linking them")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own tokenizer code to run (off unless asked)")
    p.add_argument("--force", action="store_true", help="replace a capture precision-check wrote before in --out")

    p = sub.add_parser("compare", help="compare two capture directories into comparison.json")
    p.add_argument("expected", help="reference capture directory")
    p.add_argument("actual", help="target capture directory")
    p.add_argument("--truth", help="FP32 truth capture directory (enables R)")
    p.add_argument("--envelope-dir", help="directory of envelope member captures (captures/envelope of a run or a golden store)")
    p.add_argument("--replay", action="store_true", help="replay the reference layers on the target's inputs (loads the reference model)")
    _add_convention_option(p)
    p.add_argument("--out", required=True, help="directory for comparison.json")
    p.add_argument("--force", action="store_true")

    p = sub.add_parser("report", help="render report.html, summary.md and summary.json from a comparison")
    p.add_argument("comparison", help="comparison.json or the directory holding it")
    p.add_argument("--out", help="output directory (default: beside comparison.json)")
    p.add_argument("--config", help="TOML file with a [thresholds] table")
    p.add_argument("--threshold", action="append", metavar="NAME=VALUE", help="override one verdict threshold (over --config); repeatable")

    for module in COMMAND_MODULES:
        importlib.import_module(module).add_command(sub)
    return parser
