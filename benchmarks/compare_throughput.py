"""Throughput and peak memory of ``compare_captures`` on a multi-GB capture pair, against baselines run in the same process tree.

What it does (see benchmarks/README.md for the figures measured and how to read them):

1. Builds, once, a synthetic capture PAIR in the real capture format (manifest.json schema_version 1 +
   tensors/NNNN.safetensors, accepted by precision.capture.reader.CaptureReader) under ``--work`` (default
   /tmp/bench). Shape like Nanbeige4-3B: hidden 2560, 32 decoder layers, sites embed, layer.0..31, final_norm,
   logits, all bf16, every position kept. The vocabulary is ``--vocab`` (default Nanbeige's 166144, where the
   logits are two thirds of the bytes; --vocab 32000 for a smaller one). Prompts are added until one
   side holds at least ``--gb`` GiB of tensor bytes. The "actual" side is the expected side times
   (1 + 5e-3 * N(0,1)) per element, rounded to bf16 (relative L2 ~5e-3, like BF16 engine vs engine), same token ids.
   The same tensors are also written as an msprobe (mindstudio-probe) PyTorch dump (dump.json + .pt files) when
   msprobe is installed in a separate venv (``--msprobe-venv``, default WORK/msprobe-venv).
2. Measures, each in its own subprocess (peak RSS = the largest process, from wait4, and the sampled sum over the
   process tree), with the page cache warmed by reading every file first:
     ours      compare_captures(expected, actual, verify=False); with --verify also a whole verify=True run
     baseline  numpy over the same safetensors bytes: np.memmap of each tensor, bf16 bits -> float32 in
               chunks, sum((a - e)^2) and sum(e^2): the machine's speed of reading memory and reducing it
     sha256    hashlib over both sides' files: exactly what verify=True adds
     msprobe   `msprobe compare -tp actual/dump.json -gp expected/dump.json` (its PyTorch dump format)
   and prints a table of seconds, GB/s (one side's tensor bytes / seconds), ratios and peak RSS.

    .venv/bin/python benchmarks/compare_throughput.py [--work /tmp/bench] [--gb 4] [--repeat 1] [--verify] [--no-msprobe]

Each run of the measurements takes ~5 minutes here (~9 with --verify) plus ~2.5 minutes for the first build; the
time is almost all compare_captures and msprobe.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GIB = 1 << 30
NOISE_REL = 5e-3
CONTINUATION = 32
FORMAT_VERSION = 2  # bump when the generated data changes


# ----------------------------------------------------------------------------------------------------------------------
# building the data
# ----------------------------------------------------------------------------------------------------------------------
def dataset_dir(args) -> Path:
    return Path(args.work) / f"compare-h{args.hidden}-l{args.layers}-v{args.vocab}-p{args.positions}-gb{args.gb:g}"


def shape_of(args) -> dict:
    sites = ["embed", *(f"layer.{i}" for i in range(args.layers)), "final_norm"]
    per_prompt = len(sites) * args.positions * args.hidden * 2 + args.positions * args.vocab * 2 + args.positions * 8
    prompts = max(1, math.ceil(args.gb * GIB / per_prompt))
    return {"sites": sites, "per_prompt_bytes": per_prompt, "prompts": prompts, "tensor_bytes": prompts * per_prompt}


def _site_scale(site: str, layers: int) -> float:
    """Residual-stream size growing through the layers, roughly like a real model's."""
    if site == "embed":
        return 0.05
    if site == "final_norm":
        return 1.0
    return 0.2 + 4.0 * int(site.split(".")[1]) / max(layers - 1, 1)


def _pair(shape, scale: float, generator):
    """(expected, actual) bf16 tensors: actual = expected * (1 + NOISE_REL * N(0,1)), rounded to bf16."""
    import torch

    e32 = torch.randn(shape, generator=generator) * scale
    e32[:, :: max(1, shape[1] // 4)] *= 8.0  # a few large channels, as in real hidden states
    expected = e32.to(torch.bfloat16)
    e32 = expected.float()
    noise = torch.randn(shape, generator=generator)
    noise.mul_(NOISE_REL).add_(1.0).mul_(e32)
    actual = noise.to(torch.bfloat16)
    return expected, actual


def _tensor_listing(path: Path) -> dict:
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    return {name: {"shape": info["shape"], "dtype": info["dtype"]} for name, info in header.items() if name != "__metadata__"}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _msprobe_entry(tensor, data_name: str) -> dict:
    import torch

    f = tensor.float()
    return {"type": "torch.Tensor", "dtype": "torch.bfloat16", "shape": list(tensor.shape),
            "Max": float(f.max()), "Min": float(f.min()), "Mean": float(f.mean()), "Norm": float(torch.linalg.vector_norm(f)),
            "requires_grad": False, "data_name": data_name}


def _msprobe_module(site: str, call: int) -> str:
    """The module names msprobe's L0 dump gives a Llama model's modules."""
    if site == "embed":
        return f"Module.model.embed_tokens.Embedding.forward.{call}"
    if site == "final_norm":
        return f"Module.model.norm.LlamaRMSNorm.forward.{call}"
    if site == "logits":
        return f"Module.lm_head.Linear.forward.{call}"
    return f"Module.model.layers.{site.split('.')[1]}.LlamaDecoderLayer.forward.{call}"


def build(args, with_msprobe: bool) -> Path:
    """Write the capture pair (and the msprobe dumps) once; reuse them when the marker says they are complete."""
    import torch
    from safetensors.torch import save_file

    from precision.capture import manifest as schema
    from precision.environment import environment_record, utc_now

    root = dataset_dir(args)
    shape = shape_of(args)
    marker = root / "built.json"
    wanted = {"version": FORMAT_VERSION, "hidden": args.hidden, "layers": args.layers, "vocab": args.vocab,
              "positions": args.positions, "prompts": shape["prompts"], "noise_rel": NOISE_REL}
    have = json.loads(marker.read_text()) if marker.is_file() else None
    if have and {k: have.get(k) for k in wanted} == wanted and (have.get("msprobe") or not with_msprobe):
        return root
    if root.exists():
        shutil.rmtree(root)
    print(f"building {shape['prompts']} prompts x {shape['per_prompt_bytes'] / 1e6:.0f} MB per side "
          f"({shape['tensor_bytes'] / GIB:.2f} GiB per side) in {root} ...", flush=True)
    started = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)
    sides = ("expected", "actual")
    records = {side: [] for side in sides}
    dumps = {side: {} for side in sides}
    for side in sides:
        (root / side / schema.TENSOR_DIR).mkdir(parents=True)
        if with_msprobe:
            (root / "msprobe" / side / "dump_tensor_data").mkdir(parents=True)
    generator = torch.Generator().manual_seed(20261127)
    token_gen = torch.Generator().manual_seed(7)
    for index in range(shape["prompts"]):
        ids = torch.randint(0, args.vocab, (args.positions,), generator=token_gen).tolist()
        prompt_ids, continuation = ids[:-CONTINUATION], ids[-CONTINUATION:]
        tensors = {side: {} for side in sides}
        for site in [*shape["sites"], "logits"]:
            if site == "logits":
                e, a = _pair((args.positions, args.vocab), 3.0, generator)
            else:
                e, a = _pair((args.positions, args.hidden), _site_scale(site, args.layers), generator)
            tensors["expected"][site], tensors["actual"][site] = e, a
        for side in sides:
            tensors[side]["positions"] = torch.arange(args.positions, dtype=torch.int64)
            name = schema.tensor_file_name(index)
            path = root / side / name
            save_file(tensors[side], str(path))
            records[side].append({
                "index": index, "id": f"synthetic-{index:03d}", "category": "synthetic", "rendering": "raw",
                "prompt_ids": prompt_ids, "continuation_ids": continuation, "generated_ids": continuation,
                "file": name, "sha256": _sha256(path), "bytes": path.stat().st_size, "tensors": _tensor_listing(path),
                "determinism": None,
            })
            if with_msprobe:
                data_dir = root / "msprobe" / side / "dump_tensor_data"
                for site in [*shape["sites"], "logits"]:
                    module = _msprobe_module(site, index)
                    data_name = f"{module}.output.0.pt"
                    torch.save(tensors[side][site].clone(), data_dir / data_name)
                    dumps[side][module] = {"input_args": [], "input_kwargs": {}, "output": [_msprobe_entry(tensors[side][site], data_name)]}
        print(f"  prompt {index + 1}/{shape['prompts']} written ({time.perf_counter() - started:.0f} s)", flush=True)
        del tensors
    model = {"path": "/synthetic/nanbeige4-3b-shaped", "architecture": "LlamaForCausalLM", "num_layers": args.layers,
             "hidden_size": args.hidden, "vocab_size": args.vocab, "max_position_embeddings": 32768,
             "stop_token_ids": [2], "config_sha256": "0" * 64, "weights_sha256": {}}
    tokenizer = {"class": "SyntheticTokenizer", "vocab_size": args.vocab, "bos_token_id": None, "eos_token_id": 2,
                 "has_chat_template": False, "chat_template_sha256": None, "tokenizer_json_sha256": None,
                 "plain_chat_rendering": None, "rendering_note": "synthetic token ids (benchmarks/compare_throughput.py)"}
    for side in sides:
        manifest = {
            "schema_version": schema.SCHEMA_VERSION, "format": schema.FORMAT_NAME, "created_at": utc_now(),
            "backend": {"name": "synthetic", "spec": f"synthetic-{side}", "engine": "synthetic", "dtype": "bfloat16",
                        "device": "cpu", "settings": {"noise_rel": NOISE_REL if side == "actual" else 0.0}},
            "model": model, "tokenizer": tokenizer, "environment": environment_record(),
            "selection": {"positions": "all", "layers": "all"},
            "teacher_forcing": {"source": "self" if side == "expected" else "reference",
                                "reference_capture": None if side == "expected" else str(root / "expected"),
                                "reference_manifest_sha256": None},
            "prompts": records[side], "skipped": [], "runtime_seconds": 0.0, "repeats": 1,
        }
        (root / side / schema.MANIFEST).write_text(json.dumps(manifest))
        if with_msprobe:
            dump_dir = root / "msprobe" / side
            (dump_dir / "dump.json").write_text(json.dumps({"task": "tensor", "level": "L0", "framework": "pytorch",
                                                            "dump_data_dir": str(dump_dir / "dump_tensor_data"), "data": dumps[side]}))
            (dump_dir / "construct.json").write_text(json.dumps(dict.fromkeys(dumps[side])))
    marker.write_text(json.dumps({**wanted, "msprobe": with_msprobe, "tensor_bytes_per_side": shape["tensor_bytes"],
                                  "build_seconds": round(time.perf_counter() - started, 1)}))
    print(f"built in {time.perf_counter() - started:.0f} s", flush=True)
    return root


# ----------------------------------------------------------------------------------------------------------------------
# measurements (each one runs as `python compare_throughput.py --child KIND ...` in a subprocess)
# ----------------------------------------------------------------------------------------------------------------------
def _tensor_bytes(root: Path, side: str = "expected") -> int:
    manifest = json.loads((root / side / "manifest.json").read_text())
    total = 0
    for record in manifest["prompts"]:
        for info in record["tensors"].values():
            total += math.prod(info["shape"]) * {"BF16": 2, "F16": 2, "F32": 4, "I64": 8}[info["dtype"]]
    return total


def child_ours(root: Path, verify: bool) -> dict:
    from precision.analysis.compare import compare_captures
    from precision.capture.reader import CaptureReader

    started, cpu_started = time.perf_counter(), time.process_time()
    doc = compare_captures(CaptureReader(root / "expected"), CaptureReader(root / "actual"), verify=verify)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    sites = {s["site"]: s for s in doc["sites"]}
    kl = [p["logits"]["kl_mean"] for p in doc["prompts"]]
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "check": {"relative_l2_layer0": sites["layer.0"]["relative_l2"],
                                          "relative_l2_logits": sites["logits"]["relative_l2"], "kl_mean": statistics.fmean(kl),
                                          "top1_agreement": statistics.fmean(p["logits"]["top1_agreement"] for p in doc["prompts"])}}


def _safetensors_layout(path: Path):
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    base = 8 + length
    return {name: (info["dtype"], info["shape"], base + info["data_offsets"][0], base + info["data_offsets"][1])
            for name, info in header.items() if name != "__metadata__"}


def child_baseline(root: Path, chunk_elements: int = 1 << 22, passes: int = 3) -> dict:
    """numpy over the same bytes: memmap, bf16 bits -> float32, sum of squared differences and of squares.
    Single-threaded numpy; ``passes`` full passes, the median one is reported (it is short, so noisier)."""
    import numpy as np

    manifest = json.loads((root / "expected" / "manifest.json").read_text())
    times, cpu_times = [], []
    for _ in range(passes):
        started, cpu_started = time.perf_counter(), time.process_time()
        d2 = e2 = 0.0
        for record in manifest["prompts"]:
            e_path, a_path = root / "expected" / record["file"], root / "actual" / record["file"]
            e_map, a_map = np.memmap(e_path, dtype=np.uint8, mode="r"), np.memmap(a_path, dtype=np.uint8, mode="r")
            e_layout, a_layout = _safetensors_layout(e_path), _safetensors_layout(a_path)
            for name, (dtype, _shape, start, end) in e_layout.items():
                if dtype != "BF16":
                    continue
                _, _, a_start, a_end = a_layout[name]
                e16 = e_map[start:end].view(np.uint16)
                a16 = a_map[a_start:a_end].view(np.uint16)
                for lo in range(0, e16.size, chunk_elements):
                    e = (e16[lo:lo + chunk_elements].astype(np.uint32) << 16).view(np.float32)
                    a = (a16[lo:lo + chunk_elements].astype(np.uint32) << 16).view(np.float32)
                    diff = a - e
                    d2 += float(np.dot(diff, diff))
                    e2 += float(np.dot(e, e))
            del e_map, a_map
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - cpu_started)
    return {"seconds": statistics.median(times), "cpu_seconds": statistics.median(cpu_times), "passes": times,
            "check": {"relative_l2_all": math.sqrt(d2 / e2)}}


def child_sha256(root: Path) -> dict:
    started, cpu_started = time.perf_counter(), time.process_time()
    for side in ("expected", "actual"):
        for path in sorted((root / side / "tensors").glob("*.safetensors")):
            _sha256(path)
    return {"seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu_started, "check": {}}


def warm(paths: list[Path]) -> float:
    """Read every file once so that each measurement starts with a warm page cache."""
    started = time.perf_counter()
    buffer = bytearray(16 << 20)
    view = memoryview(buffer)
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while handle.readinto(view):
                pass
    return time.perf_counter() - started


def _vm_hwm() -> int:
    """This process's own peak RSS (VmHWM of its address space), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def measure(command: list[str], result_file: Path | None, env: dict | None = None, log: Path | None = None) -> dict:
    """Run ``command``; wall seconds, peak RSS of the largest process (wait4) and of the sampled process tree."""
    if result_file is not None:
        result_file.unlink(missing_ok=True)
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(open(log, "w")) if log is not None else subprocess.DEVNULL
        wall, status, usage, peak_tree = _run_sampled(command, env, out)
    returncode = os.waitstatus_to_exitcode(status)
    if returncode != 0:
        tail = log.read_text()[-3000:] if log is not None else ""
        raise RuntimeError(f"{command[:4]} exited {returncode}\n{tail}")
    # a command that reports no CPU time of its own (msprobe): its process's, from wait4 (not its pool's children)
    result = json.loads(result_file.read_text()) if result_file is not None else {
        "seconds": wall, "cpu_seconds": usage.ru_utime + usage.ru_stime, "check": {}}
    result.update(wall=wall, peak_rss=usage.ru_maxrss * 1024, peak_tree_rss=peak_tree)
    return result


def _run_sampled(command: list[str], env: dict | None, out) -> tuple:
    started = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    peak_tree = 0
    stop = threading.Event()

    def sample():
        nonlocal peak_tree
        while not stop.is_set():
            peak_tree = max(peak_tree, _tree_rss(proc.pid))
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    stop.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4 above
    return wall, status, usage, peak_tree


def msprobe_command(venv: Path, root: Path, out_dir: Path) -> list[str]:
    return [str(venv / "bin" / "msprobe"), "compare", "-tp", str(root / "msprobe" / "actual" / "dump.json"),
            "-gp", str(root / "msprobe" / "expected" / "dump.json"), "-o", str(out_dir)]


def msprobe_status(venv: Path) -> tuple[bool, str]:
    exe = venv / "bin" / "msprobe"
    if not exe.exists():
        return False, (f"msprobe is not installed in {venv}; install it with: python -m venv {venv} && "
                       f"{venv}/bin/pip install mindstudio-probe torch==2.13.0")
    try:
        version = subprocess.run([str(venv / "bin" / "python"), "-c", "from importlib.metadata import version; print(version('mindstudio-probe'))"],
                                 check=False, capture_output=True, text=True, timeout=120).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"msprobe in {venv} does not run: {exc}"
    return bool(version), f"mindstudio-probe {version or '?'}"


# ----------------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------------
def code_version() -> dict:
    """The precision/ code measured: HEAD and whether precision/ had uncommitted edits (read-only git calls)."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(REPO), *args], check=False, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    return {"head": git("rev-parse", "--short", "HEAD"), "uncommitted_in_precision": git("status", "--short", "--", "precision")}


def _fmt_bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / (1 << 20):.0f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/bench", help="where the data is built and cached (default /tmp/bench)")
    parser.add_argument("--gb", type=float, default=4.0, help="GiB of tensor bytes per side, at least (default 4)")
    parser.add_argument("--repeat", type=int, default=1, help="measurement rounds; medians are reported (default 1)")
    parser.add_argument("--hidden", type=int, default=2560)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=166144, help="logits width (default Nanbeige4-3B's 166144)")
    parser.add_argument("--positions", type=int, default=2048, help="positions per prompt (all kept)")
    parser.add_argument("--no-msprobe", action="store_true", help="skip the msprobe measurement")
    parser.add_argument("--msprobe-venv", default=None, help="venv holding mindstudio-probe (default WORK/msprobe-venv)")
    parser.add_argument("--verify", action="store_true",
                        help="also time a whole compare_captures(verify=True) run (by default its extra cost, the sha256 of "
                             "every tensor file, is timed on its own)")
    parser.add_argument("--json", default=None, help="also write the results here (default WORK/compare_throughput.json)")
    parser.add_argument("--child", choices=("build", "ours", "ours-verify", "baseline", "sha256"), help=argparse.SUPPRESS)
    parser.add_argument("--with-msprobe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        sys.path.insert(0, str(REPO))
        if args.child == "build":
            build(args, with_msprobe=args.with_msprobe)
            return 0
        root = Path(args.root)
        result = {"ours": lambda: child_ours(root, False), "ours-verify": lambda: child_ours(root, True),
                  "baseline": lambda: child_baseline(root), "sha256": lambda: child_sha256(root)}[args.child]()
        result["vm_hwm"] = _vm_hwm()
        Path(args.result).write_text(json.dumps(result))
        return 0

    # This process stays small (no numpy, no torch): a child's peak RSS from wait4 would otherwise start at ours.
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    venv = Path(args.msprobe_venv) if args.msprobe_venv else work / "msprobe-venv"
    use_msprobe, msprobe_note = (False, "skipped (--no-msprobe)") if args.no_msprobe else msprobe_status(venv)
    me = [sys.executable, str(Path(__file__).resolve())]
    shape_args = ["--work", str(work), "--gb", str(args.gb), "--hidden", str(args.hidden), "--layers", str(args.layers),
                  "--vocab", str(args.vocab), "--positions", str(args.positions)]
    subprocess.run([*me, *shape_args, "--child", "build", *(["--with-msprobe"] if use_msprobe else [])], check=True)
    root = dataset_dir(args)
    one_side = _tensor_bytes(root)
    files = [p for side in ("expected", "actual") for p in sorted((root / side / "tensors").glob("*.safetensors"))]
    ms_files = [p for side in ("expected", "actual") for p in sorted((root / "msprobe" / side / "dump_tensor_data").glob("*.pt"))] if use_msprobe else []
    print(f"data: {root}  ({_fmt_bytes(one_side)} of tensor bytes per side, {len(files) // 2} prompts)", flush=True)
    print(f"msprobe: {msprobe_note}", flush=True)

    result_file = work / "child-result.json"
    kinds = ["baseline", "ours", "sha256"] + (["ours-verify"] if args.verify else [])
    runs: dict[str, list[dict]] = {k: [] for k in kinds + (["msprobe"] if use_msprobe else [])}
    warm_seconds = []
    for round_ in range(args.repeat):
        for kind in kinds:
            warm_seconds.append(warm(files))
            runs[kind].append(measure([*me, "--child", kind, "--root", str(root), "--result", str(result_file)], result_file,
                                      log=work / f"child-{kind}.log"))
            r = runs[kind][-1]
            print(f"  round {round_ + 1} {kind:12s} {r['seconds']:8.2f} s  peak RSS {_fmt_bytes(r['peak_rss'])} "
                  f"(VmHWM {_fmt_bytes(r['vm_hwm'])})  {r['check']}", flush=True)
        if use_msprobe:
            warm_seconds.append(warm(ms_files))
            out_dir = work / "msprobe-out"
            shutil.rmtree(out_dir, ignore_errors=True)
            r = measure(msprobe_command(venv, root, out_dir), None, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
                        log=work / "child-msprobe.log")
            csvs = sorted(out_dir.glob("compare_result_*.csv"))
            r["check"] = {"csv_rows": len(csvs[-1].read_text().splitlines()) - 1 if csvs else None}
            runs["msprobe"].append(r)
            print(f"  round {round_ + 1} {'msprobe':12s} {r['seconds']:8.2f} s  peak RSS {_fmt_bytes(r['peak_tree_rss'])}  {r['check']}", flush=True)

    def median(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[kind])

    base = median("baseline", "seconds")
    rows = []
    for kind in runs:
        sec = median(kind, "seconds")
        cpu = median(kind, "cpu_seconds")
        rows.append({"measurement": kind, "seconds": sec, "gb_per_s": one_side / sec / 1e9, "cpu_seconds": cpu,
                     "gb_per_cpu_s": one_side / cpu / 1e9,
                     "ratio_vs_baseline": base / sec, "peak_rss": median(kind, "peak_rss"), "peak_tree_rss": median(kind, "peak_tree_rss")})
    by = {r["measurement"]: r for r in rows}
    summary = {
        "data": str(root), "tensor_bytes_per_side": one_side, "prompts": len(files) // 2, "positions": args.positions,
        "hidden": args.hidden, "layers": args.layers, "vocab": args.vocab, "noise_rel": NOISE_REL, "repeat": args.repeat,
        "page_cache": "warm (every file read once right before each measurement)", "warm_read_seconds": warm_seconds,
        "msprobe": msprobe_note, "rows": rows, "runs": runs,
        "ours_vs_baseline": by["ours"]["ratio_vs_baseline"],
        "ours_verify_vs_baseline": by["ours-verify"]["ratio_vs_baseline"] if "ours-verify" in by else None,
        "ours_plus_sha256_vs_baseline": base / (by["ours"]["seconds"] + by["sha256"]["seconds"]),
        "msprobe_over_ours": by["msprobe"]["seconds"] / by["ours"]["seconds"] if "msprobe" in by else None,
        "msprobe_over_ours_verify": by["msprobe"]["seconds"] / by["ours-verify"]["seconds"] if "msprobe" in by and "ours-verify" in by else None,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}, "code": code_version(),
    }
    Path(args.json or work / "compare_throughput.json").write_text(json.dumps(summary, indent=1))

    print()
    print(f"code: {summary['code']}")
    print(f"one side: {_fmt_bytes(one_side)} of tensor bytes; medians of {args.repeat} round(s); page cache warm")
    print(f"{'measurement':14s} {'seconds':>9s} {'GB/s':>7s} {'x baseline':>11s} {'CPU s':>8s} {'GB/CPU-s':>9s} {'peak RSS':>10s} {'tree RSS':>10s}")
    for r in rows:
        print(f"{r['measurement']:14s} {r['seconds']:9.2f} {r['gb_per_s']:7.3f} {r['ratio_vs_baseline']:11.3f} "
              f"{r['cpu_seconds']:8.2f} {r['gb_per_cpu_s']:9.3f} {_fmt_bytes(r['peak_rss']):>10s} {_fmt_bytes(r['peak_tree_rss']):>10s}")
    print()
    print(f"ours GB/s (one side)             : {by['ours']['gb_per_s']:.3f}   (target >= 1 GB/s)")
    print(f"ours GB per CPU-second           : {by['ours']['gb_per_cpu_s']:.3f}   (x {os.cpu_count()} cores: the speed on an otherwise idle machine)")
    print(f"ours / baseline speed            : {summary['ours_vs_baseline']:.3f}")
    if summary["ours_verify_vs_baseline"] is not None:
        print(f"ours (verify=True) / baseline    : {summary['ours_verify_vs_baseline']:.3f}")
    else:
        print(f"(ours + sha256) / baseline       : {summary['ours_plus_sha256_vs_baseline']:.3f}   (verify=True estimate; --verify times it whole)")
    if summary["msprobe_over_ours"] is not None:
        with_verify = summary["msprobe_over_ours_verify"]
        print(f"msprobe time / ours time         : {summary['msprobe_over_ours']:.2f}x (target >= 20x)"
              + (f"; ours with verify=True: {with_verify:.2f}x" if with_verify is not None else ""))
    else:
        print(f"msprobe: {msprobe_note}")
    print(f"ours peak RSS                    : {_fmt_bytes(by['ours']['peak_rss'])} (target < 1.5 GB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
