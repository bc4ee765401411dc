"""Whole comparison documents of real captures (stories260K, BF16 reference against BF16 targets run with other
implementations, one with a planted NaN) computed the way they are now (bf16 bits read in place, compiled logits
kernel, jobs on the worker threads) against the way they were before (the general path, which widens every
tensor, and the frozen numpy logits metrics of tests/metrics/logits_oracle.py). Tolerances: see
tests/metrics/test_bf16_paths.py."""

from __future__ import annotations

import math

import pytest

from precision.analysis import compare_jobs
from precision.analysis.compare import compare_captures
from tests.metrics import logits_oracle
from tests.metrics.test_bf16_paths import KL_ABS, REL

SKIPPED = {"created_at"}
KL_KEYS = {"kl", "kl_mean", "kl_max"}


def assert_documents_match(new, old, path="", key=""):
    if isinstance(old, dict):
        assert set(new) == set(old), path
        for k in old:
            if k not in SKIPPED:
                assert_documents_match(new[k], old[k], f"{path}.{k}", k)
    elif isinstance(old, list):
        assert len(new) == len(old), path
        for i, (x, y) in enumerate(zip(new, old)):
            assert_documents_match(x, y, f"{path}[{i}]", key)
    elif isinstance(old, float) and not isinstance(old, bool):
        same = (math.isnan(old) and math.isnan(new)) or new == old
        assert same or math.isclose(new, old, rel_tol=REL, abs_tol=KL_ABS if key in KL_KEYS else 0.0), (path, new, old)
    else:
        assert new == old, (path, new, old)


def the_old_way(reference, target, monkeypatch, **kwargs):
    with monkeypatch.context() as patch:
        patch.setattr(compare_jobs, "FAST_CONVENTION", None)  # no bf16 bits path: every tensor widened
        patch.setattr(compare_jobs, "logits_stats", logits_oracle.logits_stats)
        return compare_captures(reference, target, verify=False, **kwargs)


@pytest.fixture(scope="module")
def bf16_targets(stories, stories_reference, tmp_path_factory):
    from precision.backends import BackendOptions, create_backend
    from precision.capture.writer import CapturePlan, capture

    root = tmp_path_factory.mktemp("bf16-targets")
    following = CapturePlan.following(stories_reference)
    return {name: capture(create_backend("hf:cpu:bf16", stories, BackendOptions(variants=variants)), following, root / name,
                          show_progress=False)
            for name, variants in {"fused": ("norm:fused", "mlp:fused"), "nan": ("fault:nan:1:2:0",)}.items()}


@pytest.mark.parametrize("target", ["fused", "nan"])
def test_comparison_matches_the_old_path_on_real_captures(stories_reference, stories_truth, bf16_targets, target, monkeypatch):
    actual = bf16_targets[target]
    assert actual.manifest["backend"]["dtype"] == stories_reference.manifest["backend"]["dtype"] == "bfloat16"
    new = compare_captures(stories_reference, actual, truth=stories_truth, verify=False)
    old = the_old_way(stories_reference, actual, monkeypatch, truth=stories_truth)
    assert_documents_match(new, old)
    site = {s["site"]: s for s in new["sites"]}
    if target == "nan":  # the planted NaN went through the general path and is located
        assert site["layer.1"]["non_finite"] > 0
    else:
        assert 0 < site["logits"]["relative_l2"] < 0.1 and site["layer.1"]["non_finite"] == 0


def test_msprobe_convention_matches_the_old_path(stories_reference, bf16_targets, monkeypatch):
    new = compare_captures(stories_reference, bf16_targets["fused"], verify=False, metric_convention="msprobe")
    old = the_old_way(stories_reference, bf16_targets["fused"], monkeypatch, metric_convention="msprobe")
    assert_documents_match(new, old)
