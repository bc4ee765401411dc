"""import-msprobe on real msprobe dumps of transformers running stories260K (tests/interop/conftest.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from precision.analysis.compare import compare_captures
from precision.capture.reader import CaptureReader
from precision.cli import main
from precision.names import EMBED, FINAL_NORM, LOGITS, layer_site
from tests.interop.conftest import import_dump, msprobe_dump


def _dump_json(dump: Path, step: int = 0) -> Path:
    return next((dump / f"step{step}").glob("*/dump.json"))


def test_msprobe_dump_compares_to_the_hf_capture_of_the_same_run_with_zero_error(stories_reference, imported_bf16, imported_fp16):
    """The issue's done-when: msprobe's dump of the same run (transformers BF16, same token ids) imports and compares
    against precision-check's own hf capture with relative L2 exactly 0 at every decoder layer (and every other site)."""
    reader = CaptureReader(imported_bf16)
    sites = [EMBED, *(layer_site(i) for i in range(reader.num_layers)), FINAL_NORM, LOGITS]
    comparison = compare_captures(stories_reference, reader)
    assert len(comparison["prompts"]) == len(stories_reference.prompts) == 2
    for prompt in comparison["prompts"]:
        assert [s["site"] for s in prompt["sites"]] == sites
        for entry in prompt["sites"]:
            assert entry["metrics"]["relative_l2"] == 0.0 and entry["metrics"]["max_abs"] == 0.0, (prompt["id"], entry["site"])
    # The other way: an FP16 run dumped the same way differs at every decoder layer (the zeros above are not vacuous).
    other = compare_captures(stories_reference, CaptureReader(imported_fp16))
    for prompt in other["prompts"]:
        for entry in prompt["sites"]:
            if entry["layer"] is not None:
                assert entry["metrics"]["relative_l2"] > 1e-4, (prompt["id"], entry["site"])


def test_the_manifest_and_the_printed_lines_record_the_convention_and_what_the_dump_lacks(bf16_dump, stories_path, stories_reference, tmp_path, capsys):
    import_dump(bf16_dump, stories_path, tmp_path / "cap", "--teacher-forcing", str(stories_reference.path))
    out = capsys.readouterr().out
    assert "the dump lacks: nothing" in out and "output convention" in out
    manifest = CaptureReader(tmp_path / "cap").manifest
    record = manifest["backend"]["msprobe"]
    assert record["residual_convention"] == "output" and record["missing_sites"] == [] and record["level"] == ["L0"]
    assert manifest["teacher_forcing"]["source"] == "reference"
    assert [d["step"] for d in record["dump_json"]] == [0, 1]

    # A dump without lm_head: logits are reported missing, not invented.
    lacking = tmp_path / "no-lm-head"
    shutil.copytree(bf16_dump, lacking)
    for step in (0, 1):
        path = _dump_json(lacking, step)
        data = json.loads(path.read_text())
        data["data"] = {k: v for k, v in data["data"].items() if ".lm_head." not in k}
        path.write_text(json.dumps(data))
    import_dump(lacking, stories_path, tmp_path / "no-logits", "--teacher-forcing", str(stories_reference.path))
    assert "the dump lacks: logits" in capsys.readouterr().out
    reader = CaptureReader(tmp_path / "no-logits")
    assert reader.manifest["backend"]["msprobe"]["missing_sites"] == [LOGITS]
    assert LOGITS not in reader.prompts[0].sites and layer_site(4) in reader.prompts[0].sites


def test_token_ids_come_from_the_embedding_input_without_a_reference(bf16_dump, stories_path, forced_sequences, tmp_path):
    reader = CaptureReader(import_dump(bf16_dump, stories_path, tmp_path / "cap"))
    assert [list(r.prompt_ids) for r in reader.prompts] == forced_sequences
    assert [r.id for r in reader.prompts] == ["step0", "step1"]
    assert reader.manifest["teacher_forcing"]["source"] == "self"


def test_a_deferred_residual_dump_is_summed_into_the_same_residual_stream(stories_path, forced_sequences, bf16_dump, tmp_path, capsys):
    """vLLM's layer structure (each layer returns (hidden, residual), the add deferred to the next layer's norm),
    dumped by msprobe: the import sums the two outputs and gets transformers' residual stream bit for bit; output 0
    alone is not it."""
    dump = msprobe_dump(stories_path, tmp_path / "deferred", forced_sequences[:1], "--deferred-residual")
    deferred = CaptureReader(import_dump(dump, stories_path, tmp_path / "cap"))
    assert "hidden+residual convention" in capsys.readouterr().out
    assert deferred.manifest["backend"]["msprobe"]["residual_convention"] == "hidden+residual"
    plain = CaptureReader(import_dump(bf16_dump, stories_path, tmp_path / "plain"))
    ours, theirs = deferred.arrays(deferred.prompts[0]).tensors(), plain.arrays(plain.prompts[0]).tensors()
    assert set(ours) == set(theirs)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    layer0 = json.loads(_dump_json(dump).read_text())["data"]["Module.model.layers.0.DeferredLayer.forward.0"]
    hidden_only = torch.load(_dump_json(dump).parent / "dump_tensor_data" / layer0["output"][0]["data_name"], weights_only=True)
    assert not torch.equal(hidden_only[0], theirs[layer_site(0)])


def _refused(args: list[str], capsys) -> str:
    assert main(["-q", "import-msprobe", *args]) == 2
    return capsys.readouterr().err


def test_a_generation_with_a_kv_cache_is_refused(stories_path, forced_sequences, tmp_path, capsys):
    dump = msprobe_dump(stories_path, tmp_path / "generate", [forced_sequences[0][:6]], "--generate", "3")
    err = _refused([str(dump), "--model", str(stories_path), "--out", str(tmp_path / "cap")], capsys)
    assert "decode step" in err and "use_cache=False" in err
    assert not (tmp_path / "cap").exists()


@pytest.mark.parametrize("options, words", [
    (("--task", "statistics"), ["task 'statistics'", "\"task\": \"tensor\""]),
    (("--level", "L1"), ["level 'L1'", "\"level\": \"L0\""]),
])
def test_dumps_that_are_not_module_level_tensors_are_refused(stories_path, forced_sequences, tmp_path, capsys, options, words):
    dump = msprobe_dump(stories_path, tmp_path / "dump", [forced_sequences[0][:6]], *options)
    err = _refused([str(dump), "--model", str(stories_path), "--out", str(tmp_path / "cap")], capsys)
    assert all(w in err for w in words), err


def test_damaged_or_ambiguous_dumps_are_refused_naming_the_fix(bf16_dump, stories_path, stories_reference, tmp_path, capsys):
    model = ["--model", str(stories_path)]
    # A tensor file gone.
    broken = tmp_path / "broken"
    shutil.copytree(bf16_dump, broken)
    victim = next(_dump_json(broken).parent.glob("dump_tensor_data/Module.model.layers.2.LlamaDecoderLayer.forward.0.output.0.pt"))
    victim.unlink()
    err = _refused([str(broken), *model, "--out", str(tmp_path / "a")], capsys)
    assert victim.name in err and "missing" in err
    # Two ranks of one step: one rank's directory must be chosen.
    ranks = tmp_path / "ranks"
    source = _dump_json(bf16_dump).parent
    for rank in ("rank0", "rank1"):
        shutil.copytree(source, ranks / "step0" / rank)
    err = _refused([str(ranks), *model, "--out", str(tmp_path / "b")], capsys)
    assert "2 ranks" in err and "rank0" in err
    # No token ids (the embedding not dumped) and nothing to say what the passes ran on.
    blind = tmp_path / "blind"
    shutil.copytree(bf16_dump, blind)
    for step in (0, 1):
        path = _dump_json(blind, step)
        data = json.loads(path.read_text())
        data["data"] = {k: v for k, v in data["data"].items() if ".embed_tokens." not in k}
        for entry in data["data"].values():  # transformers dumps the layers' position_ids: drop them to lose positions too
            (entry.get("input_kwargs") or {}).pop("position_ids", None)
        path.write_text(json.dumps(data))
    err = _refused([str(blind), *model, "--out", str(tmp_path / "c")], capsys)
    assert "--teacher-forcing" in err and "--prompts" in err
    # ...which a reference capture resolves.
    import_dump(blind, stories_path, tmp_path / "d", "--teacher-forcing", str(stories_reference.path))
    # A reference capture with other prompts than the dump's passes.
    err = _refused([str(_dump_json(bf16_dump).parent.parent), *model, "--out", str(tmp_path / "e"),
                    "--teacher-forcing", str(stories_reference.path)], capsys)
    assert "1 forward pass" in err and "2 prompt" in err
    assert not any((tmp_path / name).exists() for name in "abce")


def test_a_prompt_set_names_the_passes_and_splits_prompt_from_continuation(bf16_dump, stories_path, short_prompts, stories_reference, tmp_path):
    reader = CaptureReader(import_dump(bf16_dump, stories_path, tmp_path / "cap", "--prompts", str(short_prompts)))
    assert [(r.id, r.prompt_ids, r.continuation_ids) for r in reader.prompts] == \
        [(r.id, r.prompt_ids, r.continuation_ids) for r in stories_reference.prompts]
    comparison = compare_captures(stories_reference, reader)
    assert all(e["metrics"]["relative_l2"] == 0.0 for p in comparison["prompts"] for e in p["sites"])


def test_a_dump_of_another_model_is_refused_before_anything_is_written(bf16_dump, builtin_path, tmp_path, capsys):
    err = _refused([str(bf16_dump), "--model", str(builtin_path), "--out", str(tmp_path / "cap")], capsys)
    assert "--model the dump was made with" in err and str(builtin_path) in err
    assert not (tmp_path / "cap").exists()
