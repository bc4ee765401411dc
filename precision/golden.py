"""Golden references: the CPU side of a run (reference, FP32 truth, implementation envelope) captured once and
stored, so that each new torch_npu / CANN / vLLM build is measured without rerunning the slow CPU reference.

    STORE/
      store.json                 schema_version 1, written last: the model, tokenizer and prompt-set identity,
                                 and the sha256 of every manifest and of the compact form
      captures/reference|truth|envelope/<member>/   full capture directories
      compact.safetensors        the compact form, small enough to keep in a repository:
      compact.json                 per prompt: token ids (prompt + continuation), the reference's own greedy
                                   tokens, the top-8 reference logits (ids and values) at every position, and the
                                   L2 norm of every site at every position (float32)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from precision.capture.reader import CaptureReader
from precision.capture.writer import CapturePlan
from precision.environment import utc_now
from precision.errors import MismatchedCapturesError, PrecisionError
from precision.io import write_json_atomic
from precision.model import ModelInfo, sha256_file
from precision.names import LOGITS, POSITIONS
from precision.outputs import claim_output_dir
from precision.prompts import DEFAULT_MAX_NEW_TOKENS
from precision.reference_side import CaptureSettings, CapturedReference, CpuSide, resolve_model
from precision.safetensors_io import write_tensors

log = logging.getLogger(__name__)
SCHEMA_VERSION = 1
FORMAT_NAME = "precision-check-golden"
TOP_K = 8


def is_store(path: str | Path | None) -> bool:
    return path is not None and (Path(path) / "store.json").is_file()


def write_compact(reference: CaptureReader, out: Path) -> dict:
    """compact.safetensors + compact.json from a reference capture (see the module docstring)."""
    import torch

    tensors, index = {}, {"top_k": TOP_K, "prompts": []}
    for number, record in enumerate(reference.prompts):
        with reference.open_tensors(record) as handle:
            logits = handle.get_tensor(LOGITS).float()
            values, ids = torch.topk(logits, k=min(TOP_K, logits.shape[-1]), dim=-1)
            norms = torch.stack([handle.get_tensor(site).float().norm(dim=-1) for site in record.sites])
            positions = handle.get_tensor(POSITIONS)
        prefix = f"p{number:04d}"
        tensors.update({
            f"{prefix}.forced_ids": torch.tensor(record.forced_ids, dtype=torch.int32),
            f"{prefix}.generated_ids": torch.tensor(record.generated_ids or (0,), dtype=torch.int32)[: len(record.generated_ids)],
            f"{prefix}.positions": positions.to(torch.int32),
            f"{prefix}.topk_ids": ids.to(torch.int32).contiguous(),
            f"{prefix}.topk_logits": values.contiguous(),
            f"{prefix}.site_norms": norms.contiguous(),
        })
        index["prompts"].append({"id": record.id, "prefix": prefix, "sites": record.sites})
    write_tensors(out / "compact.safetensors", tensors)
    write_json_atomic(out / "compact.json", index)
    return {"file": "compact.safetensors", "sha256": sha256_file(out / "compact.safetensors"),
            "bytes": (out / "compact.safetensors").stat().st_size + (out / "compact.json").stat().st_size}


def create_store(prompts: Path, out: Path, *, model: Path | None = None, force: bool = False, show_progress: bool = True) -> dict:
    """Capture the CPU side of ``prompts`` on ``model`` (reference, truth, envelope at their defaults) and store it."""
    from precision.planning import plan_from_prompts

    info = resolve_model(model)
    plan = plan_from_prompts(prompts, info, max_new_tokens=DEFAULT_MAX_NEW_TOKENS)
    with claim_output_dir(out, "golden-store", force=force, complete_marker="store.json", inputs=[info.path, prompts], can_resume=False):
        cpu = CapturedReference().open(info, plan, out, CaptureSettings(show_progress=show_progress))
        return _write_store(info, cpu, out)


def _write_store(info: ModelInfo, cpu: CpuSide, out: Path) -> dict:
    reference, truth, members, envelope_ids = cpu.reference, cpu.truth, cpu.members, cpu.envelope_prompts
    store = {
        "schema_version": SCHEMA_VERSION,
        "format": FORMAT_NAME,
        "created_at": utc_now(),
        "model": info.to_json(),
        "tokenizer": reference.manifest["tokenizer"],
        "prompt_ids": [r.id for r in reference.prompts],
        "captures": {
            "reference": {"dir": "captures/reference", "manifest_sha256": reference.manifest_sha256()},
            "truth": {"dir": "captures/truth", "manifest_sha256": truth.manifest_sha256()},
            "envelope": {name: {"dir": f"captures/envelope/{name}", "manifest_sha256": c.manifest_sha256()} for name, c in members.items()},
        },
        "envelope_prompts": envelope_ids,
        "compact": write_compact(reference, out),
    }
    write_json_atomic(out / "store.json", store)
    return store


def _store_entries(store: dict, path: Path) -> list[tuple[str, dict]]:
    """(role, entry) of every capture the store lists, after checking each entry's shape and that its directory
    is one this tool writes, inside the store (a store.json is a file a user may edit)."""
    captures = store.get("captures")
    if not isinstance(captures, dict) or not isinstance(captures.get("envelope", {}), dict):
        raise PrecisionError(f"{path}/store.json has no valid 'captures' table; the store is damaged: create it again with 'precision-check golden create'")
    entries = [(role, captures.get(role)) for role in ("reference", "truth")]
    entries += [(f"envelope {name}", entry) for name, entry in captures.get("envelope", {}).items()]
    for role, entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("dir"), str) or not isinstance(entry.get("manifest_sha256"), str):
            raise PrecisionError(f"{path}/store.json: the {role} entry lacks 'dir' or 'manifest_sha256'; the store is damaged, create it again")
        expected = f"captures/{role.replace(' ', '/')}"
        if entry["dir"] != expected:
            raise PrecisionError(f"{path}/store.json: the {role} capture is listed at {entry['dir']!r}, a store keeps it at {expected!r}; "
                                 "the store was edited: create it again")
    return entries


def load_store(path: str | Path) -> dict:
    path = Path(path)
    try:
        store = json.loads((path / "store.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise PrecisionError(f"{path} is not a readable golden store ({exc}); create one with 'precision-check golden create'") from exc
    if not isinstance(store, dict) or store.get("format") != FORMAT_NAME or store.get("schema_version") != SCHEMA_VERSION:
        raise PrecisionError(f"{path}/store.json is not a golden store of schema version {SCHEMA_VERSION}")
    missing = [key for key in ("model", "tokenizer", "prompt_ids", "compact") if not isinstance(store.get(key), (dict, list))]
    if missing:
        raise PrecisionError(f"{path}/store.json lacks {missing}; the store is damaged: create it again with 'precision-check golden create'")
    _store_entries(store, path)
    return store


def verify_store(path: str | Path) -> list[str]:
    """Every manifest and tensor file, and the compact form, against the hashes the store records."""
    path = Path(path)
    store = load_store(path)
    problems = []
    for role, entry in _store_entries(store, path):
        try:
            reader = CaptureReader(path / entry["dir"])
            if reader.manifest_sha256() != entry["manifest_sha256"]:
                problems.append(f"{entry['dir']}/manifest.json is not the one stored (sha256 differs)")
            for record in reader.prompts:
                reader.verify(record)
        except PrecisionError as exc:
            problems.append(f"{role}: {exc}")
    compact = path / "compact.safetensors"
    if store["compact"].get("file") != compact.name or not compact.is_file() or sha256_file(compact) != store["compact"].get("sha256"):
        problems.append(f"{compact} is missing or its sha256 differs from store.json")
    return problems


def verified_store(path: str | Path) -> dict:
    """store.json of the store at ``path``, after checking every file against the hashes it records: what a run
    and the canary read from a store. Refused (MismatchedCapturesError, exit 2) with the first problem and the fix."""
    path = Path(path)
    store = load_store(path)
    problems = verify_store(path)
    if problems:
        raise MismatchedCapturesError(f"golden store {path} does not match its recorded hashes ({len(problems)} problem(s); first: {problems[0]}); "
                                      "it was edited or damaged: run 'precision-check golden verify' for the list, and create the store again")
    return store


def open_store(path: str | Path, model: ModelInfo, plan: CapturePlan) -> tuple[CaptureReader, CaptureReader, dict[str, CaptureReader], list[str]]:
    """The stored reference, truth and envelope, after checking they were made for this model, tokenizer and
    prompt set; refusals name what differs."""
    path = Path(path)
    store = verified_store(path)
    stored = store["model"]
    if stored.get("config_sha256") != model.config_sha256 or stored.get("weights_sha256") != model.weights_sha256:
        raise MismatchedCapturesError(f"golden store {path} was made for the model at {stored.get('path')} (another config or weights than {model.path}); "
                                      "create a store for this model with 'precision-check golden create'")
    if store["tokenizer"] != plan.tokenizer:
        raise MismatchedCapturesError(f"golden store {path} was made with another tokenizer or chat template than {model.path}'s")
    reference = CaptureReader(path / store["captures"]["reference"]["dir"])
    planned = [(p.id, p.prompt_ids) for p in plan.prompts]
    stored_prompts = [(r.id, r.prompt_ids) for r in reference.prompts]
    if planned != stored_prompts:
        raise MismatchedCapturesError(f"golden store {path} was made for another prompt set (ids {[i for i, _ in stored_prompts][:5]}…, or other token ids); "
                                      "use the prompt set it was created from, or create a new store")
    truth = CaptureReader(path / store["captures"]["truth"]["dir"])
    members = {name: CaptureReader(path / entry["dir"]) for name, entry in store["captures"]["envelope"].items()}
    return reference, truth, members, store.get("envelope_prompts", [])



class GoldenStore:
    """A golden store as the reference source of a run (precision.reference_side.ReferenceSource): the stored
    reference, truth and envelope, checked against the run's model, tokenizer and prompts when opened."""

    def __init__(self, path: str | Path):
        self.stored_at = Path(path)

    def check_specs(self) -> None:
        load_store(self.stored_at)

    def open(self, model: ModelInfo, plan: CapturePlan, out: Path, settings: CaptureSettings) -> CpuSide:
        return CpuSide(*open_store(self.stored_at, model, plan))

    def record(self) -> dict:
        return {"reference": str(self.stored_at), "truth": "golden store", "envelope": "golden store"}
