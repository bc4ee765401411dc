"""A capture plan split into shards by prompt, and the shards' capture directories merged into the one capture
directory a single capture of the whole plan would have written.

Sharding: ``assign_shards`` puts every prompt into exactly one of N shards, deterministically, balancing the tokens
each shard's backend processes (longest-processing-time first: prompts by decreasing token count, each to the
shard with the fewest tokens so far, ties to the lower plan index and the lower shard; Graham's bound: the largest
shard holds at most 4/3 - 1/(3N) times the optimum). A shard keeps its prompts in plan order. Shard I/N is
numbered from 1, as the command line spells it (``capture --shard 2/4``).

Merging: ``merge_captures`` reads every shard (the reader validates each one), checks that they are captures of
the same backend, model, settings and plan (every field of the capture identity but the prompt list is equal, and
each shard's prompt list is exactly its part of ``plan``), that together they hold every prompt of the plan once,
then writes the merged directory: the records renumbered into plan order, each tensor file hard-linked (or copied
across filesystems) and its sha256 checked against the shard's manifest, and a manifest equal to a single
capture's but for what a single capture measures of itself (see ``_merged_manifest``). Shards are never written.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from precision.capture import manifest as schema
from precision.capture.reader import CaptureReader, PromptRecord
from precision.capture.writer import CapturePlan, PlannedPrompt, prompts_sha256, tokenizer_sha256
from precision.errors import CaptureFormatError, PrecisionError
from precision.io import os_error_message, write_json_atomic, write_text_atomic
from precision.model import sha256_file
from precision.outputs import claim_output_dir

log = logging.getLogger(__name__)

# Environment fields that may differ between shards captured on different hosts without changing what was
# computed; every other field (library versions, numerics variables, source revision, Python) must be equal.
_HOST_FIELDS = ("host", "platform", "cpu_count")


@dataclass(frozen=True)
class ShardSpec:
    """Shard ``index`` of ``count`` (1 <= index <= count)."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> "ShardSpec":
        head, slash, tail = str(text).partition("/")
        try:
            index, count = int(head), int(tail)
        except ValueError:
            index = count = 0
        if not slash or count < 1 or not 1 <= index <= count:
            raise PrecisionError(f"--shard {text!r}: expected I/N with 1 <= I <= N, e.g. --shard 1/4 for the first of four shards")
        return cls(index, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def prompt_tokens(prompt: PlannedPrompt) -> int:
    """The balancing weight of a prompt: the tokens a backend runs for it, its prompt plus the continuation it is
    fed (a teacher-forced plan) or the most tokens it may generate (``max_new_tokens``, a reference plan)."""
    new = len(prompt.continuation_ids) if prompt.continuation_ids is not None else prompt.max_new_tokens
    return len(prompt.prompt_ids) + new


def assign_shards(plan: CapturePlan, count: int) -> tuple[tuple[str, ...], ...]:
    """The prompt ids of each of ``count`` shards, each in plan order (see the module docstring for the rule)."""
    total = len(plan.prompts)
    if count < 1 or count > total:
        raise PrecisionError(f"cannot split {total} prompt{'s' if total != 1 else ''} into {count} shards: every shard needs at least "
                             f"one prompt; use at most {total} shards")
    weights = [prompt_tokens(p) for p in plan.prompts]
    loads = [0] * count
    members: list[list[int]] = [[] for _ in range(count)]
    for position in sorted(range(total), key=lambda i: (-weights[i], i)):
        shard = min(range(count), key=lambda s: (loads[s], s))
        loads[shard] += weights[position]
        members[shard].append(position)
    return tuple(tuple(plan.prompts[i].id for i in sorted(m)) for m in members)


def shard_plan(plan: CapturePlan, shard: ShardSpec) -> CapturePlan:
    """The part of ``plan`` that shard ``shard`` captures."""
    return plan.subset(list(assign_shards(plan, shard.count)[shard.index - 1]))


# -- checks -------------------------------------------------------------------------------------------------------
def _placements(readers: Sequence[CaptureReader], plan: CapturePlan) -> list[tuple[CaptureReader, PromptRecord]]:
    """Each planned prompt's shard and record, in plan order; refuses overlaps, strangers and gaps."""
    planned = {p.id for p in plan.prompts}
    found: dict[str, tuple[CaptureReader, PromptRecord]] = {}
    for reader in readers:
        for record in reader.prompts:
            if record.id not in planned:
                raise PrecisionError(f"shard {reader.path} holds prompt {record.id!r}, which the plan does not have; merge shards "
                                     "captured from the same --prompts / --teacher-forcing as the merge is given")
            if record.id in found:
                raise PrecisionError(f"prompt {record.id!r} is in two shards, {found[record.id][0].path} and {reader.path}; each prompt "
                                     "must be in exactly one shard: merge the shards of one split (--shard I/N with the same N)")
            found[record.id] = (reader, record)
    missing = [p.id for p in plan.prompts if p.id not in found]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise PrecisionError(f"{len(missing)} prompt{'s' if len(missing) != 1 else ''} of the plan {'are' if len(missing) != 1 else 'is'} "
                             f"in none of the {len(readers)} shards ({shown}); capture the missing shard(s) and merge all of them")
    return [found[p.id] for p in plan.prompts]


def _differing(values: Sequence[Any]) -> bool:
    return any(v != values[0] for v in values[1:])


def _refuse_difference(readers: Sequence[CaptureReader], what: str, values: Sequence[Any]) -> None:
    if _differing(values):
        odd = next(i for i, v in enumerate(values) if v != values[0])
        raise PrecisionError(f"shards {readers[0].path} and {readers[odd].path} differ in {what}; only shards of one capture "
                             "(same backend, model, settings and plan) merge: recapture the odd shard with the others' settings")


def _without(record: dict, *keys: str) -> dict:
    return {k: v for k, v in record.items() if k not in keys}


def _check_same_capture(readers: Sequence[CaptureReader], plan: CapturePlan) -> None:
    manifests = [r.manifest for r in readers]
    for reader in readers:
        if not isinstance(reader.manifest.get("identity"), dict):
            raise PrecisionError(f"shard {reader.path} records no capture identity (an older precision-check wrote it); "
                                 "recapture it with this one")
    _refuse_difference(readers, "the backend or its settings (manifest 'backend')", [m["backend"] for m in manifests])
    _refuse_difference(readers, "the model (config or weight hashes)", [_without(m["model"], "path") for m in manifests])
    _refuse_difference(readers, "the --positions/--layers selection", [m["selection"] for m in manifests])
    _refuse_difference(readers, "--repeats", [m.get("repeats") for m in manifests])
    _refuse_difference(readers, "library versions, numerics environment variables or precision-check revision",
                       [_without(m["environment"], *_HOST_FIELDS) for m in manifests])
    _refuse_difference(readers, "the capture identity (backend spec, engine arguments, variants, model, selection)",
                       [_without(m["identity"], "prompts_sha256", "tokenizer_sha256", "teacher_manifest_sha256") for m in manifests])
    source = "self" if plan.teacher_capture is None else "reference"
    for reader in readers:
        manifest, identity = reader.manifest, reader.manifest["identity"]
        if manifest["tokenizer"] != plan.tokenizer or identity.get("tokenizer_sha256") != tokenizer_sha256(plan):
            raise PrecisionError(f"shard {reader.path} was captured with another tokenizer or chat template than the plan's; "
                                 "merge with the model the shards were captured from")
        forcing = manifest["teacher_forcing"]
        if forcing["source"] != source or identity.get("teacher_manifest_sha256") != plan.teacher_manifest_sha256:
            wanted = "its own greedy tokens (--prompts)" if source == "self" else "the given --teacher-forcing reference"
            raise PrecisionError(f"shard {reader.path} was not teacher-forced with {wanted}; merge with the --prompts or "
                                 "--teacher-forcing the shards were captured with")
        if manifest["skipped"] != list(plan.skipped):
            raise PrecisionError(f"shard {reader.path} skipped other prompts than the plan does; merge with the prompt set "
                                 "and model the shards were captured from")
        own_part = plan.subset([r.id for r in reader.prompts])
        if identity.get("prompts_sha256") != prompts_sha256(own_part):
            raise PrecisionError(f"shard {reader.path} was captured from other prompt token ids, continuations or max_new_tokens than "
                                 "its prompts have in the plan; merge with the --prompts and --max-new-tokens (or --teacher-forcing) "
                                 "the shards were captured with")


# -- the merged directory ---------------------------------------------------------------------------------------
def _merged_environment(readers: Sequence[CaptureReader]) -> dict:
    """The shards' environment (equal but for the host fields); a host field that differs between shards becomes
    the list of its distinct values, in shard order, where a single capture has one value."""
    merged = dict(readers[0].manifest["environment"])
    for name in _HOST_FIELDS:
        values = [r.manifest["environment"].get(name) for r in readers]
        if _differing(values):
            merged[name] = list(dict.fromkeys(values))
    return merged


def _merged_manifest(readers: Sequence[CaptureReader], plan: CapturePlan, records: list[PromptRecord]) -> dict:
    """What a single capture of ``plan`` writes, from the shards. Three fields are a single capture's measurements
    of itself and are derived: ``created_at`` is the latest shard's (the merged capture is complete when its last
    shard is), ``runtime_seconds`` is the sum over shards (the capture work, model loads included; with shards
    in parallel the wall time is less), and ``environment`` as ``_merged_environment`` says. ``model.path`` is the
    first shard's (the shards' models are equal by config and weight hashes)."""
    first = readers[0].manifest
    manifest = {
        "schema_version": first["schema_version"],
        "format": first["format"],
        "created_at": max((r.manifest["created_at"] for r in readers), key=datetime.fromisoformat),
        "backend": first["backend"],
        "model": first["model"],
        "tokenizer": plan.tokenizer,
        "environment": _merged_environment(readers),
        "selection": first["selection"],
        "teacher_forcing": plan.teacher_forcing_record(),
        "prompts": [r.to_json() for r in records],
        "skipped": list(plan.skipped),
        "runtime_seconds": round(sum(float(r.manifest["runtime_seconds"]) for r in readers), 3),
    }
    if "repeats" in first:
        manifest["repeats"] = first["repeats"]
    manifest["identity"] = {**first["identity"], "prompts_sha256": prompts_sha256(plan)}
    return manifest


def _place_file(source: Path, target: Path, link: bool) -> None:
    """Hard-link ``source`` to ``target`` (a copy where the filesystem cannot link)."""
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        if link:
            try:
                os.link(source, tmp)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                    raise
                shutil.copyfile(source, tmp)
        else:
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise PrecisionError(os_error_message(exc, target, "writing")) from exc


def merge_captures(shards: Sequence[str | Path], out: str | Path, plan: CapturePlan, *, force: bool = False,
                   link: bool = True) -> CaptureReader:
    """Merge the capture directories ``shards`` (together: every prompt of ``plan`` once) into ``out``, the capture
    directory a single capture of ``plan`` writes. ``link``: hard-link the tensor files (else copy them)."""
    if not shards:
        raise PrecisionError("merge-captures needs at least one shard capture directory")
    paths = [Path(s) for s in shards]
    if len({p.resolve() for p in paths}) != len(paths):
        raise PrecisionError("a shard directory is given twice; pass each shard once")
    readers = [CaptureReader(p) for p in paths]
    placements = _placements(readers, plan)
    _check_same_capture(readers, plan)
    records = [replace(record, index=index, file=schema.tensor_file_name(index))
               for index, (_, record) in enumerate(placements)]
    manifest = _merged_manifest(readers, plan, records)
    out = Path(out)
    inputs = [*paths, plan.teacher_capture, readers[0].manifest["model"].get("path")]
    with claim_output_dir(out, "capture", force=force, complete_marker=schema.MANIFEST, inputs=inputs, can_resume=False):
        (out / schema.TENSOR_DIR).mkdir(exist_ok=True)
        for (reader, record), merged in zip(placements, records):
            target = out / merged.file
            _place_file(reader.tensor_path(record), target, link)
            digest = sha256_file(target)
            if digest != record.sha256:
                raise CaptureFormatError(f"{reader.tensor_path(record)}: sha256 {digest[:12]}… differs from its shard manifest's "
                                         f"{record.sha256[:12]}…; the shard is damaged: capture that shard again")
        lines = [{"header": manifest["identity"]}, *(r.to_json() for r in records)]
        write_text_atomic(out / schema.PROGRESS, "".join(json.dumps(line) + "\n" for line in lines))
        write_json_atomic(out / schema.MANIFEST, manifest)
    log.info("merged %d shards (%s prompts) into %s", len(readers), "+".join(str(len(r.prompts)) for r in readers), out)
    return CaptureReader(out)
