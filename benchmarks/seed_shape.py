"""The whole `precision-check run` on the seed model's shape (benchmarks/seed_model.py: 3.93B parameters, random
weights, unit norm weights), per stage, against the three-capture baseline measured in the same run.

Each mode runs `precision-check run` once in a child process (3 short prompts of ~33 tokens, 8 new tokens):

    default    the default run: reference BF16, FP32 truth, envelope, target, compare + replay + report
    streamed   the same with --layer-streamed, in a memory cgroup capped below the FP32 model's size (cgroup v1
               memory.limit_in_bytes; page cache counts towards it and is reclaimed under the cap)

The streamed mode empties the page cache first (root), so that the checkpoint pages it reads count against its
cap. Stage times come from the captures' manifests (runtime_seconds: from the backend's start, model loading included, to
the last prompt written); "explanation" is the rest of the run's wall time (envelope members' captures are listed on
their own). The baseline is reference + truth + target capture time of the same run; the issue's target is
run total <= 2x baseline. Peak memory is the largest resident set of any process of the run (wait4 ru_maxrss, file-
backed pages included) and, when capped, the cgroup's peak usage. The streamed mode's captures are checked bit for
bit (sha256 of every tensor file) against the default mode's.

    .venv/bin/python benchmarks/seed_shape.py [--work /tmp/bench] [--modes default,streamed] [--cap-gb 12]
           [--target vllm] [--json FILE]
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
sys.path.insert(0, str(REPO / "benchmarks"))

PROMPTS = [
    {"id": "story-01", "category": "raw", "text": "Once upon a time, a small robot wa"},
    {"id": "facts-01", "category": "raw", "text": "The capital of France is Paris, an"},
    {"id": "code-01", "category": "raw", "text": "def fibonacci(n):\n    if n < 2:\n  "},
]
CGROUP = Path("/sys/fs/cgroup/memory")


def _capped(name: str, cap_bytes: int | None):
    """A preexec function putting the child into a fresh memory cgroup capped at ``cap_bytes`` (None: no cap)."""
    if cap_bytes is None:
        return None, None
    group = CGROUP / name
    group.mkdir(exist_ok=True)
    (group / "memory.limit_in_bytes").write_text(str(cap_bytes))
    (group / "memory.max_usage_in_bytes").write_text("0")

    def enter() -> None:
        (group / "cgroup.procs").write_text(str(os.getpid()))

    return enter, group


def _drop_page_cache() -> bool:
    """Empty the page cache (root only), so that the checkpoint pages the capped run reads are charged to its cgroup:
    pages another run left cached are charged to that run's cgroup and would not count against the cap."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError:
        return False
    return True


def _oom_kills(group: Path | None) -> int:
    """The cgroup's count of processes killed for memory so far (memory.oom_control's oom_kill; 0 without one)."""
    control = group / "memory.oom_control" if group is not None else None
    if control is None or not control.exists():
        return 0
    fields = dict(line.split() for line in control.read_text().splitlines() if len(line.split()) == 2)
    return int(fields.get("oom_kill", 0))


def run_mode(mode: str, model: Path, prompts: Path, work: Path, target: str, cap_bytes: int | None) -> dict:
    out = work / f"run-{mode}"
    command = [str(REPO / ".venv" / "bin" / "precision-check"), "-q", "run", "--prompts", str(prompts), "--model", str(model),
               "--target", target, "--out", str(out), "--force", "--max-new-tokens", "8"]
    if mode == "streamed":
        command.append("--layer-streamed")
    enter, group = _capped(f"precision-seed-{mode}", cap_bytes)
    kills_before = _oom_kills(group)
    dropped = _drop_page_cache() if group is not None else None
    started = time.perf_counter()
    log = work / f"run-{mode}.log"
    with open(log, "w") as sink:
        child = subprocess.Popen(command, preexec_fn=enter, stdout=sink, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)  # the child's own rusage: its largest resident set (ru_maxrss, KiB)
    wall = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    output = log.read_text(errors="replace")
    result = {"mode": mode, "command": " ".join(command), "exit": code, "wall_s": round(wall, 1),
              "peak_rss_gb_any_process": round(usage.ru_maxrss * 1024 / 1e9, 2)}
    if group is not None:
        result["cap_gb"] = round(cap_bytes / 1e9, 2)
        result["cgroup_peak_gb"] = round(int((group / "memory.max_usage_in_bytes").read_text()) / 1e9, 2)
        result["cgroup_oom_kills"] = _oom_kills(group) - kills_before
        result["page_cache_dropped_first"] = dropped
    if code not in (0, 1):
        result["output_tail"] = output[-3000:]
        return result
    captures = out / "captures"
    stages = {}
    for manifest in sorted(captures.rglob("manifest.json")):
        role = str(manifest.parent.relative_to(captures))
        stages[role] = json.loads(manifest.read_text())["runtime_seconds"]
    members = sum(t for role, t in stages.items() if role.startswith("envelope/"))
    baseline = stages.get("reference", 0) + stages.get("truth", 0) + stages.get("target", 0)
    summary = json.loads((out / "summary.json").read_text())
    result.update({
        "stages_s": {role: round(t, 1) for role, t in stages.items()},
        "envelope_members_s": round(members, 1),
        "explanation_after_captures_s": round(wall - sum(stages.values()), 1),
        "baseline_three_captures_s": round(baseline, 1),
        "run_over_baseline": round(wall / baseline, 2) if baseline else None,
        "verdict": summary["verdict"]["status"],
        "findings": [f"{f['rule']} {f['status']}: {f['message'][:160]}" for f in summary["verdict"]["findings"] if f["status"] != "PASS"],
        "hashes": {role: [p["sha256"] for p in json.loads((captures / role / "manifest.json").read_text())["prompts"]]
                   for role in stages if role != "target"},
    })
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench"))
    parser.add_argument("--modes", default="default,streamed")
    parser.add_argument("--cap-gb", type=float, default=12.0, help="memory cap of the streamed mode (the FP32 model is 15.7 GB)")
    parser.add_argument("--target", default="vllm")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from seed_model import build

    work = args.work / "seed-shape"
    work.mkdir(parents=True, exist_ok=True)
    model = build(args.work / "seed-model-unit", unit_norms=True)
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    results = []
    for mode in args.modes.split(","):
        cap = int(args.cap_gb * 1e9) if mode == "streamed" else None
        result = run_mode(mode, model, prompts, work, args.target, cap)
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "hashes"}, indent=1), flush=True)
    if len(results) == 2 and all("hashes" in r for r in results):
        a, b = (r["hashes"] for r in results)
        same = {role: a[role] == b.get(role) for role in a}
        print(json.dumps({"streamed_captures_bit_identical": same}, indent=1))
    (args.json or work / "seed_shape.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
