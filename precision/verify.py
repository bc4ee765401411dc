"""A reviewer's check of a run directory: are the report and summaries what the stored captures give?

1. Every capture's manifest is the one the comparison was made from (its sha256 is recorded in comparison.json),
   and every tensor file matches the sha256 its manifest records: a swapped or edited capture is detected.
2. The comparison (and its analysis) is recomputed from the captures and must equal comparison.json.
3. Every file the report writes (report.html, summary.md, summary.json, msprobe_compare.csv: whatever
   precision.report.write_report returns) is rendered again from that comparison and must equal the run's file:
   an edited report or export is detected.
4. A run with a serving stage ([serving.NAME] tables) renders those files with the stage's document,
   RUN/serving/summary.json. verify checks the document is the one the stage wrote (its sha256 is recorded in the
   run's summary.json), names the run's tables, has as baseline this run's target capture (checked by its sha256
   above) with its engine settings, and that its status is the worst of its configurations' verdicts; then each
   configuration's row and comparison.json are computed again by the stage's own code from the configuration's
   stored capture (its tensors checked by their hashes) against the run's target and CPU side, and its own report
   files are rendered again from that comparison. Not recomputed: that the engine gives those captures, and the
   bisection's trials (both need vLLM; said in the notes).
Returns the list of problems, each naming what does not match; an empty list means the run verifies.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

from precision.capture.reader import CaptureReader
from precision.errors import PrecisionError
from precision.io import read_result_json

_ROLES = {"expected": "reference", "actual": "target", "truth": "truth"}
_TOKENIZER, _CAPTURES = "the model's tokenizer", "the captures at their recorded paths"
_RENDERED_FROM = {"report.html": (_TOKENIZER, _CAPTURES), "summary.md": (_TOKENIZER, _CAPTURES), "msprobe_compare.csv": (_CAPTURES,)}
"""What each file precision.report.write_report renders needs besides comparison.json (report.html and summary.md
quote decoded texts and the manifests; the CSV's statistics and msprobe metrics are read from the captures): where
it is not on this machine the file cannot be rendered byte for byte again and is listed in the notes. Every other
file write_report writes (summary.json) is rendered from comparison.json alone and always checked."""
_VOLATILE = {"created_at", "path"}
_RELATIVE_TOLERANCE = 1e-9


def _load_json(path: Path) -> Any:
    try:
        return read_result_json(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PrecisionError(f"cannot read {path}: {exc}; pass the directory written by 'precision-check run'") from exc


def _differences(stored: Any, fresh: Any, where: str, out: list[str], limit: int = 5, file: str = "comparison.json") -> None:
    """Appends to ``out`` where ``stored`` (read from ``file``) differs from ``fresh`` (what the captures give)."""
    if len(out) >= limit:
        return
    if isinstance(stored, dict) and isinstance(fresh, dict):
        for key in sorted(set(stored) | set(fresh)):
            if key in _VOLATILE:
                continue
            if key not in stored or key not in fresh:
                out.append(f"{where}.{key} is {'missing' if key not in stored else 'extra'} in {file}")
            else:
                _differences(stored[key], fresh[key], f"{where}.{key}", out, limit, file)
    elif isinstance(stored, list) and isinstance(fresh, list):
        if len(stored) != len(fresh):
            out.append(f"{where} has {len(stored)} entries in {file}, the captures give {len(fresh)}")
            return
        for index, (a, b) in enumerate(zip(stored, fresh)):
            _differences(a, b, f"{where}[{index}]", out, limit, file)
    elif isinstance(stored, (int, float)) and isinstance(fresh, (int, float)) and not isinstance(stored, bool):
        if not (math.isclose(stored, fresh, rel_tol=_RELATIVE_TOLERANCE, abs_tol=0.0) or (math.isnan(stored) and math.isnan(fresh))):
            out.append(f"{where} is {stored!r} in {file}, the captures give {fresh!r}")
    elif stored != fresh:
        out.append(f"{where} is {str(stored)[:60]!r} in {file}, the captures give {str(fresh)[:60]!r}")


def _json_roundtrip(data: Any) -> Any:
    from precision.io import _json_safe, _restore_non_finite

    return _restore_non_finite(json.loads(json.dumps(_json_safe(data), allow_nan=False)))


def _store_of(run: dict) -> Path | None:
    from precision.golden import is_store, verify_store

    reference = run.get("reference")
    if not isinstance(reference, str) or not is_store(reference):
        return None
    problems = verify_store(reference)
    if problems:
        raise PrecisionError(f"the golden store {reference} this run used does not match its hashes: {problems[0]}")
    return Path(reference)


def _model_problems(reference: CaptureReader) -> list[str]:
    """The replay is recomputed from the reference model: it must be the model the run used, checked by the
    weight hashes the capture recorded (not by the comparison's numbers)."""
    from precision.model import inspect_model

    recorded = reference.manifest["model"]
    path = Path(str(recorded.get("path")))
    if not path.is_dir():
        return [f"the reference model {path} is not on this machine: the layer replay cannot be recomputed (verify where the model is)"]
    current = inspect_model(path)
    if current.config_sha256 != recorded.get("config_sha256") or current.weights_sha256 != recorded.get("weights_sha256"):
        return [f"the model at {path} changed since the run (config or weight sha256 differ from the capture's record): the replay cannot be verified against it"]
    return []


def verify_run(run_dir: str | Path, notes: list[str] | None = None) -> list[str]:
    """The problems found in ``run_dir`` (see the module docstring); an empty list means it verifies. What could
    not be checked on this machine (the layer replay without the model, the report's texts without the
    tokenizer or the captures at their recorded places) is appended to ``notes``, never counted as verified."""
    try:
        return _verify_run(Path(run_dir), notes if notes is not None else [])
    except (KeyError, TypeError, AttributeError) as exc:
        raise PrecisionError(f"{run_dir} holds a damaged comparison.json, summary.json, run.json or serving/summary.json "
                             f"(missing or malformed {exc}); "
                             "it cannot be verified: rerun 'precision-check run'") from exc


def _verify_run(run_dir: Path, notes: list[str]) -> list[str]:
    from precision.analysis.compare import compare_captures
    from precision.analysis.explain import build_analysis
    from precision.analysis.replay import Replayer
    from precision.analysis.verdict import Thresholds, judge
    from precision.report import write_report

    run_dir = Path(run_dir)
    stored = _load_json(run_dir / "comparison.json")
    summary = _load_json(run_dir / "summary.json")
    run = _load_json(run_dir / "run.json") if (run_dir / "run.json").is_file() else {}
    problems: list[str] = []
    readers: dict[str, CaptureReader | None] = {}
    store = _store_of(run)
    for role, folder in _ROLES.items():
        if stored.get(role) is None:
            readers[role] = None
            continue
        local = run_dir / "captures" / folder
        if store is not None and role != "actual":
            # A run against a golden store keeps its reference and truth in the store (verified by its hashes).
            local = store / "captures" / folder
        if not local.is_dir():
            problems.append(f"{local} is missing: the comparison cannot be recomputed without the capture it was made from")
            continue
        reader = CaptureReader(local)
        digest = reader.manifest_sha256()
        if digest != stored[role]["manifest_sha256"]:
            problems.append(f"captures/{folder}/manifest.json (sha256 {digest[:12]}…) is not the manifest the comparison was made from ({stored[role]['manifest_sha256'][:12]}…)")
        for record in reader.prompts:
            try:
                reader.verify(record)
            except PrecisionError as exc:
                problems.append(str(exc))
        readers[role] = reader
    if problems:
        return problems
    replay = bool((stored.get("analysis") or {}).get("local", {}).get("available"))
    model_path = Path(str(readers["expected"].manifest["model"].get("path")))
    model_here = model_path.is_dir()
    if replay and model_here:
        problems += _model_problems(readers["expected"])
        if problems:
            return problems
    elif replay:
        notes.append(f"the layer replay was not recomputed: the reference model {model_path} is not on this machine")
    members = {}
    envelope = (stored.get("analysis") or {}).get("envelope")
    for name in (envelope or {}).get("members", []):
        folder = readers["expected"].path.parent / "envelope" / name
        if not folder.is_dir():
            return [f"{folder} is missing: the envelope cannot be recomputed"]
        members[name] = CaptureReader(folder)
    fresh = compare_captures(readers["expected"], readers["actual"], truth=readers["truth"],
                             metric_convention=stored.get("metric_convention", "precision-check"))
    if "analysis" in stored:
        replayer = Replayer(str(model_path), readers["expected"].dtype) if replay and model_here else None
        fresh["analysis"] = build_analysis(fresh, reference=readers["expected"], target=readers["actual"], members=members or None,
                                           envelope_prompts=(envelope or {}).get("prompts"), replayer=replayer)
        if not model_here:  # what only the model gives is taken as stored, and said so in the notes
            for key in ("local", "theory", "theory_source"):
                if key in stored["analysis"]:
                    fresh["analysis"][key] = stored["analysis"][key]
    _differences(stored, _json_roundtrip(fresh), "comparison", problems)
    if problems:
        return problems
    thresholds = Thresholds.from_mapping(summary["verdict"]["thresholds"])
    verdict = judge(stored, thresholds)
    serving = _stage_document(run_dir, run, summary, stored, readers, members, thresholds, problems, notes)
    if problems:
        return problems
    recorded_here = all(Path(stored[role]["path"]).is_dir() for role in _ROLES if stored.get(role))
    with tempfile.TemporaryDirectory() as scratch:
        own_manifests = {role: reader.manifest for role, reader in readers.items() if reader is not None}  # checked by sha256 above
        rendered = write_report(Path(scratch), stored, verdict, command=run.get("command"), manifests=own_manifests, serving=serving)
        for name, path in rendered.items():
            missing = [what for what, here in ((_TOKENIZER, model_here), (_CAPTURES, recorded_here)) if what in _RENDERED_FROM.get(name, ()) and not here]
            if missing:
                notes.append(f"{name} was not re-rendered: {' and '.join(missing)} it is rendered from are not on this machine "
                             "(summary.json was checked)")
            elif not (run_dir / name).is_file():
                problems.append(f"{name} is missing: the run writes it, so it was removed")
            elif path.read_bytes() != (run_dir / name).read_bytes():
                problems.append(f"{name} differs from what the comparison renders to: it was edited, or written by another precision-check version")
    return problems


def _stage_document(run_dir: Path, run: dict, summary: dict, stored: dict, readers: dict, members: dict, thresholds,
                    problems: list[str], notes: list[str]) -> dict | None:
    """The serving stage's document the run's report is rendered with (None for a run without the stage), after
    the checks of the module docstring's point 4; what does not hold is appended to ``problems``."""
    import hashlib

    from precision.analysis.verdict import Status, worst
    from precision.report.serving import STAGE_DIRECTORY, STAGE_SUMMARY

    recorded, tables = summary.get("serving"), run.get("serving") or {}
    if recorded is None and not tables:
        return None
    directory = run_dir / STAGE_DIRECTORY
    path = directory / STAGE_SUMMARY
    where = f"{STAGE_DIRECTORY}/{STAGE_SUMMARY}"
    if not path.is_file():
        problems.append(f"{where} is missing: the run had a serving stage, whose document its report summarizes")
        return None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    document = _load_json(path)
    if recorded is not None and digest != recorded.get("summary_sha256"):
        problems.append(f"{where} (sha256 {digest[:12]}…) is not the document the serving stage wrote "
                        f"(summary.json records {str(recorded.get('summary_sha256'))[:12]}…): it was edited or replaced")
        return None
    rows = document["configurations"]
    if [row["name"] for row in rows] != list(tables):
        problems.append(f"{where} holds configurations {[row['name'] for row in rows]}, run.json's [serving.NAME] tables are {list(tables)}")
    if not _same_capture(document["baseline"]["capture"], stored["actual"]["path"]):
        problems.append(f"{where}'s baseline {document['baseline']['capture']} is not this run's target capture {stored['actual']['path']}")
    elif document["baseline"].get("settings") != readers["actual"].manifest["backend"].get("settings"):
        problems.append(f"{where}'s baseline engine settings are not those of this run's target capture")
    if document["status"] != worst(Status(row["verdict"]) for row in rows).value:
        problems.append(f"{where}'s status {document['status']} is not the worst of its configurations' verdicts")
    if problems:
        return None
    problems += _recomputed_rows(directory, document, tables, readers, members, stored, thresholds, notes)
    notes.append(f"the serving stage's configurations were not captured again (that needs vLLM): each row of {where} was computed "
                 "again from the configuration's stored capture against this run's target capture, apart from its bisection's trials")
    return document


def _recomputed_rows(directory: Path, document: dict, tables: dict, readers: dict, members: dict, stored: dict, thresholds,
                     notes: list[str]) -> list[str]:
    """Each configuration's row (and comparison.json) computed again by the stage's own code (precision.serving.parity)
    from the configuration's stored capture, with the run's CPU side and target capture as the stage had them; the
    bisection is taken as stored (its trials would need the engine). The differences, named."""
    from precision.names import DETAIL_LOGITS
    from precision.reference_side import CpuSide
    from precision.serving.engine import ServingConfig
    from precision.serving.parity import ParityConfig, ParityContext

    class StoredCaptures(ParityContext):
        def capture_configuration(self, serving, plan, out):  # the capture the stage made, instead of the engine
            return CaptureReader(directory / "captures" / f"serving-{serving.name}")

    problems: list[str] = []
    configs = tuple(ServingConfig.from_mapping(name, values) for name, values in tables.items())
    envelope = (stored.get("analysis") or {}).get("envelope") or {}
    cpu = CpuSide(readers["expected"], readers["truth"], members, list(envelope.get("prompts") or []))
    with tempfile.TemporaryDirectory() as scratch:
        config = ParityConfig(prompts=Path("."), out=Path(scratch), serving=configs, truth=readers["truth"] is not None, bisect=False,
                              thresholds=thresholds)
        context = StoredCaptures(config, None, None, cpu, readers["actual"], Path(scratch))
        for index, (serving, row) in enumerate(zip(configs, document["configurations"])):
            folder = directory / "captures" / f"serving-{serving.name}"
            if not folder.is_dir():
                problems.append(f"{folder} is missing: configuration {serving.name}'s row cannot be computed again without its capture")
                continue
            served = CaptureReader(folder)
            try:
                for record in served.prompts:
                    served.verify(record)
            except PrecisionError as exc:
                problems.append(str(exc))
                continue
            fresh = context.check(serving)
            if "bisection" in row:
                fresh["bisection"] = row["bisection"]
            found: list[str] = []
            _differences(row, _json_roundtrip(fresh), f"configurations[{index}] ({serving.name})", found, file=f"{directory.name}/summary.json")
            if row.get("comparison") and not found:
                kept, again = _load_json(directory / row["comparison"]), _json_roundtrip(_load_json(Path(scratch) / row["comparison"]))
                if row["level"] == DETAIL_LOGITS:  # compared with views the stage cut from the captures, whose manifests name their paths
                    for side in ("expected", "truth"):
                        for comparison in (kept, again):
                            (comparison.get(side) or {}).pop("manifest_sha256", None)
                _differences(kept, again, "comparison", found, file=f"{directory.name}/{row['comparison']}")
                if not found:
                    found += _configuration_files(directory / Path(row["comparison"]).parent, thresholds, notes)
            problems += found
    return problems


def _configuration_files(folder: Path, thresholds, notes: list[str]) -> list[str]:
    """A configuration's own report files (precision.serving.rows.write_comparison) rendered again from its verified
    comparison.json as the stage rendered them (manifests and tokenizer at their recorded paths), compared byte for byte."""
    from precision.analysis.verdict import judge
    from precision.report import write_report

    comparison = _load_json(folder / "comparison.json")
    sides = [comparison[role] for role in _ROLES if comparison.get(role)]
    manifest = _load_json(Path(sides[0]["path"]) / "manifest.json") if Path(sides[0]["path"]).is_dir() else {}
    if not all(Path(side["path"]).is_dir() for side in sides) or not Path(str(manifest.get("model", {}).get("path"))).is_dir():
        notes.append(f"{folder.parent.name}/{folder.name}'s report files were not rendered again: {_TOKENIZER} or {_CAPTURES} "
                     "are not on this machine")
        return []
    with tempfile.TemporaryDirectory() as scratch:
        rendered = write_report(Path(scratch), comparison, judge(comparison, thresholds))
        return [f"{folder.parent.name}/{folder.name}/{name} differs from what its comparison renders to: it was edited, or written by "
                "another precision-check version" for name, path in rendered.items()
                if not (folder / name).is_file() or path.read_bytes() != (folder / name).read_bytes()]


def _same_capture(recorded: str, target: str) -> bool:
    """The stage records its baseline's path as the run was given it; the comparison records it resolved."""
    import os

    recorded_path = Path(os.path.normpath(recorded))
    target_parts = Path(os.path.normpath(target)).parts
    if recorded_path.is_absolute():
        return recorded_path.parts == target_parts
    return target_parts[-len(recorded_path.parts):] == recorded_path.parts
