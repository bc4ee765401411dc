"""Non-finite values judged element by element at every site, on real stories260K captures with NaN and Inf
planted into copies of their tensors."""

from __future__ import annotations

import math

import pytest

from precision.analysis.compare import compare_captures
from precision.analysis.verdict import Status, judge
from precision.backends import create_backend
from precision.capture.writer import CapturePlan, capture
from precision.model import inspect_model
from precision.planning import plan_from_prompts
from tests.analysis.planting import planted_copy


@pytest.fixture(scope="module")
def pair(stories_path, short_prompts, tmp_path_factory):
    stories = inspect_model(stories_path)
    root = tmp_path_factory.mktemp("non_finite")
    reference = capture(create_backend("hf:cpu:bf16", stories), plan_from_prompts(short_prompts, stories, max_new_tokens=4), root / "ref",
                        show_progress=False)
    target = capture(create_backend("hf:cpu:fp16", stories), CapturePlan.following(reference), root / "target", show_progress=False)
    return reference, target


def _plant(capture_reader, destination, plants):
    """plants: {site: [(row, column, value)]}, written into the first prompt's tensors."""
    first = capture_reader.prompts[0].id

    def edit(prompt, site, tensor):
        if prompt != first or site not in plants:
            return None
        for row, column, value in plants[site]:
            tensor[row, column] = value
        return tensor

    return planted_copy(capture_reader, destination, edit)


def _findings(verdict):
    return {f.rule: f for p in verdict.prompts for f in p.findings}


def test_target_nan_where_the_reference_is_finite_fails(pair, tmp_path):
    reference, target = pair
    verdict = judge(compare_captures(reference, _plant(target, tmp_path / "t", {"layer.1": [(3, 5, math.nan)]})))
    finding = _findings(verdict)["non-finite"]
    assert verdict.status is Status.FAIL and finding.site == "layer.1" and "[3, 5]" in finding.message


def test_reference_nan_alone_warns(pair, tmp_path):
    reference, target = pair
    verdict = judge(compare_captures(_plant(reference, tmp_path / "r", {"layer.1": [(3, 5, math.nan)]}), target))
    found = _findings(verdict)
    assert "non-finite" not in found and found["non-finite-ref"].status is Status.WARN and verdict.status is Status.WARN


def test_every_site_is_checked_not_only_the_first_with_a_non_finite_value(pair, tmp_path):
    reference, target = pair
    ref = _plant(reference, tmp_path / "r", {"layer.0": [(0, 0, math.nan)]})
    tgt = _plant(target, tmp_path / "t", {"layer.0": [(0, 0, math.nan)], "layer.3": [(2, 7, math.inf)]})
    found = _findings(judge(compare_captures(ref, tgt)))
    assert found["non-finite"].status is Status.FAIL and found["non-finite"].site == "layer.3"
    assert found["non-finite-ref"].site == "layer.0"


def test_nan_at_another_element_than_the_references_fails(pair, tmp_path):
    reference, target = pair
    ref = _plant(reference, tmp_path / "r", {"layer.1": [(0, 0, math.nan)]})
    tgt = _plant(target, tmp_path / "t", {"layer.1": [(2, 3, math.nan)]})
    finding = _findings(judge(compare_captures(ref, tgt)))["non-finite"]
    assert finding.status is Status.FAIL and finding.site == "layer.1" and "[2, 3]" in finding.message


@pytest.mark.parametrize("expected, actual", [(math.inf, -math.inf), (math.nan, math.inf)])
def test_different_non_finite_values_at_one_element_fail(pair, tmp_path, expected, actual):
    reference, target = pair
    ref = _plant(reference, tmp_path / "r", {"layer.2": [(1, 4, expected)]})
    tgt = _plant(target, tmp_path / "t", {"layer.2": [(1, 4, actual)]})
    finding = _findings(judge(compare_captures(ref, tgt)))["non-finite"]
    assert finding.status is Status.FAIL and finding.site == "layer.2" and "[1, 4]" in finding.message


def test_the_same_non_finite_value_on_both_sides_only_warns(pair, tmp_path):
    reference, target = pair
    ref = _plant(reference, tmp_path / "r", {"layer.2": [(1, 4, -math.inf)]})
    tgt = _plant(target, tmp_path / "t", {"layer.2": [(1, 4, -math.inf)]})
    verdict = judge(compare_captures(ref, tgt))
    assert verdict.status is Status.WARN and "non-finite" not in _findings(verdict)
