"""Sharded captures on stories260K: a plan split by prompt over two worker processes and merged is the capture a
single process writes (bit-identical tensors, the same manifest records, the same comparison); merges of shards
that do not belong together are refused with messages naming the problem."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from precision.capture import manifest as schema
from precision.capture.shards import ShardSpec, assign_shards, prompt_tokens, shard_plan
from precision.capture.writer import CapturePlan, PlannedPrompt
from precision.errors import CaptureFormatError, PrecisionError
from tests.conftest import write_prompts

SPEC = "hf:cpu:bf16"
TARGET = "hf:cpu:fp16"
MAX_NEW = 4
# Four prompts of different lengths, so that balancing by tokens puts the two longest apart.
PROMPTS = [
    '{"id": "story", "category": "raw", "text": "Once upon a time, there was a little girl named Lily."}',
    '{"id": "chat", "category": "chat", "messages": [{"role": "user", "content": "Tell me about a big red ball."}]}',
    '{"id": "dog", "category": "raw", "text": "The dog ran to the park."}',
    '{"id": "garden", "category": "raw", "text": "Tom and Sue went to the big tree in the garden. They saw a bird and a cat."}',
]
# What a capture measures of itself, and so what a merge derives instead of copying (shards._merged_manifest).
SELF_MEASURED = ("created_at", "runtime_seconds")


def _cli(*argv: str) -> int:
    from precision.cli import main

    return main(["-q", *argv])


def _tree(path: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``path`` with its size and modification time (to prove a merge changed nothing there)."""
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def captures(stories_path, tmp_path_factory):
    """A BF16 reference of stories260K captured once in this process and once by two worker processes (merged),
    and an FP16 target teacher-forced on it, once whole and once as two shards through the CLI (merged)."""
    import torch

    from precision.api import capture_backend
    from precision.sharding import capture_in_workers, shard_directory

    root = tmp_path_factory.mktemp("shards")
    prompts = write_prompts(root / "prompts.jsonl", PROMPTS)
    model = str(stories_path)
    single = capture_backend(SPEC, root / "single", model=model, prompts=prompts, max_new_tokens=MAX_NEW)
    # The workers use this process's torch thread count, so that the backend records (torch_threads) agree too.
    merged = capture_in_workers(SPEC, root / "merged", root / "shards", workers=2, threads_per_worker=torch.get_num_threads(),
                                model=model, prompts=prompts, max_new_tokens=MAX_NEW)
    common = ["capture", "--backend", TARGET, "--model", model, "--teacher-forcing", str(root / "single")]
    assert _cli(*common, "--out", str(root / "target-single")) == 0
    for i in (1, 2):
        assert _cli(*common, "--shard", f"{i}/2", "--out", str(root / f"target-{i}")) == 0
    assert _cli("merge-captures", str(root / "target-2"), str(root / "target-1"), "--teacher-forcing", str(root / "single"),
                "--out", str(root / "target-merged")) == 0
    return SimpleNamespace(root=root, prompts=prompts, model=model, single=single.path, merged=merged.path,
                           shards=[shard_directory(root / "shards", i, 2) for i in (1, 2)],
                           target_shards=[root / "target-1", root / "target-2"],
                           target_single=root / "target-single", target_merged=root / "target-merged")


def _manifest(path: Path) -> dict:
    return json.loads((Path(path) / schema.MANIFEST).read_text(encoding="utf-8"))


def _stable(manifest: dict) -> dict:
    """A manifest without what a capture measures of itself, and without the precision-check git revision, which
    moves when someone commits between two captures of one test (the merge itself refuses shards of different
    revisions: test_shards_of_other_library_versions_are_refused covers that comparison)."""
    environment = {k: v for k, v in manifest["environment"].items() if k != "precision_check_git"}
    return {**{k: v for k, v in manifest.items() if k not in SELF_MEASURED}, "environment": environment}


@pytest.mark.parametrize("pair", [("single", "merged"), ("target_single", "target_merged")])
def test_merged_capture_is_the_single_capture(captures, pair):
    """Same prompt order, same records (token ids, generated tokens, tensor listings, sha256s), same identity,
    backend, model, environment; only what a capture measures of itself (time stamps) differs."""
    from precision.capture.reader import CaptureReader

    single_dir, merged_dir = (getattr(captures, name) for name in pair)
    single, merged = _manifest(single_dir), _manifest(merged_dir)
    assert [p["id"] for p in merged["prompts"]] == [p["id"] for p in single["prompts"]] == ["story", "chat", "dog", "garden"]
    assert _stable(merged) == _stable(single)
    shards = captures.shards if pair[0] == "single" else captures.target_shards
    assert all(_manifest(shard)["environment"] == merged["environment"] for shard in shards)
    assert merged["identity"]["prompts_sha256"] == single["identity"]["prompts_sha256"]
    reader = CaptureReader(merged_dir)  # the reader checks the manifest against the typed contract, sizes and listings
    for record in reader.prompts:
        reader.verify(record)
        assert (merged_dir / record.file).read_bytes() == (single_dir / record.file).read_bytes()
    progress = (merged_dir / schema.PROGRESS).read_text(encoding="utf-8").splitlines()
    assert json.loads(progress[0]) == {"header": single["identity"]}
    assert [json.loads(line) for line in progress[1:]] == single["prompts"]


def test_merged_manifest_passes_the_published_schema(captures):
    from precision.contract import load

    for path in (captures.merged, captures.target_merged):
        document = load(Path(path) / schema.MANIFEST)
        assert len(document.prompts) == 4


def test_the_shards_split_the_prompts_and_the_files_are_hard_links(captures):
    shard_ids = [[p["id"] for p in _manifest(s)["prompts"]] for s in captures.shards]
    assert sorted(sum(shard_ids, [])) == sorted(["story", "chat", "dog", "garden"]) and all(shard_ids)
    merged = _manifest(captures.merged)
    for shard in captures.shards:
        for record in _manifest(shard)["prompts"]:
            index = next(p["index"] for p in merged["prompts"] if p["id"] == record["id"])
            assert os.path.samefile(shard / record["file"], captures.merged / schema.tensor_file_name(index))


def test_compare_gives_identical_results(captures):
    """Every number of the comparison is the same; only where the captures are (path, manifest hash) and when the
    comparison was made differ."""
    from precision.analysis.compare import compare_captures
    from precision.capture.reader import CaptureReader

    whole = compare_captures(CaptureReader(captures.single), CaptureReader(captures.target_single))
    sharded = compare_captures(CaptureReader(captures.merged), CaptureReader(captures.target_merged))
    provenance = ("path", "manifest_sha256")
    for side in ("expected", "actual"):
        assert {k: v for k, v in whole[side].items() if k not in provenance} == {k: v for k, v in sharded[side].items() if k not in provenance}
    rest = [k for k in whole if k not in ("created_at", "expected", "actual")]
    assert rest and {k: whole[k] for k in rest} == {k: sharded[k] for k in rest}
    assert json.dumps(whole["prompts"], sort_keys=True) == json.dumps(sharded["prompts"], sort_keys=True)  # NaNs too


# -- sharding -----------------------------------------------------------------------------------------------------
def _plan(lengths: list[int], new: int = 8) -> CapturePlan:
    return CapturePlan(prompts=tuple(PlannedPrompt(f"p{i}", "c", "raw", tuple(range(n)), new) for i, n in enumerate(lengths)),
                       tokenizer={})


def test_assignment_is_deterministic_balanced_and_complete():
    plan = _plan([100, 10, 60, 50, 40, 30, 5, 5])
    shards = assign_shards(plan, 3)
    assert shards == assign_shards(plan, 3)
    assert sorted(sum(map(list, shards), [])) == sorted(p.id for p in plan.prompts)
    weight = {p.id: prompt_tokens(p) for p in plan.prompts}
    loads = sorted(sum(weight[i] for i in shard) for shard in shards)
    # Weights (prompt + 8 new tokens) 108, 18, 68, 58, 48, 38, 13, 13: 364 in all, so no split beats 122 tokens
    # for its largest shard. Heaviest first, each to the lightest shard: 108 | 68 | 58; 48 -> 106 (third);
    # 38 -> 106 (second); 18 -> 124 (second, the lower of two equal); 13 -> 119 (third); 13 -> 121 (first).
    assert loads == [119, 121, 124]
    assert max(loads) <= (4 / 3 - 1 / 9) * 122  # Graham's bound for LPT
    order = {p.id: n for n, p in enumerate(plan.prompts)}
    assert all(list(shard) == sorted(shard, key=order.get) for shard in shards)
    assert [p.id for p in shard_plan(plan, ShardSpec(1, 3)).prompts] == list(shards[0])


def test_teacher_forced_prompts_weigh_their_continuation():
    short = PlannedPrompt("a", "c", "raw", (1, 2), 1, continuation_ids=(3, 4, 5))
    assert prompt_tokens(short) == 5
    assert prompt_tokens(PlannedPrompt("b", "c", "raw", (1, 2), 7)) == 9


@pytest.mark.parametrize("text", ["0/2", "3/2", "2", "a/b", "1/0", "-1/2"])
def test_bad_shard_specs_are_refused(text):
    with pytest.raises(PrecisionError, match="expected I/N"):
        ShardSpec.parse(text)


def test_more_shards_than_prompts_is_refused():
    with pytest.raises(PrecisionError, match="at most 2 shards"):
        assign_shards(_plan([3, 4]), 3)


def test_capture_refuses_a_bad_shard_before_loading_anything(tmp_path, capsys):
    assert _cli("capture", "--backend", SPEC, "--prompts", "nowhere.jsonl", "--shard", "5/4", "--out", str(tmp_path / "o")) == 2
    assert "--shard '5/4'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# -- refusals -------------------------------------------------------------------------------------------------------
def _merge(captures, *shards, out, **extra) -> None:
    from precision.api import merge_captures

    merge_captures([str(s) for s in shards], out, prompts=captures.prompts, max_new_tokens=MAX_NEW, **extra)


def test_a_missing_shard_is_refused(captures, tmp_path):
    with pytest.raises(PrecisionError, match=r"2 prompts of the plan are in none of the 1 shards"):
        _merge(captures, captures.shards[0], out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_overlapping_shards_are_refused(captures, tmp_path):
    twin = tmp_path / "twin"
    shutil.copytree(captures.shards[0], twin)
    with pytest.raises(PrecisionError, match=r"is in two shards"):
        _merge(captures, captures.shards[0], captures.shards[1], twin, out=tmp_path / "out")
    with pytest.raises(PrecisionError, match="given twice"):
        _merge(captures, captures.shards[0], captures.shards[0], out=tmp_path / "out")


def test_shards_of_different_backends_are_refused(captures, tmp_path):
    """Shard 2/2 captured with the FP16 backend from the same prompts cannot join BF16's shard 1/2."""
    assert _cli("capture", "--backend", TARGET, "--model", captures.model, "--prompts", str(captures.prompts), "--max-new-tokens",
                str(MAX_NEW), "--shard", "2/2", "--out", str(tmp_path / "fp16-2")) == 0
    with pytest.raises(PrecisionError, match=r"differ in the backend or its settings"):
        _merge(captures, captures.shards[0], tmp_path / "fp16-2", out=tmp_path / "out")


def test_shards_of_another_plan_are_refused(captures, tmp_path):
    with pytest.raises(PrecisionError, match=r"other prompt token ids, continuations or max_new_tokens"):
        from precision.api import merge_captures

        merge_captures(captures.shards, tmp_path / "out", prompts=captures.prompts, max_new_tokens=MAX_NEW + 1)
    with pytest.raises(PrecisionError, match=r"was not teacher-forced with the given --teacher-forcing reference"):
        from precision.api import merge_captures

        merge_captures(captures.shards, tmp_path / "out2", teacher_forcing=captures.single)
    # Target shards forced on another reference than the one given (the merged one holds the same tokens, but
    # another manifest): refused, naming the teacher forcing.
    with pytest.raises(PrecisionError, match=r"was not teacher-forced"):
        from precision.api import merge_captures

        merge_captures(captures.target_shards, tmp_path / "out3", teacher_forcing=captures.merged)


def test_the_cli_names_the_problem_with_exit_2(captures, tmp_path, capsys):
    code = _cli("merge-captures", str(captures.shards[1]), "--prompts", str(captures.prompts), "--max-new-tokens", str(MAX_NEW),
                "--out", str(tmp_path / "out"))
    assert code == 2
    err = capsys.readouterr().err
    assert "in none of the 1 shards" in err and "Traceback" not in err
    assert _cli("merge-captures", str(captures.shards[1]), "--out", str(tmp_path / "out")) == 2
    assert "--prompts" in capsys.readouterr().err
    assert _cli("merge-captures", *map(str, captures.shards), "--prompts", str(captures.prompts), "--max-new-tokens", "0",
                "--out", str(tmp_path / "out")) == 2
    assert "--max-new-tokens 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_damaged_shard_is_refused(captures, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(captures.shards[0], damaged)
    first = sorted((damaged / schema.TENSOR_DIR).iterdir())[0]
    data = bytearray(first.read_bytes())
    data[-1] ^= 0x01
    first.write_bytes(bytes(data))
    with pytest.raises(CaptureFormatError, match=r"differs from its shard manifest's"):
        _merge(captures, damaged, captures.shards[1], out=tmp_path / "out")


def test_the_merge_never_writes_into_an_input_and_leaves_the_shards_unchanged(captures, tmp_path):
    before = [_tree(s) for s in captures.shards]
    with pytest.raises(PrecisionError, match="lies in the input"):
        _merge(captures, *captures.shards, out=captures.shards[0] / "merged")
    out = tmp_path / "copied"
    _merge(captures, *captures.shards, out=out, link=False)
    assert [_tree(s) for s in captures.shards] == before
    merged = _manifest(out)
    for record in merged["prompts"]:
        assert not os.path.samefile(out / record["file"], captures.merged / record["file"])
        assert (out / record["file"]).read_bytes() == (captures.merged / record["file"]).read_bytes()
    with pytest.raises(PrecisionError, match="already holds a finished capture"):
        _merge(captures, *captures.shards, out=out)
    _merge(captures, *captures.shards, out=out, force=True)  # --force replaces what the merge wrote there
    assert _manifest(out)["prompts"] == merged["prompts"]


def test_layer_streamed_shards_merge_into_the_single_streamed_capture(captures, tmp_path):
    """The layer-streamed backend (one decoder layer's weights at a time, every prompt of a group through layer i
    before layer i+1) sharded by prompt: the merge equals its single capture, and both equal the whole-model one."""
    common = ["capture", "--backend", "hf-streamed", "--model", captures.model, "--prompts", str(captures.prompts),
              "--max-new-tokens", str(MAX_NEW)]
    assert _cli(*common, "--out", str(tmp_path / "single")) == 0
    for i in (1, 2):
        assert _cli(*common, "--shard", f"{i}/2", "--out", str(tmp_path / f"shard-{i}")) == 0
    assert _cli("merge-captures", str(tmp_path / "shard-1"), str(tmp_path / "shard-2"), "--prompts", str(captures.prompts),
                "--max-new-tokens", str(MAX_NEW), "--out", str(tmp_path / "merged")) == 0
    single, merged = _manifest(tmp_path / "single"), _manifest(tmp_path / "merged")
    assert _stable(merged) == _stable(single)
    whole = _manifest(captures.single)
    assert [p["sha256"] for p in merged["prompts"]] == [p["sha256"] for p in whole["prompts"]]


def _doctored_copy(shard: Path, to: Path, change) -> Path:
    """A copy of ``shard`` whose manifest's environment ``change`` edits (as a shard captured elsewhere would read)."""
    shutil.copytree(shard, to)
    manifest = _manifest(to)
    change(manifest["environment"])
    (to / schema.MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    return to


def test_shards_of_other_library_versions_are_refused(captures, tmp_path):
    other = _doctored_copy(captures.shards[1], tmp_path / "other", lambda env: env["versions"].update(torch="0.0.1"))
    with pytest.raises(PrecisionError, match="differ in library versions"):
        _merge(captures, captures.shards[0], other, out=tmp_path / "out")


def test_shards_from_two_hosts_list_both_hosts(captures, tmp_path):
    """Host name, platform and core count may differ between shards; the merged environment lists the values."""
    here = _manifest(captures.shards[0])["environment"]["host"]
    other = _doctored_copy(captures.shards[1], tmp_path / "other", lambda env: env.update(host="other-host"))
    _merge(captures, captures.shards[0], other, out=tmp_path / "out")
    merged = _manifest(tmp_path / "out")["environment"]
    assert merged["host"] == [here, "other-host"]
    assert merged["cpu_count"] == _manifest(captures.single)["environment"]["cpu_count"]
