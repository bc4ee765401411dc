"""The verdict rule table on hand-made comparison documents: each rule fires on its condition, names the site,
and explains itself with the numbers."""

from __future__ import annotations

import copy

import pytest

from precision.analysis.verdict import Status, Thresholds
from precision.analysis.verdict import judge as judge_document
from tests.documents import complete
from precision.errors import PrecisionError


def _site(name, rel, truth=None, nan=0):
    return {
        "site": name,
        "layer": None,
        "metrics": {"relative_l2": rel, "non_finite": {"expected_nan": 0, "expected_inf": 0, "actual_nan": nan, "actual_inf": 0,
                                                        "first_index": [3, 0] if nan else None}},
        "truth": truth,
    }


def _truth(e, a):
    return {"expected_vs_truth": e, "actual_vs_truth": a, "R": a / e}


def _step(site, local=5e-3, local_r=1.0, gain=1e-4, env_local=6e-3, env_gain=5e-4):
    return {"site": site, "local": local, "local_R": local_r, "local_gain": gain, "envelope_local_max": env_local,
            "local_ratio": local / env_local, "envelope_gain_max": env_gain}


def comparison(**changes):
    doc = {
        "prompts": [{
            "id": "p",
            "sites": [_site("embed", 0.0, _truth(1e-3, 1e-3)), _site("layer.0", 6e-3, _truth(5e-3, 5e-3)),
                      _site("logits", 7e-3, _truth(6e-3, 6.5e-3))],
            "logits": {"top1_agreement": 1.0, "flips": []},
        }],
        "analysis": {"local": {"steps": [_step("layer.0"), _step("layer.1")]}, "envelope": None, "determinism": None},
    }
    for path, value in changes.items():
        target = doc
        keys = path.split("/")
        for key in keys[:-1]:
            target = target[int(key)] if isinstance(target, list) else target[key]
        target[int(keys[-1]) if isinstance(target, list) else keys[-1]] = value
    return doc


def judge(doc, thresholds=None):
    return judge_document(complete(doc), thresholds)


def rules(verdict):
    return {f.rule: f for f in verdict.findings} | {f.rule: f for p in verdict.prompts for f in p.findings}


def test_healthy_run_passes_and_says_why():
    verdict = judge(comparison())
    assert verdict.status is Status.PASS
    found = rules(verdict)
    assert "explained" in found and "1.00" in found["explained"].message
    assert "self-check" in found and "7.00e-03 at logits" in found["self-check"].message


def test_local_r_fails_and_names_the_layer():
    doc = comparison()
    doc["analysis"]["local"]["steps"][1] = _step("layer.1", local=1.8e-2, local_r=2.55)
    verdict = judge(doc)
    finding = rules(verdict)["local-R"]
    assert verdict.status is Status.FAIL and finding.site == "layer.1" and "2.55x" in finding.message


def test_local_gain_fails_and_names_the_layer():
    doc = comparison()
    doc["analysis"]["local"]["steps"][0] = _step("layer.0", gain=7.9e-3, env_gain=3e-4)
    finding = rules(judge(doc))["local-gain"]
    assert finding.status is Status.FAIL and finding.site == "layer.0" and "7.90e-03" in finding.message


def test_local_gain_below_floor_passes():
    doc = comparison()
    doc["analysis"]["local"]["steps"][0] = _step("layer.0", gain=9e-4, env_gain=1e-5)  # 90x the envelope, under 1e-3
    assert judge(doc).status is Status.PASS


def test_local_envelope_ratio_fails():
    doc = comparison()
    doc["analysis"]["local"]["steps"][1] = _step("layer.1", local=2e-2, env_local=5e-3)
    finding = rules(judge(doc))["local-envelope"]
    assert finding.site == "layer.1" and "4.0x" in finding.message


def test_r_at_logits_fails():
    doc = comparison()
    doc["prompts"][0]["sites"][2]["truth"] = _truth(6e-3, 1.2e-2)
    finding = rules(judge(doc))["r-logits"]
    assert finding.status is Status.FAIL and "2.00x" in finding.message


def test_r_at_a_layer_warns():
    doc = comparison()
    doc["prompts"][0]["sites"][1]["truth"] = _truth(5e-3, 9e-3)
    verdict = judge(doc)
    assert verdict.status is Status.WARN and rules(verdict)["r-layer"].status is Status.WARN


def test_target_nan_fails_with_its_location():
    doc = comparison()
    doc["prompts"][0]["sites"][1] = _site("layer.0", float("nan"), _truth(5e-3, 5e-3), nan=1)
    finding = rules(judge(doc))["non-finite"]
    assert finding.status is Status.FAIL and finding.site == "layer.0" and "[3, 0]" in finding.message


def test_local_gain_is_not_judged_at_the_final_norm():
    """A comparison written before the replay knew better carries a gain at the norm: it is not an update."""
    doc = comparison()
    doc["analysis"]["local"]["steps"][1] = _step("final_norm", gain=-2.1e-3, env_gain=0.0)
    assert judge(doc).status is Status.PASS
    doc["analysis"]["local"]["steps"][1] = _step("layer.1", gain=-2.1e-3, env_gain=0.0)
    assert rules(judge(doc))["local-gain"].site == "layer.1"


def test_local_gain_within_the_references_own_rounding_gain_passes():
    doc = comparison()
    doc["analysis"]["local"]["steps"][0] = {**_step("layer.0", gain=1.9e-3, env_gain=0.0), "rounding_gain": 1.9e-3}
    assert judge(doc).status is Status.PASS
    doc["analysis"]["local"]["steps"][0]["local_gain"] = 8e-3  # beyond 4x the rounding gain
    assert rules(judge(doc))["local-gain"].status is Status.FAIL


def test_gross_error_fails_without_truth():
    doc = comparison()
    for site in doc["prompts"][0]["sites"]:
        site["truth"] = None
    doc["prompts"][0]["sites"][1]["metrics"]["relative_l2"] = 0.2
    assert rules(judge(doc))["gross-error"].status is Status.FAIL
    doc["prompts"][0]["sites"][1]["metrics"]["relative_l2"] = 0.05
    assert rules(judge(doc))["large-error"].status is Status.WARN


def test_envelope_and_nondeterminism_warn():
    doc = comparison()
    doc["analysis"]["envelope"] = {"sites": [{"site": "layer.0", "target": 2e-2, "max": 5e-3, "ratio": 4.0, "members": {"a": 5e-3}}]}
    doc["analysis"]["determinism"] = {"runs": 3, "prompts": 2, "tokens_identical": 1, "tensors_identical": 0, "max_relative_l2": 1e-3}
    found = rules(judge(doc))
    assert found["envelope"].status is Status.WARN and found["envelope"].site == "layer.0"
    assert found["nondeterminism"].status is Status.WARN and "1 of 2" in found["nondeterminism"].message


def test_thresholds_override_and_reject_unknown_names():
    doc = comparison()
    doc["analysis"]["local"]["steps"][1] = _step("layer.1", local_r=1.4)
    assert judge(doc).status is Status.PASS
    assert judge(copy.deepcopy(doc), Thresholds.from_mapping({"local_r_fail": 1.3})).status is Status.FAIL
    with pytest.raises(PrecisionError, match="unknown threshold"):
        Thresholds.from_mapping({"local_r_fial": 1.3})
