"""One capture run by several worker processes on one host: the plan split into N shards by prompt
(precision.capture.shards), shard I captured by worker I into ``shards_dir/shard-I-of-N`` (what
``precision-check capture --shard I/N`` does), then the shards merged into ``out``.

Every worker loads the whole model, so N workers hold N copies of the weights (docs/scaling.md has the cost
model). Workers are started with the "spawn" method: a forked child of a process that already ran torch may
deadlock in its thread pools.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def shard_directory(shards_dir: str | Path, index: int, count: int) -> Path:
    return Path(shards_dir) / f"shard-{index}-of-{count}"


def _capture_shard(threads: int | None, spec: str, out: str, kwargs: dict) -> str:
    """One worker's job. ``threads``: the torch intra-op threads of this worker (None: torch's default)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    from precision.api import capture_backend

    return str(capture_backend(spec, out, **kwargs).path)


def capture_in_workers(spec: str, out: str | Path, shards_dir: str | Path, *, workers: int, threads_per_worker: int | None = None,
                       model: str | Path | None = None, prompts: str | Path | None = None, teacher_forcing: str | Path | None = None,
                       max_new_tokens: int = 32, selection=None, trust_remote_code: bool = False, force: bool = False,
                       resume: bool = False, link: bool = True):
    """Capture ``spec`` over the plan in ``workers`` processes at once and merge the shards into ``out``; returns
    the merged capture's CaptureReader. ``resume`` continues each unfinished shard; ``force`` replaces shards and
    ``out`` written before. ``threads_per_worker``: torch threads in each worker (None: torch's default, which on
    a CPU host is every core, so N workers oversubscribe the cores N times)."""
    from precision.api import merge_captures
    from precision.errors import PrecisionError

    if workers < 1:
        raise PrecisionError(f"workers {workers}: need at least one worker")
    if threads_per_worker is not None and threads_per_worker < 1:
        raise PrecisionError(f"threads per worker {threads_per_worker}: need at least one thread")
    common = {"model": None if model is None else str(model), "prompts": None if prompts is None else str(prompts),
              "teacher_forcing": None if teacher_forcing is None else str(teacher_forcing), "max_new_tokens": max_new_tokens,
              "selection": selection, "trust_remote_code": trust_remote_code, "resume": resume, "force": force}
    outs = [shard_directory(shards_dir, i, workers) for i in range(1, workers + 1)]
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = [pool.submit(_capture_shard, threads_per_worker, spec, str(path), {**common, "shard": f"{i}/{workers}"})
                for i, path in enumerate(outs, start=1)]
        done = [job.result() for job in jobs]  # the first failing shard's error is raised here, as the worker raised it
    return merge_captures(done, out, prompts=prompts, teacher_forcing=teacher_forcing, max_new_tokens=max_new_tokens,
                          trust_remote_code=trust_remote_code, force=force, link=link)
