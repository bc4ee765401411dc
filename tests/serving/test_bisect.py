"""Delta debugging over engine settings (precision.serving.bisect) on synthetic trials whose answer is known."""

from __future__ import annotations

import itertools

import pytest

from precision.errors import PrecisionError
from precision.serving.bisect import (BisectionError, Outcome, bisect_settings, ddmin_trial_bound, vllm_setting_dependencies,
                                      single_culprit_trial_bound)

BASELINE = {"enforce_eager": True, "enable_prefix_caching": False, "max_num_seqs": 1, "enable_chunked_prefill": False,
            "max_num_batched_tokens": 512, "kv_cache_dtype": "auto", "tensor_parallel_size": 1, "dtype": "bfloat16"}
PRODUCTION = {"enforce_eager": False, "enable_prefix_caching": True, "max_num_seqs": 8, "enable_chunked_prefill": True,
              "max_num_batched_tokens": 16, "kv_cache_dtype": "fp8", "tensor_parallel_size": 2, "dtype": "float32"}


class Oracle:
    """A trial callback that fails when every setting of any one of ``culprits`` is applied; it records each call."""

    def __init__(self, *culprits: set[str], refuse=None):
        self.culprits = [set(c) for c in culprits]
        self.refuse = refuse
        self.calls: list[frozenset[str]] = []

    def __call__(self, subset: dict) -> bool | None:
        self.calls.append(frozenset(subset))
        if self.refuse is not None and self.refuse(subset):
            return None
        return any(culprit <= set(subset) for culprit in self.culprits)


def test_a_single_culprit_is_named_within_the_logarithmic_bound():
    oracle = Oracle({"enforce_eager"})
    result = bisect_settings(BASELINE, PRODUCTION, oracle)
    assert result.reproduced and result.baseline_fails is False
    assert result.culprit == {"enforce_eager": False} and result.required == {} and not result.interaction
    assert result.trial_count <= single_culprit_trial_bound(8) == 8
    assert "enforce_eager=False alone makes it fail" in result.describe()
    # The record is what ran, in order, each subset once (memoised).
    assert [t.settings for t in result.trials[:2]] == [PRODUCTION, {}]
    assert len(set(oracle.calls)) == len(oracle.calls) == result.trial_count


def test_two_settings_that_only_fail_together_are_both_named():
    oracle = Oracle({"max_num_seqs", "kv_cache_dtype"})
    result = bisect_settings(BASELINE, PRODUCTION, oracle)
    assert result.culprit == {"max_num_seqs": 8, "kv_cache_dtype": "fp8"} and result.interaction
    assert result.trial_count <= ddmin_trial_bound(8)
    outcomes = {frozenset(t.settings): t.outcome for t in result.trials}
    # 1-minimal: each alone passes (tried here, or implied by a passing superset that was tried).
    for alone in ("max_num_seqs", "kv_cache_dtype"):
        assert not oracle({alone: PRODUCTION[alone]})
    assert outcomes[frozenset({"max_num_seqs", "kv_cache_dtype"})] is Outcome.FAIL
    assert "fail only together" in result.describe() and "max_num_seqs=8" in result.describe()


def test_a_configuration_that_does_not_fail_is_said_so_and_not_bisected():
    oracle = Oracle()  # nothing fails
    result = bisect_settings(BASELINE, PRODUCTION, oracle)
    assert not result.reproduced and result.culprit == {} and result.trial_count == 1
    assert result.trials[0].outcome is Outcome.PASS and result.trials[0].settings == PRODUCTION
    assert "does not fail" in result.describe() and "no bisection" in result.describe()


def test_a_setting_that_needs_another_is_always_tried_with_it():
    # max_num_batched_tokens=16 below the prompt length is refused by the engine without chunked prefill.
    refused = lambda subset: "max_num_batched_tokens" in subset and "enable_chunked_prefill" not in subset
    oracle = Oracle({"max_num_batched_tokens"}, refuse=refused)
    result = bisect_settings(BASELINE, PRODUCTION, oracle, dependencies={"max_num_batched_tokens": ["enable_chunked_prefill"]})
    assert result.culprit == {"max_num_batched_tokens": 16} and result.required == {"enable_chunked_prefill": True}
    assert result.responsible == {"max_num_batched_tokens": 16, "enable_chunked_prefill": True} and not result.interaction
    assert all(t.outcome is not Outcome.UNRESOLVED for t in result.trials)
    assert "with enable_chunked_prefill=True, which it needs" in result.describe()
    assert result.trial_count <= single_culprit_trial_bound(8)


def test_without_the_dependency_map_the_refused_trials_are_unresolved_and_the_culprit_is_the_pair():
    # The same engine, bisected without telling it the dependency: ddmin treats refused trials as not failing
    # and ends on both settings, which is what one must apply together; the map makes that explicit instead.
    refused = lambda subset: "max_num_batched_tokens" in subset and "enable_chunked_prefill" not in subset
    result = bisect_settings(BASELINE, PRODUCTION, Oracle({"max_num_batched_tokens"}, refuse=refused))
    assert result.culprit == {"enable_chunked_prefill": True, "max_num_batched_tokens": 16}
    assert any(t.outcome is Outcome.UNRESOLVED for t in result.trials)


def test_a_dependency_the_configuration_does_not_change_is_refused():
    failing = {"max_num_batched_tokens": 16, "enforce_eager": False}
    with pytest.raises(BisectionError, match="enable_chunked_prefill") as raised:
        bisect_settings(BASELINE, failing, Oracle({"enforce_eager"}), dependencies={"max_num_batched_tokens": ["enable_chunked_prefill"]})
    assert isinstance(raised.value, PrecisionError)  # exit 2 at the CLI


def test_a_failing_baseline_names_no_setting():
    result = bisect_settings(BASELINE, PRODUCTION, lambda subset: True)
    assert result.reproduced and result.baseline_fails and result.culprit == {}
    assert result.trial_count == 2 and "baseline itself fails" in result.describe()
    unchecked = bisect_settings(BASELINE, PRODUCTION, lambda subset: True, check_baseline=False)
    assert unchecked.baseline_fails is None and len(unchecked.culprit) == 1  # ddmin's precondition not checked


def test_settings_equal_to_the_baseline_are_not_changes():
    failing = {"enforce_eager": True, "max_num_seqs": 8, "enable_prefix_caching": True}
    result = bisect_settings(BASELINE, failing, Oracle({"enable_prefix_caching"}))
    assert result.changed == {"max_num_seqs": 8, "enable_prefix_caching": True} and result.unchanged == ("enforce_eager",)
    assert result.culprit == {"enable_prefix_caching": True}
    empty = bisect_settings(BASELINE, {"enforce_eager": True}, Oracle({"enforce_eager"}))
    assert empty.trial_count == 0 and "nothing to bisect" in empty.describe()


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13])
def test_every_single_culprit_and_every_pair_is_found_within_ddmins_bounds(size):
    names = [f"s{i}" for i in range(size)]
    baseline = {name: 0 for name in names}
    failing = {name: 1 for name in names}
    for culprit in names:
        result = bisect_settings(baseline, failing, Oracle({culprit}))
        assert set(result.culprit) == {culprit}
        assert result.trial_count <= single_culprit_trial_bound(size)
    for pair in itertools.combinations(names, 2):
        oracle = Oracle(set(pair))
        result = bisect_settings(baseline, failing, oracle)
        assert set(result.culprit) == set(pair)
        assert result.trial_count <= ddmin_trial_bound(size)
    # Two independent culprits: ddmin returns one of them, 1-minimal (no setting of it can be dropped).
    if size >= 4:
        oracle = Oracle({names[0], names[1]}, {names[-1]})
        result = bisect_settings(baseline, failing, oracle)
        found = set(result.culprit)
        assert found in ({names[0], names[1]}, {names[-1]})
        assert all(not oracle({k: 1 for k in found - {drop}}) for drop in found)


def test_vllm_dependencies_follow_vllms_own_checks():
    baseline = {"max_model_len": 512, "max_num_batched_tokens": 512, "tensor_parallel_size": 1}
    chunked = {"enable_chunked_prefill": True, "max_num_batched_tokens": 16, "enforce_eager": False}
    assert vllm_setting_dependencies(baseline, chunked) == {"max_num_batched_tokens": ("enable_chunked_prefill",)}
    # A budget that still holds max_model_len needs no chunked prefill, and one without the switch names nothing.
    assert vllm_setting_dependencies(baseline, {**chunked, "max_num_batched_tokens": 1024}) == {}
    assert vllm_setting_dependencies(baseline, {"max_num_batched_tokens": 16}) == {}
    tp = {"tensor_parallel_size": 2, "distributed_executor_backend": "mp"}
    assert vllm_setting_dependencies(baseline, tp) == {"tensor_parallel_size": ("distributed_executor_backend",)}
    result = bisect_settings(baseline, {**chunked, **tp}, Oracle({"tensor_parallel_size"}),
                             dependencies=vllm_setting_dependencies(baseline, {**chunked, **tp}))
    assert result.culprit == {"tensor_parallel_size": 2} and result.required == {"distributed_executor_backend": "mp"}


def test_a_configuration_known_to_fail_is_not_tried_again():
    oracle = Oracle({"enforce_eager"})
    result = bisect_settings(BASELINE, PRODUCTION, oracle, known_to_fail=True)
    assert result.culprit == {"enforce_eager": False} and frozenset(PRODUCTION) not in oracle.calls
    assert result.trials[0].settings == {} and result.trial_count == len(oracle.calls)
    assert result.trial_count <= single_culprit_trial_bound(8) - 1


def test_a_full_configuration_the_engine_refuses_is_not_called_passing():
    result = bisect_settings(BASELINE, PRODUCTION, lambda subset: None)
    assert not result.reproduced and result.trials[0].outcome is Outcome.UNRESOLVED
    assert "could not be judged" in result.describe() and "does not fail" not in result.describe()
