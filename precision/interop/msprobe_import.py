"""An msprobe L0 dump as a precision-check capture (``precision-check import-msprobe``).

Each forward pass of the dump (one per step, or one per call index within a step) becomes one prompt of the capture,
with the sites of precision.interop.msprobe_sites. Which tokens a pass ran on comes from, in order of precedence:
``teacher_forcing`` (a reference capture: prompt k is pass k, its token ids must be the pass's), ``prompts`` (a
prompt set: the pass starts with the prompt's tokens, the rest is its continuation) or the embedding's dumped
input ids. The residual-stream convention the dump follows, every conversion and every site the dump lacks are
recorded in the manifest (backend.msprobe) and returned; nothing is invented.

A pass is accepted only when it is a whole sequence: when the dump holds the layers' position_ids they must be
0..T-1 (a decode step of a generation with a KV cache starts later and is refused); without them, several passes
are accepted only when a reference capture or prompt set says how long each one is.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from precision.capture import manifest as schema
from precision.capture.reader import CaptureReader, PromptRecord
from precision.capture.writer import CapturePlan, PlannedPrompt
from precision.environment import utc_now
from precision.errors import PrecisionError
from precision.interop.msprobe_dump import DumpError, find_dumps
from precision.interop.msprobe_sites import RESIDUAL_CONVENTIONS, ForwardPass, PassTensors, PassTokens, check_files, forward_passes, pass_tensors, pass_tokens
from precision.io import write_json_atomic
from precision.model import sha256_file
from precision.names import EMBED, FINAL_NORM, LOGITS, POSITIONS, layer_site

log = logging.getLogger(__name__)

CAPTURE_DTYPES = {"torch.bfloat16": "bfloat16", "torch.float16": "float16", "torch.float32": "float32"}
DUMP_RENDERING = "msprobe-dump"
"""The rendering recorded for prompts whose token ids come from the dump itself (no prompt text is known)."""


@dataclass(frozen=True)
class ImportResult:
    reader: CaptureReader
    missing: list[str]
    """Sites the capture lacks because the dump lacks them (or holds them in a form that cannot be aligned)."""
    notes: list[str]
    residual: str


def import_msprobe(dump_dir: str | Path, model: str | Path, out: str | Path, *, teacher_forcing: str | Path | None = None,
                   prompts: str | Path | None = None, force: bool = False, trust_remote_code: bool = False) -> ImportResult:
    """Write the capture of an msprobe L0 tensor dump into ``out`` (see the module docstring)."""
    from precision.model import inspect_model
    from precision.outputs import claim_output_dir

    if teacher_forcing and prompts:
        raise PrecisionError("pass either --teacher-forcing (a reference capture) or --prompts (a prompt set), not both")
    started = time.perf_counter()
    dumps = find_dumps(dump_dir)
    passes = [fp for dump in dumps for fp in forward_passes(dump)]
    info = inspect_model(model)
    plan = _plan(info, teacher_forcing, prompts, trust_remote_code)
    if plan is not None and len(plan.prompts) != len(passes):
        raise DumpError(f"{dump_dir} holds {len(passes)} forward pass(es) ({', '.join(fp.label for fp in passes[:6])}), the "
                        f"{'reference capture' if teacher_forcing else 'prompt set'} has {len(plan.prompts)} prompt(s); "
                        "pass the capture or prompt set the dumped run was fed, in the same order")
    # Every pass is aligned from dump.json and the small id tensors before anything is written.
    planned = [_align(fp, pass_tokens(fp), plan.prompts[i] if plan else None, len(passes)) for i, fp in enumerate(passes)]
    for fp in passes:
        check_files(fp)
        _check_dump_shapes(fp, info)
    out = Path(out)
    with claim_output_dir(out, "capture", force=force, complete_marker=schema.MANIFEST, inputs=[dump_dir, info.path, teacher_forcing],
                          can_resume=False):
        (out / schema.TENSOR_DIR).mkdir(exist_ok=True)
        records, sites_seen, notes, residuals, dtypes = [], set(), [], set(), set()
        for index, fp in enumerate(passes):
            read = pass_tensors(fp)
            expected = len(planned[index].prompt_ids) + len(planned[index].continuation_ids or ())
            if any(t.shape[0] != expected for t in read.tensors.values()):
                raise DumpError(f"forward pass {fp.label}: its sites hold different numbers of positions; the dump is damaged, dump again")
            dtype = _check_sizes(fp, read, info)
            dtypes.add(dtype)
            if len(dtypes) > 1:
                raise DumpError(f"{dump_dir}: the forward passes hold different dtypes ({sorted(dtypes)}); import one run at a time")
            notes += [f"{fp.label}: {n}" for n in read.notes] + _cast_logits(read, dtype, fp.label)
            residuals.add(read.residual)
            sites_seen.add(tuple(sorted(read.tensors)))
            records.append(_write_pass(out, index, planned[index], read))
        if len(sites_seen) > 1:
            raise DumpError(f"{dump_dir}: the forward passes hold different sites ({[list(s) for s in sites_seen][:2]}); "
                            "dump every pass with the same configuration")
        layers = sorted(int(s.split(".")[1]) for s in next(iter(sites_seen)) if s.startswith("layer."))
        missing = [s for s in (EMBED, *(layer_site(i) for i in range(info.num_layers)), FINAL_NORM, LOGITS)
                   if s not in next(iter(sites_seen))]
        residual = residuals.pop()
        manifest = _manifest(dumps, info, plan, records, layers, dtypes.pop(), residual, missing, notes, dump_dir, teacher_forcing,
                             time.perf_counter() - started)
        write_json_atomic(out / schema.MANIFEST, manifest)
    return ImportResult(CaptureReader(out), missing, notes, residual)


def _plan(info, teacher_forcing, prompts, trust_remote_code: bool) -> CapturePlan | None:
    if teacher_forcing:
        return CapturePlan.following(CaptureReader(teacher_forcing))
    if prompts:
        from precision.planning import plan_from_prompts

        return plan_from_prompts(prompts, info, max_new_tokens=1, trust_remote_code=trust_remote_code)
    return None


def _align(fp: ForwardPass, read: PassTokens, planned: PlannedPrompt | None, count: int) -> PlannedPrompt:
    """The prompt pass ``fp`` ran on, checked against what the dump itself says."""
    tokens = read.tokens
    where = f"forward pass {fp.label} ({tokens} tokens)"
    if read.positions is not None and read.positions != tuple(range(tokens)):
        raise DumpError(f"{where} ran at positions {read.positions[0]}..{read.positions[-1]}, not 0..{tokens - 1}: a decode step of a "
                        "generation with a KV cache, which cannot be aligned position by position; dump one forward pass over the "
                        "whole sequence per step (transformers: model(input_ids, use_cache=False))")
    if read.positions is None and planned is None and count > 1 and read.token_ids is None:
        raise DumpError(f"{where}: the dump holds {count} forward passes and neither token ids nor positions; pass --teacher-forcing "
                        "REFERENCE_CAPTURE or --prompts PROMPTS so each pass's tokens are known")
    if planned is None:
        if read.token_ids is None:
            raise DumpError(f"{where}: the dump holds no token ids (the embedding's input was not dumped); pass --prompts PROMPTS "
                            "(the prompt set the dumped run was fed) or --teacher-forcing REFERENCE_CAPTURE")
        _check_length(where, read.token_ids, tokens)
        return PlannedPrompt(fp.label, "msprobe", DUMP_RENDERING, read.token_ids, 1, ())
    if planned.continuation_ids is not None:  # a reference capture: the pass must be its whole teacher-forced sequence
        forced = planned.prompt_ids + planned.continuation_ids
        if tokens != len(forced) or (read.token_ids is not None and read.token_ids != forced):
            raise DumpError(f"{where} does not match prompt {planned.id!r} of the reference capture ({len(forced)} tokens"
                            f"{', other token ids' if tokens == len(forced) else ''}); dump the reference's prompts + continuations, in order")
        return planned
    if read.token_ids is not None:
        _check_length(where, read.token_ids, tokens)
        if read.token_ids[:len(planned.prompt_ids)] != planned.prompt_ids:
            raise DumpError(f"{where} does not start with the tokens of prompt {planned.id!r}; pass the prompt set the run was fed, in order")
        return PlannedPrompt(planned.id, planned.category, planned.rendering, planned.prompt_ids, planned.max_new_tokens,
                             read.token_ids[len(planned.prompt_ids):])
    if tokens != len(planned.prompt_ids):
        raise DumpError(f"{where}: prompt {planned.id!r} has {len(planned.prompt_ids)} tokens and the dump holds no token ids to tell "
                        "the continuation; pass --teacher-forcing REFERENCE_CAPTURE instead")
    return PlannedPrompt(planned.id, planned.category, planned.rendering, planned.prompt_ids, planned.max_new_tokens, ())


def _check_length(where: str, token_ids: tuple[int, ...], tokens: int) -> None:
    if len(token_ids) != tokens:
        raise DumpError(f"{where}: the embedding ran on {len(token_ids)} token ids but the layers hold {tokens} positions; "
                        "the dump mixes passes, dump again one sequence per forward pass")


def _check_dump_shapes(fp: ForwardPass, info) -> None:
    """The widths dump.json records against the model's, and the layer indices against its depth, before anything
    is written or read."""
    where = f"forward pass {fp.label}"
    if fp.layers and max(fp.layers) >= info.num_layers:
        raise DumpError(f"{where} holds decoder layer {max(fp.layers)}, the model at {info.path} has {info.num_layers} layers; "
                        "pass the --model the dump was made with")
    sites = [(fp.embed, info.hidden_size), *((c, info.hidden_size) for c in fp.layers.values()), (fp.final_norm, info.hidden_size),
             (fp.logits, info.vocab_size)]
    for call, width in sites:
        outputs = call.output_tensors() if call is not None else []
        shape = outputs[0].get("shape") if outputs else None
        if shape and shape[-1] != width:
            raise DumpError(f"{where}: {call.key} has width {shape[-1]}, the model at {info.path} has {width}; pass the --model the "
                            "dump was made with")


def _check_sizes(fp: ForwardPass, read: PassTensors, info) -> str:
    """The capture dtype of the pass (its hidden states'), after checking every site's width against the model."""
    dtypes = set()
    for site, tensor in read.tensors.items():
        width = info.vocab_size if site == LOGITS else info.hidden_size
        if tensor.shape[1] != width:
            raise DumpError(f"forward pass {fp.label}: {site} has width {tensor.shape[1]}, the model at {info.path} has {width}; "
                            "pass the --model the dump was made with")
        index = site.split(".")[1] if site.startswith("layer.") else None
        if index is not None and int(index) >= info.num_layers:
            raise DumpError(f"forward pass {fp.label} holds {site}, the model at {info.path} has {info.num_layers} layers; pass the "
                            "--model the dump was made with")
        if site != LOGITS:
            dtypes.add(str(tensor.dtype))
    if len(dtypes) != 1 or next(iter(dtypes)) not in CAPTURE_DTYPES:
        raise DumpError(f"forward pass {fp.label}: hidden states in {sorted(dtypes)}; a capture holds one of "
                        f"{', '.join(CAPTURE_DTYPES)}")
    return CAPTURE_DTYPES[dtypes.pop()]


def _cast_logits(read: PassTensors, dtype: str, label: str) -> list[str]:
    """A capture holds every site in one dtype: logits in another are rounded to it, and the note says whether
    that was exact."""
    import torch

    logits = read.tensors.get(LOGITS)
    if logits is None or CAPTURE_DTYPES.get(str(logits.dtype)) == dtype:
        return []
    cast = logits.to(getattr(torch, dtype))
    exact = bool(torch.equal(cast.to(logits.dtype), logits))
    read.tensors[LOGITS] = cast
    return [f"{label}: logits were {logits.dtype} in the dump, rounded to {dtype} "
            f"({'exactly: every value is representable' if exact else 'not exactly: values changed by the rounding'})"]


def _write_pass(out: Path, index: int, planned: PlannedPrompt, read: PassTensors) -> PromptRecord:
    import torch

    from precision.capture.arrays import TensorFile
    from precision.safetensors_io import write_tensors

    tokens = next(iter(read.tensors.values())).shape[0]
    name = schema.tensor_file_name(index)
    tensors = {site: t.contiguous() for site, t in read.tensors.items()}
    tensors[POSITIONS] = torch.arange(tokens, dtype=torch.int64)
    write_tensors(out / name, tensors)
    handle = TensorFile(out / name)
    listing = {n: {"shape": list(handle.shape(n)), "dtype": handle.dtype_name(n)} for n in handle.keys()}
    continuation = planned.continuation_ids or ()
    return PromptRecord(index=index, id=planned.id, category=planned.category, rendering=planned.rendering,
                        prompt_ids=tuple(planned.prompt_ids), continuation_ids=tuple(continuation), generated_ids=(),
                        file=name, sha256=sha256_file(out / name), bytes=(out / name).stat().st_size, tensors=listing)


def _manifest(dumps, info, plan, records, layers, dtype, residual, missing, notes, dump_dir, teacher_forcing, seconds) -> dict:
    from precision import __version__
    from precision.tokenizer import load_tokenizer, tokenizer_facts

    framework = dumps[0].framework
    if plan is not None:
        tokenizer = plan.tokenizer
    else:
        tokenizer = tokenizer_facts(load_tokenizer(info.path), info.path)
    teacher = plan.teacher_forcing_record() if plan is not None and teacher_forcing else \
        {"source": "self", "reference_capture": None, "reference_manifest_sha256": None}
    complete_layers = layers == list(range(info.num_layers))
    return {
        "schema_version": schema.SCHEMA_VERSION,
        "format": schema.FORMAT_NAME,
        "created_at": utc_now(),
        "backend": {
            "name": "msprobe", "spec": f"msprobe:{framework}", "engine": f"msprobe dump ({framework})", "dtype": dtype,
            "msprobe": {
                "dump_dir": str(Path(dump_dir).resolve()),
                "level": sorted({d.level for d in dumps}), "task": dumps[0].task, "framework": framework,
                "dump_json": [{"path": str(d.path), "step": d.step, "sha256": hashlib.sha256(d.path.read_bytes()).hexdigest()} for d in dumps],
                "residual_convention": residual, "residual_convention_text": RESIDUAL_CONVENTIONS.get(residual),
                "missing_sites": missing, "conversions": notes, "generated_ids": "not in a dump: every prompt's generated_ids is empty",
                "imported_by": f"precision-check {__version__}",
            },
        },
        "model": info.to_json(),
        "tokenizer": tokenizer,
        "environment": {"source": "msprobe dump", "host": "not recorded by the dump", "versions": {}},
        "selection": {"positions": "all", "layers": "all" if complete_layers else layers},
        "teacher_forcing": teacher,
        "prompts": [r.to_json() for r in records],
        "skipped": [],
        "runtime_seconds": round(seconds, 3),
        "repeats": 1,
    }
