"""The serving stage's side of the run configuration file, without an engine: paths inside engine settings resolved
against the file's directory ([run.engine_args] and [serving.NAME] alike, and the parity command's --config), the
engine arguments each configuration gets (the run target's with the table's over them), and the resume check's hold
on the [serving.NAME] tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from precision.backends import BackendOptions
from precision.errors import PrecisionError
from precision.model import inspect_model
from precision.planning import plan_from_prompts
from precision.run_file import load_run_config, read_run_file
from precision.serving.config import serving_configurations
from precision.serving.run_stage import configuration_engine_kwargs, stage_options
from precision.serving.setting_paths import is_explicit_path, resolve_setting_paths

PATHS_TOML = """\
[run]
prompts = "p.jsonl"
[run.engine_args]
download_dir = "./weights-cache"
hf_config_path = "configs/llama"
[serving.spec]
speculative_config = {{ model = "draft", num_speculative_tokens = 2 }}
generation_config = "org/not-here"
kv_transfer_config = {{ kv_connector = "X", kv_connector_extra_config = {{ shared_storage_path = "../shared", list = ["./a", "b"] }} }}
log_config_file = "{absolute}"
compilation_config = {{ cache_dir = "~/compile-cache" }}
max_num_seqs = 4
"""


@pytest.fixture
def paths_file(tmp_path):
    root = tmp_path / "project"
    (root / "configs" / "llama").mkdir(parents=True)
    (root / "draft").mkdir()
    (root / "p.jsonl").write_text("", encoding="utf-8")
    config = root / "run.toml"
    config.write_text(PATHS_TOML.format(absolute=tmp_path / "logging.json"), encoding="utf-8")
    return root, config


def test_paths_in_engine_settings_and_serving_tables_are_resolved_against_the_file(paths_file, tmp_path):
    root, config = paths_file
    file = read_run_file(config)
    engine_args = file.run["engine_args"]
    assert engine_args["download_dir"] == str(root / "weights-cache")  # explicit ./: a path even where nothing exists yet
    assert engine_args["hf_config_path"] == str(root / "configs" / "llama")  # a path setting naming what exists there
    table = file.serving["spec"]
    assert table["speculative_config"] == {"model": str(root / "draft"), "num_speculative_tokens": 2}
    assert table["generation_config"] == "org/not-here"  # a hub id (nothing of that name beside the file) stays
    extra = table["kv_transfer_config"]["kv_connector_extra_config"]
    assert extra == {"shared_storage_path": str(tmp_path / "shared"), "list": [str(root / "a"), "b"]}
    assert table["log_config_file"] == str(tmp_path / "logging.json")  # absolute: itself
    assert table["compilation_config"]["cache_dir"] == str(Path("~/compile-cache").expanduser().resolve())
    assert table["max_num_seqs"] == 4
    assert load_run_config(config).serving == file.serving  # what the run (and run.json) gets


def test_the_parity_command_resolves_its_config_tables_the_same_way(paths_file):
    root, config = paths_file
    (spec,) = serving_configurations([], str(config))
    assert spec.engine_args["speculative_config"]["model"] == str(root / "draft")
    # A --serving flag has no file: its values are as given (vLLM reads them against the working directory).
    (flag,) = serving_configurations(["f:download_dir=./here"])
    assert flag.engine_args == {"download_dir": "./here"}


def test_only_explicit_relative_strings_and_path_settings_are_paths(tmp_path):
    assert [is_explicit_path(v) for v in ("./x", "../x", "~/x", ".", "~", "x/y", "fp8", "", 3)] == [True] * 5 + [False] * 4
    (tmp_path / "fp8").mkdir()  # a directory named like a value does not make a non-path setting a path
    assert resolve_setting_paths({"kv_cache_dtype": "fp8", "download_dir": "fp8"}, tmp_path) == {
        "kv_cache_dtype": "fp8", "download_dir": str(tmp_path / "fp8")}


def _plan(stories_path, short_prompts):
    model = inspect_model(stories_path)
    return model, plan_from_prompts(short_prompts, model, max_new_tokens=8)


def test_each_configuration_gets_the_run_targets_engine_arguments_with_its_table_over_them(stories_path, short_prompts):
    model, plan = _plan(stories_path, short_prompts)
    tables = {"chunked": {"max_num_batched_tokens": 8, "enable_chunked_prefill": True},
              "warm": {"workload": "warm-prefix", "block_size": 32}}
    run_args = {"disable_log_stats": False, "max_num_batched_tokens": 512}
    kwargs = configuration_engine_kwargs(tables, model, BackendOptions(engine_args=run_args), plan)
    assert kwargs["chunked"]["max_num_batched_tokens"] == 8 and kwargs["chunked"]["enable_chunked_prefill"] is True  # the table's
    assert kwargs["warm"]["max_num_batched_tokens"] == 512  # the run's, where the table says nothing
    assert kwargs["warm"]["enable_prefix_caching"] is True and kwargs["warm"]["block_size"] == 32
    assert all(k["disable_log_stats"] is False for k in kwargs.values())
    # The model length is the one the run's target capture gets (reference_side.capture_role's sizing).
    expected_length = min(plan.max_tokens_needed + 1, model.max_position_embeddings)
    assert {k["max_model_len"] for k in kwargs.values()} == {expected_length}
    assert stage_options(BackendOptions(engine_args=run_args), plan, model).max_model_len == expected_length
    # A workload that sizes its engine by the sequences served beside it (preempt) keeps the run's other settings.
    companions = [list(p.prompt_ids) + list(p.continuation_ids or ()) for p in plan.prompts]
    preempt = configuration_engine_kwargs({"preempt": {"workload": "preempt"}}, model,
                                          BackendOptions(engine_args={**run_args, "max_logprobs": 7}), plan, companions)["preempt"]
    assert preempt["max_logprobs"] == 7 and preempt["num_gpu_blocks_override"] >= 1 and preempt["max_num_seqs"] == 2
    # Without engine arguments of the run, the configurations get none of those: the run's are what reached them.
    bare = configuration_engine_kwargs(tables, model, BackendOptions(), plan)
    assert "disable_log_stats" not in bare["warm"] and bare["warm"]["max_num_batched_tokens"] == expected_length


def _stored_run(tmp_path, **fields) -> Path:
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"prompts": "p", **fields}), encoding="utf-8")
    return out


def test_resume_holds_the_serving_tables(tmp_path):
    from precision.pipeline import _check_resumed_run

    tables = {"chunked": {"max_num_batched_tokens": 8, "enable_chunked_prefill": True}}
    out = _stored_run(tmp_path, serving=tables)
    _check_resumed_run(out, {"prompts": "p", "serving": json.loads(json.dumps(tables))})  # the same tables: resumed
    with pytest.raises(PrecisionError, match=r"other \[serving.NAME\] tables .*'max_num_batched_tokens': 8.*--force"):
        _check_resumed_run(out, {"prompts": "p", "serving": {"chunked": {"max_num_batched_tokens": 16, "enable_chunked_prefill": True}}})
    with pytest.raises(PrecisionError, match=r"serving"):
        _check_resumed_run(out, {"prompts": "p", "serving": {}})


def test_a_run_json_from_before_serving_was_recorded_resumes_without_tables(tmp_path):
    from precision.pipeline import _check_resumed_run

    out = _stored_run(tmp_path)
    _check_resumed_run(out, {"prompts": "p", "serving": {}})
    with pytest.raises(PrecisionError, match="serving"):
        _check_resumed_run(out, {"prompts": "p", "serving": {"busy": {"max_num_seqs": 8}}})


def test_a_serving_table_json_cannot_record_is_refused_when_the_file_is_read(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("[serving.dated]\nmax_num_seqs = 4\nwhen = 2026-11-30\n", encoding="utf-8")
    with pytest.raises(PrecisionError, match=r"\[serving.dated\]: holds .*\(date\); engine settings are strings"):
        read_run_file(config)
    config.write_text("[serving.fine]\nmax_num_seqs = 4\n", encoding="utf-8")
    assert read_run_file(config).serving == {"fine": {"max_num_seqs": 4}}
