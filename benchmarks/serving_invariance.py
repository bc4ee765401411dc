"""Which serving settings are BITWISE invariant on vLLM's CPU build, measured end to end (issue #15).

Every setting runs in a fresh vLLM engine (one engine at a time, each in its own process) on the same requests,
and is compared with the eager capture-safe baseline, the engine precision-check's vLLM backend starts for a
capture: enforce_eager=True, enable_prefix_caching=False, max_num_seqs=1, max_num_batched_tokens=max_model_len
(so vLLM's default chunked prefill never splits a prompt), dtype bfloat16, the backend's CPU environment.

The requests, identical for every engine (golden/default.jsonl tokenized by precision.planning; greedy, ignore_eos,
``--max-new-tokens`` new tokens; full-vocabulary logits for every prompt position and every generated token
through ``prompt_logprobs=-1, logprobs=-1`` with ``max_logprobs=-1, logprobs_mode="raw_logits"``):
    alone/<id>   each prompt alone, one generate call each (cold: nothing cached yet)
    again/<id>   each prompt a second time, alone (a prefix-caching engine serves it from cache: warm)
    shared/<id>  the prompt's first len-8 tokens followed by 8 tokens of another prompt (a shared-prefix hit)
    batch/<id>   all prompts plus one short request, 8 requests in ONE generate call (co-batched where
                 max_num_seqs allows; varied lengths)
Every request sets ``skip_reading_prefix_cache=False``: vLLM otherwise skips the prefix cache for any request that
asks for prompt logprobs. Positions served from cache have no logits (vLLM leaves those rows unwritten): only the
positions the engine computed are compared, and the number served from cache is reported.

Per setting and case, against the baseline's same requests (all numbers in float64):
    bitwise    every compared logit row and every generated token identical
    max |dlogit|, max |dlogprob|   largest absolute difference of a logit / of a log_softmax value (float64 from
               the float32 logits), over the prompt rows computed and the generated steps up to and including the
               first step whose token differs (later steps see other contexts)
    first diff the first request (in request order) and token position whose logits differ
    tokens     requests whose greedy tokens are identical, and the earliest divergence (token index)

    .venv/bin/python benchmarks/serving_invariance.py [--model builtin|stories|PATH ...] [--settings a,b] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENV_DEFAULTS = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
SHARED_TAIL = 8

# name -> (engine settings over the baseline, the case(s) of requests that show the setting, what it is)
SETTINGS: dict[str, tuple[dict, tuple[str, ...], str]] = {
    "baseline-repeat": ({}, ("alone",), "the baseline again in a fresh engine (control: run-to-run)"),
    "prefix-caching": ({"enable_prefix_caching": True}, ("alone", "again", "shared"), "prefix caching (enable_prefix_caching=True)"),
    "chunked-16": ({"enable_chunked_prefill": True, "max_num_batched_tokens": 16}, ("alone",), "chunked prefill, 16-token chunks"),
    "chunked-64": ({"enable_chunked_prefill": True, "max_num_batched_tokens": 64}, ("alone",), "chunked prefill, 64-token chunks"),
    "cobatch-8": ({"max_num_seqs": 8}, ("batch", "alone"), "8 requests of varied lengths co-batched (max_num_seqs=8)"),
    "tp-2": ({"tensor_parallel_size": 2, "distributed_executor_backend": "mp"}, ("alone",), "tensor parallel 2 (multiprocess)"),
    "compiled": ({"enforce_eager": False}, ("alone",), "compiled mode (enforce_eager=False)"),
    "kv-fp8": ({"kv_cache_dtype": "fp8"}, ("alone",), "FP8 KV cache (kv_cache_dtype=fp8)"),
    "float32": ({"dtype": "float32"}, ("alone",), "dtype float32 instead of bfloat16 (control: changes numerics)"),
}


def model_path(name: str) -> tuple[str, str]:
    """(label, directory vLLM loads): the built-in model, stories260K's exact head-padded copy, or a path."""
    from precision.default_model import cache_root, default_model_path

    if name == "builtin":
        return name, str(default_model_path())
    path = REPO / "tests" / "models" / "stories260K" if name == "stories" else Path(name)
    from precision.backends.head_padding import pad_heads
    from precision.model import inspect_model

    config = json.loads((path / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if head_dim % 32 == 0:
        return path.name, str(path)
    return path.name, str(pad_heads(inspect_model(path), 32, cache_root() / "models"))  # what the vLLM backend runs


def requests_for(original: str, prompts: str) -> tuple[list[dict], int]:
    """The request list (phase, id, token ids) and max_model_len for the model at ``original``."""
    from precision.model import inspect_model
    from precision.planning import plan_from_prompts

    model = inspect_model(original)
    plan = plan_from_prompts(prompts, model, max_new_tokens=16)
    ids = [(p.id, list(p.prompt_ids)) for p in plan.prompts]
    requests = [{"phase": "alone", "id": i, "tokens": t} for i, t in ids]
    requests += [{"phase": "again", "id": i, "tokens": t} for i, t in ids]
    for (i, t), (_, other) in zip(ids, ids[1:] + ids[:1]):
        requests.append({"phase": "shared", "id": i, "tokens": t[:-SHARED_TAIL] + other[-SHARED_TAIL:]})
    requests += [{"phase": "batch", "id": i, "tokens": t} for i, t in ids]
    requests.append({"phase": "batch", "id": "short", "tokens": ids[0][1][:12]})
    return requests, min(model.max_position_embeddings, 1024)


# -- the child: one engine, every request, arrays out -------------------------------------------------------------
def run_engine(spec: dict) -> None:
    import numpy as np
    from vllm import LLM, SamplingParams

    kwargs = spec["engine"]
    started = time.perf_counter()
    llm = LLM(model=spec["model"], tokenizer=spec["model"], max_logprobs=-1, logprobs_mode="raw_logits", **kwargs)
    start_s = time.perf_counter() - started
    facts = engine_facts(llm, in_process=kwargs.get("tensor_parallel_size", 1) == 1)
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_new_tokens"], ignore_eos=True, prompt_logprobs=-1, logprobs=-1,
                            detokenize=False, skip_reading_prefix_cache=False)
    arrays, cached, served = {}, {}, time.perf_counter()
    requests = spec["requests"]
    for phase in ("alone", "again", "shared", "batch"):
        batch = [r for r in requests if r["phase"] == phase]
        groups = [batch] if phase == "batch" else [[r] for r in batch]
        for group in groups:
            outputs = llm.generate([{"prompt_token_ids": r["tokens"]} for r in group], params, use_tqdm=False)
            for request, output in zip(group, outputs):
                key = f"{phase}/{request['id']}"
                vocab = spec["vocab"]
                arrays[key + "/prompt"] = _rows(output.prompt_logprobs[1:], vocab, np)
                arrays[key + "/decode"] = _rows(output.outputs[0].logprobs, vocab, np)
                arrays[key + "/tokens"] = np.asarray(output.outputs[0].token_ids, dtype=np.int64)
                cached[key] = int(output.num_cached_tokens or 0)
    serve_s = time.perf_counter() - served
    np.savez(spec["out"] + ".npz", **{k.replace("/", "|"): v for k, v in arrays.items()})
    Path(spec["out"] + ".json").write_text(json.dumps({"start_s": start_s, "serve_s": serve_s, "cached": cached, "facts": facts}, indent=1))


def _rows(dicts, vocab: int, np) -> "np.ndarray":
    """[rows, vocab] float32 from vLLM's per-position {token: Logprob}. Rows of positions served from the prefix
    cache are never written by vLLM (uninitialised memory, token ids included): ids outside the vocabulary are
    skipped there, and those rows are never compared."""
    rows = np.full((len(dicts), vocab), np.nan, dtype=np.float32)
    for index, entry in enumerate(dicts):
        for token, logprob in entry.items():
            if 0 <= token < vocab:
                rows[index, token] = logprob.logprob
    return rows


def engine_facts(llm, *, in_process: bool) -> dict:
    """What the engine really ran: its compilation mode, and (in-process) the KV cache tensors and attention
    implementation's dtype record, read in the worker: an accepted setting is not necessarily an applied one."""
    config = llm.llm_engine.vllm_config
    facts = {"compilation_mode": str(config.compilation_config.mode), "cudagraph_mode": str(config.compilation_config.cudagraph_mode),
             "cache_dtype": config.cache_config.cache_dtype, "block_size": config.cache_config.block_size,
             "enable_chunked_prefill": config.scheduler_config.enable_chunked_prefill,
             "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens}
    if in_process:
        facts["worker"] = llm.collective_rpc(_worker_facts)[0]
    return facts


def _worker_facts(worker) -> dict:
    runner = worker.model_runner
    layers = runner.vllm_config.compilation_config.static_forward_context
    name, layer = next((n, l) for n, l in layers.items() if hasattr(l, "impl"))
    kv = getattr(runner, "kv_caches", None) or []
    return {"kv_cache_tensors": sorted({f"{t.dtype} {tuple(t.shape)}" for t in kv}), "attention_layer": name,
            "attention_impl": type(layer.impl).__name__, "impl_kv_cache_dtype": getattr(layer.impl, "kv_cache_dtype", None),
            "impl_is_fp8_kv_cache": getattr(layer.impl, "is_fp8_kv_cache", None),
            # vLLM's @support_torch_compile sets this on the decoder: False means its forward runs compiled.
            "decoder_do_not_compile": getattr(getattr(runner.get_model(), "model", None), "do_not_compile", None)}


# -- the parent: engines one at a time, then the comparison ------------------------------------------------------
def baseline_engine(max_model_len: int) -> dict:
    """The vLLM backend's capture-safe settings (precision.backends.vllm.VllmBackend.engine_kwargs)."""
    return {"dtype": "bfloat16", "enforce_eager": True, "enable_prefix_caching": False, "max_model_len": max_model_len,
            "max_num_batched_tokens": max_model_len, "max_num_seqs": 1, "seed": 0, "trust_remote_code": False}


def launch(name: str, engine: dict, model: str, vocab: int, requests: list, work: Path, max_new_tokens: int) -> dict:
    out = work / name
    spec = {"engine": engine, "model": model, "vocab": vocab, "requests": requests, "out": str(out), "max_new_tokens": max_new_tokens}
    (work / f"{name}.spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "VLLM_CACHE_ROOT": str(work / "vllm-cache" / name)}
    if engine.get("tensor_parallel_size", 1) > 1:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"  # tensor parallel workers are processes
    began = time.perf_counter()
    with open(work / f"{name}.log", "w") as log:
        done = subprocess.run([sys.executable, __file__, "--child", str(work / f"{name}.spec.json")], env=env, stdout=log,
                              stderr=subprocess.STDOUT, cwd=REPO, timeout=1800)
    wall = time.perf_counter() - began
    if done.returncode != 0:
        tail = (work / f"{name}.log").read_text()[-1500:]
        return {"error": f"exit {done.returncode}: ...{tail}", "process_s": wall}
    return {**json.loads(out.with_suffix(".json").read_text()), "process_s": wall}


def compare_case(base: dict, other: dict, requests: list, phase: str, cached: dict) -> dict:
    import numpy as np

    keys = [f"{phase}/{r['id']}" for r in requests if r["phase"] == phase]
    result = {"bitwise": True, "max_abs_logit": 0.0, "max_abs_logprob": 0.0, "first_diff": None, "requests": len(keys),
              "tokens_identical": 0, "first_token_divergence": None, "rows_compared": 0, "positions_from_cache": 0}
    for key in keys:
        k = key.replace("/", "|")
        start = cached.get(key, 0)  # rows before it were served from cache and never computed
        result["positions_from_cache"] += start
        tokens_e, tokens_a = base[k + "|tokens"], other[k + "|tokens"]
        same = next((i for i, (x, y) in enumerate(zip(tokens_e, tokens_a)) if x != y), None)
        if same is None and len(tokens_e) == len(tokens_a):
            result["tokens_identical"] += 1
        else:
            where = same if same is not None else min(len(tokens_e), len(tokens_a))
            first = result["first_token_divergence"]
            result["first_token_divergence"] = where if first is None else min(first, where)
            result["bitwise"] = False
        steps = len(tokens_e) if same is None else same + 1
        for part, lo, hi, offset in (("prompt", start, None, 0), ("decode", 0, steps, None)):
            e = base[f"{k}|{part}"][lo:hi].astype(np.float64)
            a = other[f"{k}|{part}"][lo:hi].astype(np.float64)
            result["rows_compared"] += len(e)
            if not len(e):
                continue
            diff = np.abs(a - e)
            lse = lambda x: x - (np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True)) + x.max(1, keepdims=True))
            result["max_abs_logit"] = max(result["max_abs_logit"], float(diff.max()))
            result["max_abs_logprob"] = max(result["max_abs_logprob"], float(np.abs(lse(a) - lse(e)).max()))
            rows = np.flatnonzero((a != e).any(1))
            if len(rows):
                result["bitwise"] = False
                if result["first_diff"] is None:
                    result["first_diff"] = f"{key} position {int(rows[0]) + lo}" if part == "prompt" else f"{key} new token {int(rows[0])}"
    return result


CASE_WORDS = {"alone": "alone, cold", "again": "same prompt again (warm)", "shared": "shared prefix (warm)", "batch": "co-batched, 8 requests"}


def markdown_table(results: list[dict]) -> str:
    """The invariance table as the README shows it: one row per setting and case it is shown for."""
    lines = ["| model | setting | requests | bitwise equal | max abs logit diff | max abs logprob diff | first differing | greedy tokens identical (first divergence) | positions from cache | engine start s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    kept: dict[tuple[str, str], dict] = {}
    for row in results:  # merged files: the first run of a setting that ran, else its error
        key = (row["model"], row["setting"])
        if key not in kept or ("error" in kept[key] and "error" not in row):
            kept[key] = row
    results = list(kept.values())
    models = list(dict.fromkeys(row["model"] for row in results))
    order = ["baseline", *SETTINGS]
    for row in sorted(results, key=lambda r: (models.index(r["model"]), order.index(r["setting"]))):
        if row["setting"] == "baseline":
            lines.append(f"| {row['model']} | baseline (eager, capture-safe) | | | | | | | | {row['start_s']:.1f} |")
            continue
        if "error" in row:
            lines.append(f"| {row['model']} | {row['what']} | | did not run: {row['error'].splitlines()[-1][:200]} | | | | | | |")
            continue
        for case in row["shown"]:
            c = row["cases"][case]
            what = "prefix caching (enable_prefix_caching=True)" if row["setting"] == "prefix-caching" else row["what"]
            divergence = "" if c["first_token_divergence"] is None else f" (token {c['first_token_divergence']})"
            lines.append(f"| {row['model']} | {what} | {CASE_WORDS[case]} | {'yes' if c['bitwise'] else 'no'} | {c['max_abs_logit']:.3g} | "
                         f"{c['max_abs_logprob']:.3g} | {c['first_diff'] or '-'} | {c['tokens_identical']}/{c['requests']}{divergence} | "
                         f"{c['positions_from_cache']} | {row['start_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", action="append", help="builtin, stories or a model directory (repeatable; default both)")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names (default: all): " + ", ".join(SETTINGS))
    parser.add_argument("--prompts", default=str(REPO / "golden" / "default.jsonl"))
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--work", default="/tmp/serving-invariance", help="scratch directory (default /tmp/serving-invariance)")
    parser.add_argument("--json", default=None, help="results file (default WORK/serving_invariance.json; the table beside it as .md)")
    parser.add_argument("--reuse-baseline", action="store_true", help="reuse WORK's baseline arrays from an earlier run of the same requests")
    parser.add_argument("--table", nargs="+", default=None, help="print the table of existing results files (merged) and stop")
    args = parser.parse_args(argv)
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    sys.path.insert(0, str(REPO))
    if args.child:
        run_engine(json.loads(Path(args.child).read_text()))
        return 0
    if args.table:
        print(markdown_table([row for table in args.table for row in json.loads(Path(table).read_text())]))
        return 0
    import numpy as np

    names = [n for n in args.settings.split(",") if n]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        parser.error(f"unknown setting(s) {unknown}; choose from {list(SETTINGS)}")
    results = []
    for model_name in args.model or ["builtin", "stories"]:
        label, path = model_path(model_name)
        original = str(REPO / "tests" / "models" / "stories260K") if model_name == "stories" else path
        requests, max_model_len = requests_for(original, args.prompts)
        vocab = json.loads((Path(path) / "config.json").read_text())["vocab_size"]
        work = Path(args.work) / label
        work.mkdir(parents=True, exist_ok=True)
        base_engine = baseline_engine(max_model_len)
        print(f"== {label} ({path}), {len(requests)} requests per engine, max_model_len {max_model_len}", flush=True)
        earlier = work / "baseline.json"
        if args.reuse_baseline and earlier.is_file() and json.loads((work / "baseline.spec.json").read_text())["requests"] == requests:
            base = {**json.loads(earlier.read_text()), "process_s": float("nan")}
        else:
            base = launch("baseline", base_engine, path, vocab, requests, work, args.max_new_tokens)
        if "error" in base:
            raise SystemExit(f"the baseline engine failed: {base['error']}")
        base_arrays = dict(np.load(work / "baseline.npz"))
        print(f"baseline: engine start {base['start_s']:.1f} s, process {base['process_s']:.1f} s", flush=True)
        for name in names:
            overrides, cases, what = SETTINGS[name]
            engine = {**base_engine, **overrides}
            run = launch(name, engine, path, vocab, requests, work, args.max_new_tokens)
            row = {"model": label, "setting": name, "what": what, "engine": overrides, "process_s": run["process_s"]}
            if "error" in run:
                row["error"] = run["error"]
                print(f"{name}: FAILED TO RUN: {run['error'][-300:]}", flush=True)
                results.append(row)
                continue
            arrays = dict(np.load(work / f"{name}.npz"))
            row.update(start_s=run["start_s"], serve_s=run["serve_s"], facts=run["facts"],
                       cases={case: compare_case(base_arrays, arrays, requests, case, run["cached"]) for case in ("alone", "again", "shared", "batch")},
                       shown=list(cases))
            results.append(row)
            for case in cases:
                c = row["cases"][case]
                print(f"{name} [{case}]: bitwise {c['bitwise']}, max|dlogit| {c['max_abs_logit']:.3g}, max|dlogprob| {c['max_abs_logprob']:.3g}, "
                      f"first diff {c['first_diff']}, tokens {c['tokens_identical']}/{c['requests']} (first divergence {c['first_token_divergence']}), "
                      f"cached positions {c['positions_from_cache']}; start {run['start_s']:.1f} s", flush=True)
        results.append({"model": label, "setting": "baseline", "start_s": base["start_s"], "process_s": base["process_s"], "facts": base["facts"]})
    out = Path(args.json) if args.json else Path(args.work) / "serving_invariance.json"
    out.write_text(json.dumps(results, indent=1, default=str))
    out.with_suffix(".md").write_text(markdown_table(results))
    print(markdown_table(results))
    print(f"results: {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
