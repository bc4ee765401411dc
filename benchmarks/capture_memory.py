"""Peak memory of the vLLM engine process while it captures the 13.5k-token golden prompt, worker before vs after.

Each measured version runs in a FRESH process (this script started again with --child): the built-in model
(precision.default_model), golden/long-context.jsonl's one prompt tokenized with its chat template, one
in-process vLLM engine (VLLM_ENABLE_V1_MULTIPROCESSING=0, so the engine's worker IS this process), one
``backend.capture`` of the prompt's token ids with every position and layer.

Versions (``--worker``):
    after    the driver's worker extension, capturing with precision.backends.vllm_worker (host copies in the
             hooks, logits in chunks of bounded size)
    before   tests/backends/vllm_worker_before.py: the capture methods of commit 0b9e9a7's worker verbatim (tensors
             kept where the model computed them, logits of all rows in one compute_logits call)

Reported per version (every number is read in the child process):
    rss_before_capture_bytes   VmRSS just before the capture (after engine start and one warm-up generate)
    peak_rss_capture_bytes     VmHWM after the capture, the peak having been reset just before it by writing 5 to
                               /proc/self/clear_refs (Linux); null where the reset is refused
    peak_rss_growth_bytes      peak_rss_capture_bytes - rss_before_capture_bytes
    ru_maxrss_bytes            getrusage(RUSAGE_SELF).ru_maxrss x 1024: the whole process's peak, start-up included
    store_peak_bytes           the largest total, over every hook call of the capture, of numel x element_size of
                               the tensors in the worker's hook store (_precision_store), measured after each hook
    store_peak_device_bytes    the same counting only tensors not on the CPU (what would sit in device memory)
    logits_largest_call_bytes  the largest logits tensor one compute_logits call returned; logits_calls: how many
    capture_seconds            wall time of the capture call

    .venv/bin/python benchmarks/capture_memory.py [--worker before --worker after] [--work /tmp/capture-memory]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKERS = {"after": None, "before": "tests.backends.vllm_worker_before.BeforeWithDriverRpcs"}
"""The worker extension each version runs; None: the driver's own (precision.backends.vllm.WORKER_EXTENSION, whose
capture methods are precision.backends.vllm_worker's)."""
ENV_DEFAULTS = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                "OMP_NUM_THREADS": "1"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="append", choices=sorted(WORKERS), help="version(s) to measure (default: before, after)")
    parser.add_argument("--work", default="/tmp/capture-memory", help="scratch directory (capture files, vLLM cache)")
    parser.add_argument("--prompts", default=str(REPO / "golden" / "long-context.jsonl"))
    parser.add_argument("--json", default=None, help="write the results here (default WORK/capture_memory.json)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.child:
        print(json.dumps(measure(args.worker[0], Path(args.prompts), work)))
        return 0
    results = {}
    for worker in args.worker or ["before", "after"]:
        cmd = [sys.executable, __file__, "--child", "--worker", worker, "--work", str(work), "--prompts", args.prompts]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if done.returncode != 0:
            print(done.stderr[-4000:], file=sys.stderr)
            return 1
        results[worker] = json.loads(done.stdout.strip().splitlines()[-1])
        print(worker, json.dumps(results[worker], indent=1), flush=True)
    Path(args.json or work / "capture_memory.json").write_text(json.dumps(results, indent=1))
    return 0


def measure(worker: str, prompts: Path, work: Path) -> dict:
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("VLLM_CACHE_ROOT", str(work / "vllm-cache"))
    sys.path.insert(0, str(REPO))

    from precision.backends import BackendOptions, create_backend, vllm_compat
    from precision.capture.sites import CaptureSelection
    from precision.default_model import default_model_path
    from precision.model import inspect_model
    from precision.planning import plan_from_prompts

    import precision.backends.vllm as vllm_backend

    model = inspect_model(default_model_path())
    prompt = plan_from_prompts(prompts, model, max_new_tokens=16).prompts[0]
    ids = list(prompt.prompt_ids)
    qualified = WORKERS[worker] or vllm_backend.WORKER_EXTENSION
    extension = _instrumented(qualified)  # imported before the driver's name changes: "before" reads it
    vllm_backend.WORKER_EXTENSION = qualified
    counters = {"store_peak_bytes": 0, "store_peak_device_bytes": 0, "logits_largest_call_bytes": 0, "logits_calls": 0}
    extension._capture_memory_counters = counters
    compute_logits = vllm_compat.compute_logits

    def counted_compute_logits(model_, hidden):
        logits = compute_logits(model_, hidden)
        counters["logits_calls"] += 1
        if logits is not None:
            counters["logits_largest_call_bytes"] = max(counters["logits_largest_call_bytes"], logits.numel() * logits.element_size())
        return logits

    vllm_compat.compute_logits = counted_compute_logits
    with create_backend("vllm", model, BackendOptions(max_model_len=model.max_position_embeddings)) as engine:
        engine.generate(ids[:32], 1)  # warm-up: first-call allocations are not the capture's
        rss_before = _status_bytes("VmRSS")
        reset = _reset_peak_rss()
        start = time.perf_counter()
        engine.capture(ids, CaptureSelection(), work / f"{worker}.safetensors")
        seconds = time.perf_counter() - start
        peak = _status_bytes("VmHWM") if reset else None
    return {"worker": qualified, "prompt_id": prompt.id, "prompt_tokens": len(ids),
            "rss_before_capture_bytes": rss_before, "peak_rss_capture_bytes": peak,
            "peak_rss_growth_bytes": None if peak is None else peak - rss_before,
            "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, **counters,
            "capture_seconds": round(seconds, 3), "capture_file_bytes": (work / f"{worker}.safetensors").stat().st_size}


def _instrumented(qualified: str) -> type:
    """The worker extension class, its hooks wrapped to add up the store's bytes after every call."""
    import importlib

    module_name, class_name = qualified.rsplit(".", 1)
    extension = getattr(importlib.import_module(module_name), class_name)
    make_hook = extension._precision_hook

    def instrumented_hook(self, *args, **kwargs):
        hook = make_hook(self, *args, **kwargs)

        def counting(module, inputs, output):
            result = hook(module, inputs, output)
            counters = extension._capture_memory_counters
            tensors = list(self._precision_store.values())
            counters["store_peak_bytes"] = max(counters["store_peak_bytes"], sum(t.numel() * t.element_size() for t in tensors))
            device = sum(t.numel() * t.element_size() for t in tensors if t.device.type != "cpu")
            counters["store_peak_device_bytes"] = max(counters["store_peak_device_bytes"], device)
            return result

        return counting

    extension._precision_hook = instrumented_hook
    return extension


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(main())
