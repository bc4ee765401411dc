"""regress on a REAL run of stories260K (transformers with the MLP computed in FP32 and rounded once, as fused
kernels do: a legitimate target that passes its own verdict), and on copies of its comparison.json changed the
way another build would change them. No vLLM."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import xmlschema

from precision.analysis.regress import METRICS, RegressTolerance, noise_allowance, regress
from precision.cli import main
from precision.errors import MismatchedCapturesError, PrecisionError
from precision.io import read_result_json, write_json_atomic
from precision.report.junit import junit_xml
from tests.conftest import REPO

SCHEMA = xmlschema.XMLSchema(str(REPO / "tests" / "data" / "junit.xsd"))


@pytest.fixture(scope="session")
def real_run(stories_path, short_prompts, tmp_path_factory) -> Path:
    """One real run with the envelope, replay and a determinism record (--repeats 2)."""
    out = tmp_path_factory.mktemp("regress") / "run"
    assert main(["-q", "run", "--prompts", str(short_prompts), "--model", str(stories_path), "--target", "hf:cpu:bf16",
                 "--target-variant", "mlp:fused", "--repeats", "2", "--out", str(out)]) == 0
    return out


def derive(run: Path, out: Path, edit=None, edit_summary=None) -> Path:
    """A copy of the run's comparison.json and summary.json (all regress reads), changed by ``edit``."""
    out.mkdir(parents=True)
    comparison = read_result_json(run / "comparison.json")
    summary = read_result_json(run / "summary.json")
    if edit:
        edit(comparison)
    if edit_summary:
        edit_summary(summary)
    write_json_atomic(out / "comparison.json", comparison)
    write_json_atomic(out / "summary.json", summary)
    return out


def prompt_site(comparison: dict, prompt: str, site: str) -> dict:
    entry = next(p for p in comparison["prompts"] if p["id"] == prompt)
    return next(s for s in entry["sites"] if s["site"] == site)


def step(comparison: dict, site: str) -> dict:
    return next(s for s in comparison["analysis"]["local"]["steps"] if s["site"] == site)


def row(result: dict, prompt: str | None, site: str, metric: str) -> dict:
    return next(r for r in result["rows"] if (r["prompt"], r["site"], r["metric"]) == (prompt, site, metric))


# --- pairing ---------------------------------------------------------------------------------------------------

def test_identical_candidate_passes_and_every_promised_metric_is_compared(real_run):
    result = regress(real_run, real_run)
    assert result["status"] == "PASS", result["message"]
    assert {r["metric"] for r in result["rows"]} == set(METRICS)
    assert not result["missing"] and not any(r["worse"] for r in result["rows"])
    sites = {r["site"] for r in result["rows"]}
    assert {"embed", "layer.0", "layer.4", "final_norm", "logits"} <= sites
    assert {r["prompt"] for r in result["rows"]} == {"story", "chat", None}


def test_reordered_prompts_sites_and_steps_still_pair_by_name(real_run, tmp_path):
    def reverse(c):
        c["prompts"].reverse()
        for p in c["prompts"]:
            p["sites"].reverse()
        c["sites"].reverse()
        c["analysis"]["local"]["steps"].reverse()

    reordered = derive(real_run, tmp_path / "reordered", reverse)
    original = read_result_json(real_run / "comparison.json")
    # pairing by position would compare story's embed with chat's logits: the values differ
    assert read_result_json(reordered / "comparison.json")["prompts"][0]["sites"][0]["metrics"]["relative_l2"] != \
        original["prompts"][0]["sites"][0]["metrics"]["relative_l2"]
    result = regress(real_run, reordered)
    assert result["status"] == "PASS", result["message"]
    assert all(r["change"] == 1.0 for r in result["rows"])


def test_a_worse_row_in_a_reordered_candidate_is_named_by_prompt_and_site(real_run, tmp_path):
    def reverse_and_worsen(c):
        c["prompts"].reverse()
        prompt_site(c, "story", "layer.3")["metrics"]["relative_l2"] *= 2
    result = regress(real_run, derive(real_run, tmp_path / "c", reverse_and_worsen))
    assert result["status"] == "FAIL"
    assert result["first_worse"] == {"prompt": "story", "site": "layer.3", "metric": "relative_l2"}
    assert "relative_l2 at layer.3 of prompt story" in result["message"]
    assert not row(result, "chat", "layer.3", "relative_l2")["worse"]


# --- non-finite values -----------------------------------------------------------------------------------------

def _nan_at(prompt: str, site: str):
    """What compare writes when the target holds one NaN at a site: the count and first index, a finite relative
    L2 over the elements finite on both sides, and no replay (analysis.explain skips it on non-finite captures)."""
    def edit(c):
        nf = prompt_site(c, prompt, site)["metrics"]["non_finite"]
        nf["actual_nan"], nf["first_index"] = 1, [5, 0]
        c["analysis"]["first_non_finite"] = {"prompt": prompt, "site": site, "index": [5, 0], "position": 5, "side": "target"}
        c["analysis"]["local"] = {"available": False, "reason": "the captures hold non-finite values; see first_non_finite", "steps": []}
    return edit


def test_a_candidate_with_one_nan_site_fails_naming_that_site(real_run, tmp_path):
    result = regress(real_run, derive(real_run, tmp_path / "nan", _nan_at("chat", "layer.2")))
    assert result["status"] == "FAIL"
    nan_row = row(result, "chat", "layer.2", "target_non_finite")
    assert nan_row["worse"] and nan_row["baseline"] == 0 and nan_row["candidate"] == 1
    assert "target_non_finite at layer.2 of prompt chat" in result["message"]
    worse = [r for r in result["rows"] if r["worse"] and not r["missing"]]
    assert [(r["prompt"], r["site"]) for r in worse] == [("chat", "layer.2")]


def test_nan_or_inf_metric_values_in_the_candidate_are_worse_not_skipped(real_run, tmp_path):
    def edit(c):
        prompt_site(c, "story", "layer.1")["metrics"]["relative_l2"] = math.nan
        prompt_site(c, "chat", "final_norm")["truth"]["R"] = math.inf
        next(p for p in c["prompts"] if p["id"] == "chat")["logits"]["top1_agreement"] = math.nan
    result = regress(real_run, derive(real_run, tmp_path / "c", edit))
    assert row(result, "story", "layer.1", "relative_l2")["worse"]
    assert row(result, "chat", "final_norm", "R")["worse"]
    assert row(result, "chat", "logits", "top1_agreement")["worse"]
    assert result["status"] == "FAIL"


def test_a_finite_candidate_against_a_nan_baseline_is_not_worse(real_run, tmp_path):
    baseline = derive(real_run, tmp_path / "b", lambda c: prompt_site(c, "story", "layer.1")["metrics"].update(relative_l2=math.nan))
    result = regress(baseline, real_run)
    assert not row(result, "story", "layer.1", "relative_l2")["worse"]
    assert result["status"] == "PASS", result["message"]


# --- missing rows ----------------------------------------------------------------------------------------------

def _no_replay(c):
    c["analysis"]["local"] = {"available": False, "reason": "no replay was asked for", "steps": []}


def test_a_candidate_without_replay_fails_naming_the_missing_rows(real_run, tmp_path):
    result = regress(real_run, derive(real_run, tmp_path / "noreplay", _no_replay))
    assert result["status"] == "FAIL"
    steps = read_result_json(real_run / "comparison.json")["analysis"]["local"]["steps"]
    missing = {(m["site"], m["metric"]) for m in result["missing"]}
    assert {(s["site"], "local_error") for s in steps} | {(s["site"], "local_R") for s in steps} <= missing
    assert all(m["prompt"] is None for m in result["missing"])
    assert "lacks" in result["message"] and "local_error at layer.0" in result["message"] and "no replay was asked for" in result["message"]
    assert result["first_worse"] == {"prompt": None, "site": "layer.0", "metric": "local_error"}


def test_a_candidate_with_replay_against_a_baseline_without_lists_the_rows_it_did_not_compare(real_run, tmp_path):
    result = regress(derive(real_run, tmp_path / "b", _no_replay), real_run)
    assert result["status"] == "PASS", result["message"]
    assert {(r["site"], r["metric"]) for r in result["not_compared"]} >= {("layer.0", "local_error")}


def test_a_missing_prompt_or_site_fails_naming_it(real_run, tmp_path):
    no_chat = derive(real_run, tmp_path / "p", lambda c: c["prompts"].__setitem__(slice(None), [p for p in c["prompts"] if p["id"] != "chat"]))
    result = regress(real_run, no_chat)
    assert result["status"] == "FAIL" and {m["prompt"] for m in result["missing"]} == {"chat"}
    assert "of prompt chat" in result["message"]

    def drop_site(c):
        story = next(p for p in c["prompts"] if p["id"] == "story")
        story["sites"] = [s for s in story["sites"] if s["site"] != "layer.4"]
    result = regress(real_run, derive(real_run, tmp_path / "s", drop_site))
    assert {(m["prompt"], m["site"]) for m in result["missing"]} == {("story", "layer.4")}
    assert "relative_l2 at layer.4 of prompt story" in result["message"]


def test_a_candidate_without_truth_fails_naming_the_r_rows(real_run, tmp_path):
    def drop_truth(c):
        for p in c["prompts"]:
            for s in p["sites"]:
                s["truth"] = None
    result = regress(real_run, derive(real_run, tmp_path / "t", drop_truth))
    assert {m["metric"] for m in result["missing"]} == {"R", "target_vs_truth"}


# --- noise allowances, one kind at a time ----------------------------------------------------------------------

SPREAD = 1e-4  # a run-to-run relative L2 planted in the baseline's determinism record


@pytest.fixture(scope="module")
def noisy(real_run, tmp_path_factory) -> Path:
    return derive(real_run, tmp_path_factory.mktemp("noisy") / "b", lambda c: c["analysis"]["determinism"].update(max_relative_l2=SPREAD))


def _limit_case(baseline: Path, tmp_path: Path, setter, limit: float, higher_is_better: bool = False) -> tuple[dict, dict]:
    """Two candidates: one just inside ``limit``, one just beyond it."""
    inside, beyond = (limit * (1 + 1e-6), limit * (1 - 1e-6)) if higher_is_better else (limit * (1 - 1e-6), limit * (1 + 1e-6))
    results = []
    for name, value in (("inside", inside), ("beyond", beyond)):
        results.append(regress(baseline, derive(baseline, tmp_path / name, lambda c, v=value: setter(c, v))))
    return results[0], results[1]


def test_relative_error_allowance_is_the_run_to_run_spread(noisy, tmp_path):
    base = prompt_site(read_result_json(noisy / "comparison.json"), "story", "layer.1")["metrics"]["relative_l2"]
    limit = base * 1.1 + 3 * SPREAD
    inside, beyond = _limit_case(noisy, tmp_path, lambda c, v: prompt_site(c, "story", "layer.1")["metrics"].update(relative_l2=v), limit)
    assert inside["status"] == "PASS" and beyond["status"] == "FAIL"
    assert row(beyond, "story", "layer.1", "relative_l2")["limit"] == pytest.approx(limit)


def test_a_deterministic_baseline_allows_only_the_relative_tolerance(real_run, tmp_path):
    base = prompt_site(read_result_json(real_run / "comparison.json"), "story", "layer.1")["metrics"]["relative_l2"]
    assert read_result_json(real_run / "comparison.json")["analysis"]["determinism"]["max_relative_l2"] == 0.0
    inside, beyond = _limit_case(real_run, tmp_path, lambda c, v: prompt_site(c, "story", "layer.1")["metrics"].update(relative_l2=v), base * 1.1)
    assert inside["status"] == "PASS" and beyond["status"] == "FAIL"


def test_r_allowance_is_the_spread_over_the_references_own_error(noisy, tmp_path):
    truth = prompt_site(read_result_json(noisy / "comparison.json"), "chat", "logits")["truth"]
    limit = truth["R"] * 1.1 + 3 * SPREAD / truth["expected_vs_truth"]
    inside, beyond = _limit_case(noisy, tmp_path, lambda c, v: prompt_site(c, "chat", "logits")["truth"].update(R=v), limit)
    assert inside["status"] == "PASS" and beyond["status"] == "FAIL"


def test_local_r_allowance_uses_the_steps_own_local_error(noisy, tmp_path):
    s = step(read_result_json(noisy / "comparison.json"), "layer.2")
    limit = s["local_R"] * 1.1 + 3 * SPREAD * (1 + s["local_R"]) / s["local"]
    inside, beyond = _limit_case(noisy, tmp_path, lambda c, v: step(c, "layer.2").update(local_R=v), limit)
    assert inside["status"] == "PASS" and beyond["status"] == "FAIL"


def test_kl_allowance_is_in_kl_units_not_relative_l2_added_to_kl(noisy, tmp_path):
    comparison = read_result_json(noisy / "comparison.json")
    kl = next(p for p in comparison["prompts"] if p["id"] == "story")["logits"]["kl_mean"]
    r_b = prompt_site(comparison, "story", "logits")["metrics"]["relative_l2"]
    limit = kl * 1.1 + kl * ((1 + 3 * SPREAD / r_b) ** 2 - 1)
    assert kl > 0 and limit < kl * 1.1 + 3 * SPREAD  # the old rule's relative-L2 noise would have allowed more

    def set_kl(c, v):
        next(p for p in c["prompts"] if p["id"] == "story")["logits"]["kl_mean"] = v
    inside, beyond = _limit_case(noisy, tmp_path, set_kl, limit)
    assert inside["status"] == "PASS" and beyond["status"] == "FAIL"
    between = regress(noisy, derive(noisy, tmp_path / "between", lambda c: set_kl(c, (limit + kl * 1.1 + 3 * SPREAD) / 2)))
    assert row(between, "story", "logits", "logits_kl_mean")["worse"]


def test_local_gain_allowance_is_the_envelopes_gain_not_the_run_to_run_spread(noisy, real_run, tmp_path):
    s = step(read_result_json(noisy / "comparison.json"), "layer.3")
    assert s["envelope_gain_max"] > 0
    limit = abs(s["local_gain"]) * 1.1 + s["envelope_gain_max"]
    sign = 1 if s["local_gain"] >= 0 else -1
    inside, beyond = _limit_case(noisy, tmp_path, lambda c, v: step(c, "layer.3").update(local_gain=sign * v), limit)
    assert inside["status"] == "PASS" and beyond["status"] == "FAIL"
    tolerance = RegressTolerance()
    quiet = {"value": abs(s["local_gain"]), "envelope_gain_max": s["envelope_gain_max"]}
    assert noise_allowance("local_gain_abs", quiet, SPREAD, tolerance) == noise_allowance("local_gain_abs", quiet, 0.0, tolerance)
    assert noise_allowance("local_gain_abs", {**quiet, "envelope_gain_max": None}, SPREAD, tolerance) == 0.0


def test_top1_agreement_may_drop_by_top1_drop_only(real_run, tmp_path):
    base = next(p for p in read_result_json(real_run / "comparison.json")["prompts"] if p["id"] == "chat")["logits"]["top1_agreement"]

    def set_top1(c, v):
        next(p for p in c["prompts"] if p["id"] == "chat")["logits"]["top1_agreement"] = v
    inside, beyond = _limit_case(real_run, tmp_path, set_top1, base - 0.01, higher_is_better=True)
    assert inside["status"] == "PASS" and beyond["status"] == "FAIL"


def test_tolerances_must_be_finite_and_non_negative():
    for bad in ({"noise_factor": math.nan}, {"relative_tolerance": -0.1}, {"top1_drop": 2.0}, {"envelope_factor": math.inf}):
        with pytest.raises(PrecisionError):
            RegressTolerance.from_mapping(bad)


# --- bad input -------------------------------------------------------------------------------------------------

def test_runs_against_different_references_are_refused(real_run, tmp_path):
    other = derive(real_run, tmp_path / "o", lambda c: c["expected"].update(manifest_sha256="0" * 64))
    with pytest.raises(MismatchedCapturesError, match="different references"):
        regress(real_run, other)


@pytest.mark.parametrize("case, fragment", [
    ("summary without verdict", "lacks the required key 'verdict'"),
    ("comparison is a list", "comparison.json is not a precision-check-comparison"),
    ("comparison of another format", "comparison.json is not a precision-check-comparison"),
    ("prompts not a list", "prompts: expected a list, got dict"),
    ("a metric that is text", "metrics.relative_l2: expected a number, got str 'small'"),
    ("comparison not JSON", "cannot be read as JSON"),
    ("not a run directory", "comparison.json is missing"),
    ("a file, not a directory", "is not a directory"),
])
def test_malformed_inputs_exit_2_naming_the_file(real_run, tmp_path, capsys, case, fragment):
    candidate = derive(real_run, tmp_path / "c")
    comparison = read_result_json(candidate / "comparison.json")
    if case == "summary without verdict":
        summary = json.loads((candidate / "summary.json").read_text())
        del summary["verdict"]
        (candidate / "summary.json").write_text(json.dumps(summary))
    elif case == "comparison is a list":
        (candidate / "comparison.json").write_text("[]")
    elif case == "comparison of another format":
        (candidate / "comparison.json").write_text(json.dumps({**comparison, "format": "precision-check-summary"}))
    elif case == "prompts not a list":
        (candidate / "comparison.json").write_text(json.dumps({**comparison, "prompts": {}}))  # not through the validating writer
    elif case == "a metric that is text":
        prompt_site(comparison, "story", "embed")["metrics"]["relative_l2"] = "small"
        (candidate / "comparison.json").write_text(json.dumps(comparison, allow_nan=True))
    elif case == "comparison not JSON":
        (candidate / "comparison.json").write_text("{not json")
    elif case == "not a run directory":
        shutil.rmtree(candidate)
        candidate.mkdir()
    else:
        shutil.rmtree(candidate)
        candidate.write_text("x")
    assert main(["regress", str(real_run), str(candidate), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert fragment in err and str(candidate) in err
    assert "Traceback" not in err


# --- outputs ---------------------------------------------------------------------------------------------------

def test_junit_has_a_testcase_per_prompt_site_metric_and_validates(real_run, tmp_path):
    result = regress(real_run, derive(real_run, tmp_path / "nan", _nan_at("chat", "layer.2")))
    xml = junit_xml(None, regression=result, timestamp="2026-01-01T00:00:00")
    path = tmp_path / "regress.xml"
    path.write_bytes(xml)
    SCHEMA.validate(str(path))
    text = xml.decode()
    assert text.count("<testcase ") == len(result["rows"]) + 1  # + the candidate's own verdict
    assert text.count("<failure ") == sum(r["worse"] for r in result["rows"]) + (result["candidate"]["verdict"] == "FAIL")
    assert 'classname="regress.chat.layer.2" name="target_non_finite"' in text
    assert 'classname="regress.all-prompts.layer.0" name="local_error"' in text


def test_cli_writes_the_markdown_with_missing_rows_and_escaped_prompt_ids(real_run, tmp_path, capsys):
    def rename(c):
        next(p for p in c["prompts"] if p["id"] == "chat")["id"] = "a|<b>"
    baseline = derive(real_run, tmp_path / "b", rename)
    candidate = derive(baseline, tmp_path / "c", _no_replay)
    assert main(["regress", str(baseline), str(candidate), "--out", str(tmp_path / "r")]) == 1
    assert "lacks" in capsys.readouterr().out
    markdown = (tmp_path / "r" / "regression.md").read_text()
    assert "Rows the candidate lacks" in markdown and "local_error at layer.0" in markdown
    assert "a\\|&lt;b&gt;" in markdown and "<b>" not in markdown
    saved = read_result_json(tmp_path / "r" / "regression.json")
    assert saved["status"] == "FAIL" and saved["missing"]
    assert main(["regress", str(baseline), str(baseline), "--out", str(tmp_path / "same")]) == 0


def test_a_failed_candidate_verdict_fails_the_gate(real_run, tmp_path):
    failed = derive(real_run, tmp_path / "f", edit_summary=lambda s: s["verdict"].update(status="FAIL", summary="FAIL: planted"))
    result = regress(real_run, failed)
    assert result["status"] == "FAIL" and "own verdict failed: FAIL: planted" in result["message"]
