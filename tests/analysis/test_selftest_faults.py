"""The planted faults of issue #11 on real stories260K captures: a logit bias on the reference's most frequent
runner-up, and a target NaN against a reference NaN at another element. First that each fault changes exactly
what it says, bit for bit elsewhere; then that selftest judges them as it must."""

from __future__ import annotations

import json

import numpy as np
import pytest

from precision.backends import BackendOptions, create_backend
from precision.backends.variants import apply_variants, parse_variant
from precision.capture.writer import CapturePlan, capture
from precision.errors import BackendError
from precision.selftest import BIAS, runner_up_token


@pytest.fixture(scope="module")
def reference(stories_reference):
    return stories_reference


def _planted(stories, reference, variants, out):
    backend = create_backend("hf:cpu:bf16", stories, BackendOptions(variants=variants))
    return capture(backend, CapturePlan.following(reference), out, show_progress=False)


def _pairs(reference, planted):
    """(site, reference array, planted array) of every prompt and site, as float32 (bf16 widens exactly)."""
    for e_rec, a_rec in zip(reference.prompts, planted.prompts):
        eh, ah = reference.arrays(e_rec), planted.arrays(a_rec)
        for site in e_rec.tensors:
            if site != "positions":
                yield site, eh.array(site), ah.array(site)


# -- parsing ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["fault:logit-bias:17:5.0", "fault:logit-bias:0:-0.25", "fault:nan:1:3", "fault:nan:1:3:7"])
def test_new_fault_forms_parse(text):
    assert str(parse_variant(text)) == text


@pytest.mark.parametrize("text, words", [
    ("fault:logit-bias:17", "fault:logit-bias:TOKEN:BIAS"),
    ("fault:logit-bias:x:1.0", "'x' is not an integer"),
    ("fault:logit-bias:17:big", "'big' is not a number"),
    ("fault:logit-bias:17:nan", "not finite"),
    ("fault:logit-bias:17:inf", "not finite"),
    ("fault:nan:1:3:one", "'one' is not an integer"),
    ("fault:nan:1:3:0:0", "fault:nan:LAYER:POSITION[:COLUMN]"),
    ("fault:scale-weight:2:abc", "'abc' is not a number"),
])
def test_bad_fault_values_are_refused_with_the_forms(text, words):
    with pytest.raises(BackendError) as error:
        parse_variant(text)
    assert words in str(error.value) and text in str(error.value)


@pytest.mark.parametrize("text, words", [
    ("fault:logit-bias:512:1.0", "token 512 does not exist (vocabulary 512: 0..511)"),
    ("fault:logit-bias:-1:1.0", "token -1 does not exist"),
    ("fault:nan:1:3:64", "column 64 does not exist (hidden size 64: 0..63)"),
    ("fault:nan:9:3:0", "layer 9 does not exist"),
])
def test_fault_out_of_the_model_is_refused(stories, text, words):
    from precision.backends.hf import load_hf_model

    model = load_hf_model(stories.path, "bfloat16", "cpu")
    with pytest.raises(BackendError) as error:
        apply_variants(model, (text,))
    assert words in str(error.value)


# -- what the faults change ---------------------------------------------------------------------------------

def test_logit_bias_changes_that_token_logit_only(stories, reference, tmp_path):
    token = runner_up_token(reference)
    biased = _planted(stories, reference, (f"fault:logit-bias:{token}:{BIAS!r}",), tmp_path / "biased")
    seen_logits = False
    for site, e, a in _pairs(reference, biased):
        if site != "logits":
            assert np.array_equal(e, a), site  # the hidden states are untouched, bit for bit
            continue
        seen_logits = True
        others = np.ones(e.shape[1], dtype=bool)
        others[token] = False
        assert np.array_equal(e[:, others], a[:, others])
        # The biased column is the reference's logit plus the bias, rounded once to BF16 (round to nearest even).
        import torch

        expected = (torch.from_numpy(e[:, token].astype(np.float64)) + BIAS).to(torch.bfloat16).float().numpy()
        assert np.array_equal(a[:, token], expected)
        assert (a[:, token] > e[:, token]).all()
    assert seen_logits


def test_nan_fault_plants_one_element_at_the_column_asked(stories, reference, tmp_path):
    planted = _planted(stories, reference, ("fault:nan:1:3:5",), tmp_path / "nan")
    for site, e, a in _pairs(reference, planted):
        if site in ("embed", "layer.0"):
            assert np.array_equal(e, a), site
        elif site == "layer.1":
            bad = np.argwhere(~np.isfinite(a))
            assert bad.tolist() == [[3, 5]]  # exactly one element, the one asked for
            a[3, 5] = e[3, 5]
            assert np.array_equal(e, a)  # and nothing else in that layer moved


def test_runner_up_token_is_the_most_frequent_second_place(reference):
    """Checked against a plain stable sort of every row (ties: the lower id ranks first)."""
    counts = {}
    for record in reference.prompts:
        logits = reference.arrays(record).array("logits")
        for row in logits:
            second = int(np.argsort(-row, kind="stable")[1])
            counts[second] = counts.get(second, 0) + 1
    most = max(counts.values())
    assert runner_up_token(reference) == min(t for t, c in counts.items() if c == most)
    assert most >= 2  # a token that is runner-up at several positions, so a bias on it can flip several


# -- the verdicts, both ways, on the captures alone (no envelope, no replay) ----------------------------------

def _verdict(expected, actual):
    from precision.analysis.compare import compare_captures
    from precision.analysis.verdict import judge

    return judge(compare_captures(expected, actual))


def _failing(verdict):
    return [(f.rule, f.site) for p in verdict.prompts for f in p.findings if f.status.value == "FAIL"]


def test_nan_against_a_reference_nan_elsewhere_fails_and_the_same_nan_does_not(stories, reference, tmp_path):
    reference_nan = _planted(stories, reference, ("fault:nan:1:3:0",), tmp_path / "ref-nan")
    elsewhere = _planted(stories, reference, ("fault:nan:1:3:1",), tmp_path / "nan-elsewhere")
    same = _planted(stories, reference, ("fault:nan:1:3:0",), tmp_path / "nan-same")
    caught = _verdict(reference_nan, elsewhere)
    assert caught.status.value == "FAIL" and ("non-finite", "layer.1") in _failing(caught)
    matched = _verdict(reference_nan, same)  # the target reproduces the reference's NaN: nothing to blame it for
    assert matched.status.value != "FAIL", _failing(matched)
    assert any(f.rule == "non-finite-ref" for p in matched.prompts for f in p.findings)


def test_large_logit_bias_gives_real_flips_and_a_tiny_one_none(stories, reference, tmp_path):
    token = runner_up_token(reference)
    large = _verdict(reference, _planted(stories, reference, (f"fault:logit-bias:{token}:{BIAS!r}",), tmp_path / "large"))
    assert ("real-flip", "logits") in _failing(large)
    tiny = _verdict(reference, _planted(stories, reference, (f"fault:logit-bias:{token}:0.0625",), tmp_path / "tiny"))
    assert not any(rule == "real-flip" for rule, _ in _failing(tiny))


# -- selftest end to end --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def selftest_outcome(stories_path, short_prompts, tmp_path_factory):
    from precision import self_test

    return self_test(tmp_path_factory.mktemp("selftest") / "st", prompts=short_prompts, model=stories_path, sweep=("logit bias",),
                     show_progress=False)


@pytest.fixture(scope="module")
def selftest(selftest_outcome):
    results = selftest_outcome.results
    return {r.case.name: r for r in results}, results


def test_selftest_json_names_its_format_and_holds_every_case(selftest_outcome):
    record = json.loads((selftest_outcome.out / "selftest.json").read_text())
    assert (record["format"], record["schema_version"]) == ("precision-check-selftest", 1)
    assert [c["name"] for c in record["cases"]] == [r.case.name for r in selftest_outcome.results]
    assert record["sensitivity"] == selftest_outcome.sensitivity and selftest_outcome.as_expected


def test_selftest_logit_bias_fails_at_the_logits_with_real_flips(selftest):
    by_name, _ = selftest
    main = next(r for r in by_name.values() if r.case.real_flips)
    assert main.case.variants[0].endswith(f":{BIAS!r}")
    assert main.verdict.status.value == "FAIL" and main.named_site == "logits" and main.ok
    assert main.real_flips > 0 and main.real_flips == main.flips
    assert any(f.rule == "real-flip" and f.site == "logits" for p in main.verdict.prompts for f in p.findings)


def test_selftest_nan_against_reference_nan_fails_naming_the_layer(selftest):
    by_name, _ = selftest
    case = by_name["NaN in layer 1 at position 3 against a reference NaN at another element"]
    assert case.case.reference_variants == ("fault:nan:1:3:0",)
    assert case.verdict.status.value == "FAIL" and case.named_site == "layer.1" and case.rule == "non-finite" and case.ok


def test_selftest_reordering_still_passes_without_real_flips(selftest):
    by_name, _ = selftest
    case = by_name["reordered reduction"]
    assert case.verdict.status.value == "PASS" and case.ok and case.real_flips == 0


def test_selftest_bias_sweep_finds_the_smallest_bias_caught(selftest):
    from precision.selftest import BIAS_SWEEP, all_as_expected, sensitivity

    _, results = selftest
    assert all_as_expected(results)
    swept = [r for r in results if r.case.sweep == "logit bias"]
    assert sorted(float(r.case.variants[0].rsplit(":", 1)[1]) for r in swept) == sorted(BIAS_SWEEP)
    caught = [float(r.case.variants[0].rsplit(":", 1)[1]) for r in swept + [r for r in results if r.case.real_flips] if r.ok]
    line = sensitivity(results)["logit bias"]
    assert line.startswith(f"caught at the logits down to +{min(caught):g};"), line
    # The sweep measures a boundary: the smallest bias tried is too small to flip or fail anything here.
    smallest = min(swept, key=lambda r: float(r.case.variants[0].rsplit(":", 1)[1]))
    assert not smallest.ok and smallest.real_flips == 0
