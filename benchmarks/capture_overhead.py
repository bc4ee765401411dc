"""Capture overhead on vLLM (CPU build): precision.capture.writer.capture vs a plain greedy generate, ONE engine.

On the built-in model (precision.default_model.default_model_path()) and the default prompt set
(golden/default.jsonl, tokenized with precision.planning.plan_from_prompts), with one vLLM engine kept up:

    plain         backend.generate(prompt_ids, max_new_tokens) for every prompt (greedy, the plan's max_new_tokens)
    capture-all   precision.capture.writer.capture(backend, plan, tmpdir)  (positions=all: generate + teacher-forced
                  capture forward into tensors/NNNN.safetensors + sha256 + progress.jsonl + manifest.json)
    capture-last  the same with CaptureSelection(positions="last")

Each is timed ``--repeat`` times (default 3) in alternating order; reported: the median of the per-round ratios
capture / plain. A breakdown (same engine, same run) then splits a capture's extra time into: the extra forward
(a bare prefill of prompt + continuation, hooks idle), hooks + copies + compute_logits + safetensors write
(backend.capture minus that bare forward), sha256 + header listing, and the per-run fixed costs of capture()
(output dir, progress fsyncs, environment record, manifest, CaptureReader validation). ``--profile`` adds a
cProfile of one capture-all run (top functions printed, full dump under --work).

    .venv/bin/python benchmarks/capture_overhead.py [--work /tmp/bench] [--repeat 3] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENV_DEFAULTS = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/bench", help="scratch directory for the captures (default /tmp/bench)")
    parser.add_argument("--prompts", default=str(REPO / "golden" / "default.jsonl"))
    parser.add_argument("--repeat", type=int, default=3, help="rounds, alternating order; the median ratio is reported")
    parser.add_argument("--profile", action="store_true", help="also cProfile one capture-all run")
    parser.add_argument("--omp-threads", default="1",
                        help="OMP_NUM_THREADS when it is not set already (default 1; 'unset' leaves it unset: on this 2-core "
                             "machine one such run of vLLM's CPU build was ~40x slower and erratic, see benchmarks/README.md)")
    parser.add_argument("--json", default=None, help="write the results here (default WORK/capture_overhead.json)")
    args = parser.parse_args(argv)

    defaults = dict(ENV_DEFAULTS)
    if args.omp_threads != "unset":
        defaults["OMP_NUM_THREADS"] = args.omp_threads  # read by OpenMP at load time: set before torch is imported
    env_set = {k: v for k, v in defaults.items() if k not in os.environ}
    os.environ.update(env_set)
    work = Path(args.work) / "capture-overhead"
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VLLM_CACHE_ROOT", str(Path(args.work) / "vllm-cache"))
    sys.path.insert(0, str(REPO))

    from precision.backends import BackendOptions, create_backend
    from precision.capture import writer
    from precision.capture.sites import CaptureSelection
    from precision.default_model import default_model_path
    from precision.model import inspect_model
    from precision.planning import plan_from_prompts

    info = inspect_model(default_model_path())
    plan = plan_from_prompts(args.prompts, info)
    prompt_tokens = sum(len(p.prompt_ids) for p in plan.prompts)
    print(f"model {info.path} (hidden {info.hidden_size}, {info.num_layers} layers, vocab {info.vocab_size}); "
          f"{len(plan.prompts)} prompts, {prompt_tokens} prompt tokens, max_new_tokens {[p.max_new_tokens for p in plan.prompts]}", flush=True)
    print(f"env: {', '.join(f'{k}={os.environ.get(k)}' for k in [*ENV_DEFAULTS, 'OMP_NUM_THREADS', 'VLLM_CACHE_ROOT'])}", flush=True)
    selections = {"capture-all": CaptureSelection(), "capture-last": CaptureSelection(positions="last")}
    backend = create_backend("vllm", info, BackendOptions(max_model_len=min(plan.max_tokens_needed + 1, info.max_position_embeddings)))

    def plain() -> float:
        started = time.perf_counter()
        for p in plan.prompts:
            backend.generate(p.prompt_ids, p.max_new_tokens)
        return time.perf_counter() - started

    def run_capture(kind: str) -> float:
        out = work / kind
        shutil.rmtree(out, ignore_errors=True)
        started = time.perf_counter()
        writer.capture(backend, plan, out, selection=selections[kind], force=True, show_progress=False)
        seconds = time.perf_counter() - started
        shutil.rmtree(out, ignore_errors=True)
        return seconds

    measures = {"plain": plain, "capture-all": lambda: run_capture("capture-all"), "capture-last": lambda: run_capture("capture-last")}
    results: dict[str, list[float]] = {k: [] for k in measures}
    started = time.perf_counter()
    with backend:
        engine_start = time.perf_counter() - started
        print(f"engine up in {engine_start:.1f} s; warming up (one plain pass, one capture of each kind)", flush=True)
        for fn in measures.values():
            fn()
        order = list(measures)
        for round_ in range(args.repeat):
            for kind in (order if round_ % 2 == 0 else order[::-1]):
                results[kind].append(measures[kind]())
            print(f"  round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in results.items()), flush=True)
        breakdown = {kind: _breakdown(backend, plan, selections[kind], work / f"{kind}-parts") for kind in selections}
        profile = _profile(lambda: run_capture("capture-all"), work) if args.profile else None

    ratios = {kind: [c / p for c, p in zip(results[kind], results["plain"])] for kind in selections}
    summary = {
        "model": info.path, "prompts": len(plan.prompts), "prompt_tokens": prompt_tokens,
        "max_new_tokens": [p.max_new_tokens for p in plan.prompts], "repeat": args.repeat, "engine_start_seconds": engine_start,
        "env_set_by_benchmark": env_set, "env": {k: os.environ.get(k) for k in [*ENV_DEFAULTS, "OMP_NUM_THREADS", "VLLM_CACHE_ROOT"]},
        "seconds": results, "median_seconds": {k: statistics.median(v) for k, v in results.items()},
        "ratios": ratios, "median_ratio": {k: statistics.median(v) for k, v in ratios.items()},
        "breakdown": breakdown, "profile": profile, "cpus": os.cpu_count(),
    }
    Path(args.json or Path(args.work) / "capture_overhead.json").write_text(json.dumps(summary, indent=1))

    print()
    print(f"medians of {args.repeat} rounds (alternating order), one engine, {len(plan.prompts)} prompts")
    print(f"{'measurement':14s} {'seconds':>8s} {'per prompt':>11s} {'x plain':>8s}")
    for kind in measures:
        sec = summary["median_seconds"][kind]
        ratio = summary["median_ratio"].get(kind, 1.0)
        print(f"{kind:14s} {sec:8.3f} {sec / len(plan.prompts) * 1000:9.1f}ms {ratio:8.3f}")
    print("(x plain = median of the per-round ratios; target capture-all <= 1.3)")
    for kind, parts in breakdown.items():
        print(f"\nwhere {kind}'s time goes (sum over prompts, one pass, seconds):")
        for name, value in parts["seconds"].items():
            print(f"  {name:34s} {value:8.3f}")
        print(f"  file bytes written: {parts['bytes']:,}")
    if profile:
        print(f"\ncProfile of one capture-all run ({profile['path']}), top by cumulative time:")
        for line in profile["top"]:
            print("  " + line)
    return 0


def _breakdown(backend, plan, selection, scratch: Path) -> dict:
    """One pass split into parts: generate; bare prefill of the forced sequence (hooks idle); backend.capture
    (armed hooks + copies + compute_logits + save_file); sha256 + header listing; and capture()'s fixed costs."""
    from precision.capture import writer
    from precision.model import sha256_file

    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    parts = dict.fromkeys(("generate", "bare prefill (extra forward)", "backend.capture (forward+hooks+write)",
                           "sha256 + header listing"), 0.0)
    written = 0
    for index, p in enumerate(plan.prompts):
        t0 = time.perf_counter()
        generated = tuple(backend.generate(p.prompt_ids, p.max_new_tokens))
        t1 = time.perf_counter()
        forced = list(p.prompt_ids + generated)
        backend.generate(forced, 1)  # the same forward backend.capture runs, with the hooks disarmed
        t2 = time.perf_counter()
        path = scratch / f"{index:04d}.safetensors"
        backend.capture(forced, selection, path)
        t3 = time.perf_counter()
        sha256_file(path)
        writer._tensor_listing(path)
        t4 = time.perf_counter()
        written += path.stat().st_size
        parts["generate"] += t1 - t0
        parts["bare prefill (extra forward)"] += t2 - t1
        parts["backend.capture (forward+hooks+write)"] += t3 - t2
        parts["sha256 + header listing"] += t4 - t3
    parts["hooks+copies+logits+write (capture-prefill)"] = parts["backend.capture (forward+hooks+write)"] - parts["bare prefill (extra forward)"]
    out = scratch.parent / (scratch.name + "-whole")
    t0 = time.perf_counter()
    writer.capture(backend, plan, out, selection=selection, force=True, show_progress=False)
    whole = time.perf_counter() - t0
    parts["capture() whole"] = whole
    parts["capture() fixed costs (rest)"] = whole - parts["generate"] - parts["backend.capture (forward+hooks+write)"] - parts["sha256 + header listing"]
    # the fixed costs one by one (each once per capture() call)
    from precision.capture.reader import CaptureReader
    from precision.environment import environment_record

    t0 = time.perf_counter()
    environment_record()
    t1 = time.perf_counter()
    backend.describe()
    t2 = time.perf_counter()
    CaptureReader(out)
    t3 = time.perf_counter()
    parts["  of which environment_record()"] = t1 - t0
    parts["  of which backend.describe()"] = t2 - t1
    parts["  of which CaptureReader(out) check"] = t3 - t2
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(scratch, ignore_errors=True)
    return {"seconds": parts, "bytes": written}


def _profile(fn, work: Path) -> dict:
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    fn()
    profiler.disable()
    path = work / "capture-all.prof"
    profiler.dump_stats(str(path))
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(25)
    lines = [line for line in text.getvalue().splitlines() if line.strip() and ("(" in line or "ncalls" in line)]
    return {"path": str(path), "top": lines[:32]}


if __name__ == "__main__":
    raise SystemExit(main())
