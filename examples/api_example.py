"""precision-check from Python: the whole job in one call, the same job step by step, and a reviewer's check.

    python examples/api_example.py MODEL_DIR WORK_DIR

MODEL_DIR: a Hugging Face Llama-family checkpoint (tests/models/stories260K is small enough to try);
WORK_DIR: a new or empty directory for the results. Small settings (one prompt, 4 new tokens, no FP32 truth,
envelope or replay) keep it to seconds; drop them for a real measurement. The target is transformers in FP16 so
that the example runs anywhere; use target="vllm" where vLLM is installed.
"""

from __future__ import annotations

import sys
from pathlib import Path

from precision import PrecisionError, RunConfig, capture_backend, compare, render_report, run, verify_run

PROMPT = '{"id": "story", "category": "raw", "text": "Once upon a time, there was a little girl named Lily."}\n'


def main(model: Path, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    prompts = work / "prompts.jsonl"
    prompts.write_text(PROMPT, encoding="utf-8")
    small = {"max_new_tokens": 4}

    # 1. The whole job (what `precision-check run` does): capture, compare, analyse, judge, report.
    config = RunConfig(prompts=prompts, out=work / "run", model=model, target="hf:cpu:fp16", truth=None, envelope=(), replay=False,
                       repeats=1, **small)
    result = run(config)
    print(f"run: {result.verdict.summary}; report at {result.files['report.html']}")

    # 2. The same job step by step (what the CPU box and the accelerator box do apart).
    reference = capture_backend("hf:cpu:bf16", work / "reference", model=model, prompts=prompts, **small)
    target = capture_backend("hf:cpu:fp16", work / "target", model=model, teacher_forcing=reference.path)
    comparison = compare(reference.path, target.path, work / "comparison")
    report = render_report(comparison)
    print(f"step by step: {report.verdict.summary}; report at {report.files['report.html']}")

    # 3. A reviewer's check: everything in the run directory is what its captures give.
    notes: list[str] = []
    problems = verify_run(result.out, notes)
    print("verify: " + ("verified" if not problems else f"{len(problems)} problem(s): {problems}"))
    return {"run": result, "step_by_step": report, "problems": problems, "notes": notes}


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    try:
        outcome = main(Path(sys.argv[1]), Path(sys.argv[2]))
    except PrecisionError as exc:  # bad input: the message says what and how to fix it
        sys.exit(f"error: {exc}")
    sys.exit(1 if outcome["problems"] or outcome["run"].verdict.status.value == "FAIL" else 0)
