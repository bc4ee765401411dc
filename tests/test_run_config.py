"""run --config run.toml (precision/run_file.py): one real run on stories260K from a configuration file alone, with
relative paths and a working directory elsewhere; flags overriding the file through the real command line; refusals
of unknown tables, keys and values of the wrong type (exit 2, naming the key and the known ones)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from precision.cli import main
from tests.conftest import REPO, SHORT_PROMPTS, write_prompts

RUN_TOML = """\
# a run described by this file alone
[run]
prompts = "prompts/short.jsonl"
model = "{model}"
out = "runs/from-config"
target = "hf:cpu:fp16"
truth = "none"
envelope = "none"
replay = false
repeats = 1
max_new_tokens = 4
layers = [0, 2]

[thresholds]
rel_l2_fail = 0.5

[regress]
top1_drop = 0.02
"""
SERVING_TABLE = """
[serving.local]
url = "http://127.0.0.1:8000/v1"
max_tokens = 4
"""


@pytest.fixture(scope="module")
def configured(stories_path, tmp_path_factory):
    """A configuration directory and the run its file describes, started from another working directory."""
    root = tmp_path_factory.mktemp("configured")
    (root / "prompts").mkdir()
    write_prompts(root / "prompts" / "short.jsonl", SHORT_PROMPTS)
    config = root / "run.toml"
    config.write_text(RUN_TOML.format(model=stories_path), encoding="utf-8")
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    before = Path.cwd()
    os.chdir(elsewhere)
    try:
        code = main(["-q", "run", "--config", "../" + root.name + "/run.toml"])
    finally:
        os.chdir(before)
    return SimpleNamespace(root=root, config=config, code=code, out=root / "runs" / "from-config", elsewhere=elsewhere)


def test_a_run_from_the_config_file_alone(configured, stories_path):
    assert configured.code == 0
    run = json.loads((configured.out / "run.json").read_text())
    assert run["prompts"] == str(configured.root / "prompts" / "short.jsonl")  # relative to the file, not the working directory
    assert (run["model"], run["target"], run["truth"], run["envelope"]) == (str(stories_path), "hf:cpu:fp16", None, [])
    assert (run["replay"], run["repeats"], run["max_new_tokens"], run["engine_args"]) == (False, 1, 4, {})
    assert run["selection"]["layers"] == [0, 2]
    assert run["config_file"] == {"path": str(configured.config),
                                  "sha256": hashlib.sha256(configured.config.read_bytes()).hexdigest()}
    summary = json.loads((configured.out / "summary.json").read_text())
    assert summary["verdict"]["thresholds"]["rel_l2_fail"] == 0.5
    assert (configured.out / "report.html").is_file()
    assert not any(configured.elsewhere.iterdir())  # nothing was written where the command was started


def _configured_by_cli(monkeypatch, argv: list[str]):
    """The RunConfig the command line builds (the real parser and _run; the run itself is replaced)."""
    seen = {}

    def fake_run(config, source=None, *, junit=None):
        seen.update(config=config, junit=junit)
        return SimpleNamespace(verdict=SimpleNamespace(summary="PASS (not run)", status=SimpleNamespace(value="PASS")), files={}, serving=None)

    monkeypatch.setattr("precision.api.run", fake_run)
    assert main(["-q", "run", *argv]) == 0
    return seen["config"], seen["junit"]


def test_flags_given_override_the_file_and_flags_not_given_do_not(configured, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with_engine = configured.root / "engine.toml"  # beside run.toml: its relative paths mean the same
    with_engine.write_text(configured.config.read_text() + SERVING_TABLE + "\n[run.engine_args]\nseed = 7\n", encoding="utf-8")
    config, junit = _configured_by_cli(monkeypatch, [
        "--config", str(with_engine), "--repeats", "3",  # 3 is the flag's documented default: given, it still wins
        "--out", "here", "--engine-arg", "max_model_len=64", "--threshold", "rel_l2_fail=0.25", "--junit", "j.xml"])
    assert config.repeats == 3 and config.out == Path("here")  # a flag's relative path is the working directory's
    assert config.engine_args == {"seed": 7, "max_model_len": 64}  # merged key by key
    assert config.thresholds.rel_l2_fail == 0.25
    assert junit == "j.xml"
    # not given: the file's values
    assert (config.max_new_tokens, config.target, config.truth, config.replay, config.envelope) == (4, "hf:cpu:fp16", None, False, ())
    assert config.prompts == configured.root / "prompts" / "short.jsonl"
    assert config.serving == {"local": {"url": "http://127.0.0.1:8000/v1", "max_tokens": 4}}
    assert config.config_file["path"] == str(with_engine)


def test_without_a_file_the_defaults_hold(monkeypatch, tmp_path):
    from precision import PROMPT_SETS, DEFAULT_ENVELOPE
    from precision.pipeline import RunConfig

    monkeypatch.chdir(tmp_path)
    config, junit = _configured_by_cli(monkeypatch, ["--out", "o"])
    defaults = RunConfig(prompts=PROMPT_SETS, out=Path("o"))
    assert config.prompts == PROMPT_SETS == (REPO / "golden").resolve()  # the shipped sets, golden/ in the checkout
    assert (config.reference, config.truth, config.repeats, config.max_new_tokens, config.replay) == \
           (defaults.reference, defaults.truth, defaults.repeats, defaults.max_new_tokens, True)
    assert config.envelope == DEFAULT_ENVELOPE and config.serving == {} and config.config_file is None and junit is None


def test_a_golden_store_given_relative_to_the_file_is_resolved(tmp_path):
    from precision import load_run_config

    (tmp_path / "store").mkdir()
    (tmp_path / "run.toml").write_text('[run]\nreference = "store"\ntarget = "hf:cpu:fp16"\n')
    assert load_run_config(tmp_path / "run.toml").reference == str(tmp_path / "store")
    (tmp_path / "spec.toml").write_text('[run]\nreference = "hf:cpu:fp32"\n')
    assert load_run_config(tmp_path / "spec.toml").reference == "hf:cpu:fp32"  # a spec is not a path


@pytest.mark.parametrize("text, fragments", [
    ("[run]\nprompt = 'a.jsonl'\n", ["unknown [run] key(s) prompt", "known: prompts, model, out"]),
    ("[runs]\nprompts = 'a.jsonl'\n", ["unknown table [runs]", "[run], [thresholds], [regress], [serving.NAME]"]),
    ("prompts = 'a.jsonl'\n", ["unknown key 'prompts' outside any table", "go under [run]"]),
    ("[run]\nrepeats = '3'\n", ["[run] repeats = '3'", "must be an integer"]),
    ("[run]\nrepeats = 0\n", ["[run] repeats = 0", "at least 1"]),
    ("[run]\nreplay = 'no'\n", ["[run] replay", "true or false"]),
    ("[run]\nenvelope = 'all'\n", ["[run] envelope", "default, none"]),
    ("[run]\nlayers = [0, true]\n", ["[run] layers", "list of integers"]),
    ("[run.engine_args]\nstarted = 1979-05-27T07:32:00Z\n", ["[run] engine_args", "engine settings are strings, numbers"]),
    ("[thresholds]\nr_logit_fail = 1.3\n", ["unknown threshold setting(s) ['r_logit_fail']", "r_logits_fail"]),
    ("[regress]\ntop1_drops = 0.1\n", ["unknown [regress] setting(s) ['top1_drops']", "top1_drop"]),
    ("[serving]\nurl = 'x'\n", ["serving.url must be a table"]),
    ("[run\n", ["cannot read config file"]),
])
def test_bad_config_files_exit_2_naming_the_problem(tmp_path, capsys, text, fragments):
    config = tmp_path / "run.toml"
    config.write_text(text, encoding="utf-8")
    assert main(["-q", "run", "--config", str(config), "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(config) in err, err
    for fragment in fragments:
        assert fragment in err, err
    assert not (tmp_path / "never").exists()


def test_a_missing_config_file_exits_2(tmp_path, capsys):
    assert main(["-q", "run", "--config", str(tmp_path / "absent.toml")]) == 2
    assert "cannot read config file" in capsys.readouterr().err


def test_serving_tables_with_a_transformers_target_are_refused_before_any_capture(configured, tmp_path, capsys):
    config = configured.root / "serving-hf.toml"
    config.write_text(configured.config.read_text() + "\n[serving.busy]\nmax_num_seqs = 8\n", encoding="utf-8")
    assert main(["-q", "run", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    assert "need the vLLM target" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
