"""The parity command's arguments: serving configurations from --serving and [serving.NAME] tables, refused before
any model loads when they cannot run (exit 2, one line naming the fix). No engine runs here."""

from __future__ import annotations

import pytest

from precision.cli import main
from precision.serving.config import parse_serving, serving_configurations
from precision.errors import PrecisionError
from precision.serving.engine import ServingConfig


def test_serving_spec_reads_json_values_and_bare_words():
    name, settings = parse_serving("prod:max_num_seqs=8,enable_prefix_caching=true,kv_cache_dtype=fp8,workload=cobatch")
    assert name == "prod"
    assert settings == {"max_num_seqs": 8, "enable_prefix_caching": True, "kv_cache_dtype": "fp8", "workload": "cobatch"}


@pytest.mark.parametrize("spec", ["no-colon", "bad name:x=1", "ok:novalue", "ok:=3"])
def test_malformed_serving_spec_is_refused(spec):
    with pytest.raises(PrecisionError):
        parse_serving(spec)


def test_config_tables_and_flags_combine(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[serving.prod]\nmax_num_seqs = 64\nenable_prefix_caching = true\nworkload = "warm-prefix"\n', encoding="utf-8")
    configs = serving_configurations(["compiled:enforce_eager=false"], str(toml))
    assert [c.name for c in configs] == ["prod", "compiled"]
    assert configs[0].workload == "warm-prefix" and configs[0].engine_args == {"max_num_seqs": 64, "enable_prefix_caching": True}
    assert configs[1].engine_args == {"enforce_eager": False}


def test_workloads_bring_the_settings_they_need():
    cobatch = ServingConfig.from_mapping("c", {"workload": "cobatch", "companions": 3})
    assert cobatch.engine_args == {"max_num_seqs": 4} and cobatch.companions == 3
    warm = ServingConfig.from_mapping("w", {"workload": "warm-prefix"})
    assert warm.engine_args == {"enable_prefix_caching": True}
    assert ServingConfig.from_mapping("tp", {"tensor_parallel_size": 2}).needs_multiprocess


def test_unknown_workload_is_refused():
    with pytest.raises(PrecisionError, match="workload"):
        ServingConfig.from_mapping("x", {"workload": "stampede"})


def test_parity_without_configurations_exits_2(tmp_path, short_prompts, stories_path, capsys):
    code = main(["-q", "parity", "--model", str(stories_path), "--prompts", str(short_prompts), "--out", str(tmp_path / "out")])
    assert code == 2
    assert "no serving configuration" in capsys.readouterr().err


def test_duplicate_configuration_names_exit_2(tmp_path, short_prompts, stories_path, capsys):
    code = main(["-q", "parity", "--model", str(stories_path), "--prompts", str(short_prompts), "--out", str(tmp_path / "out"),
                 "--serving", "a:max_num_seqs=2", "--serving", "a:max_num_seqs=4"])
    assert code == 2
    assert "given twice" in capsys.readouterr().err


def test_run_refuses_a_bad_serving_table_before_any_model_runs(tmp_path, short_prompts, stories_path):
    from precision.pipeline import RunConfig, run

    config = RunConfig(prompts=short_prompts, out=tmp_path / "run", model=stories_path, target="vllm",
                       serving={"prod": {"max_num_seqs": 4, "workload": "stampede"}})
    with pytest.raises(PrecisionError, match="workload"):
        run(config)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("setting", ["model", "tokenizer", "worker_extension_cls"])
def test_run_refuses_a_serving_table_naming_a_setting_precision_check_owns(tmp_path, short_prompts, stories_path, setting):
    """Such a table would otherwise collide at engine start, after the whole CPU side was captured."""
    from precision.pipeline import RunConfig, run

    config = RunConfig(prompts=short_prompts, out=tmp_path / "run", model=stories_path, target="vllm",
                       serving={"prod": {"max_num_seqs": 4, setting: "x"}})
    with pytest.raises(PrecisionError, match="set by precision-check itself"):
        run(config)
    assert not (tmp_path / "run").exists()


def test_parity_engine_args_reach_the_baseline_and_are_checked_before_any_capture(tmp_path, short_prompts, stories_path, capsys):
    """--engine-arg is the eager baseline's (and so every configuration's starting point): an unknown one is refused
    by the engine's own setting names before anything is captured."""
    out = tmp_path / "out"
    code = main(["-q", "parity", "--model", str(stories_path), "--prompts", str(short_prompts), "--out", str(out),
                 "--serving", "a:max_num_seqs=2", "--engine-arg", "no_such_engine_setting=1"])
    assert code == 2
    error = capsys.readouterr().err
    assert "unknown vLLM engine setting(s): 'no_such_engine_setting'" in error
    assert not out.exists()
