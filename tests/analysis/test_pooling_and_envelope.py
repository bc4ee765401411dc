"""pool_sites and the local envelope, checked against direct computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from precision.analysis.compare import _stats_json, pool_sites
from precision.analysis.envelope import local_envelope
from precision.analysis.theory import rounding_floor
from precision.analysis.verdict import Status, judge
from precision.metrics import tensor_stats
from tests.documents import complete


def _prompt(pairs):
    return {"sites": [{"site": site, "layer": 0, "metrics": _stats_json(tensor_stats(e, a)), "truth": None} for site, (e, a) in pairs.items()]}


@pytest.fixture
def arrays():
    rng = np.random.default_rng(7)
    e1, e2 = rng.standard_normal((5, 16)), rng.standard_normal((9, 16)) * 3
    return (e1, e1 + rng.standard_normal(e1.shape) * 1e-2), (e2, e2 + rng.standard_normal(e2.shape) * 1e-3)


def test_pooled_relative_l2_is_that_of_all_prompts_together(arrays):
    (e1, a1), (e2, a2) = arrays
    row = pool_sites([_prompt({"layer.0": (e1, a1)}), _prompt({"layer.0": (e2, a2)})])[0]
    e, a = np.concatenate([e1.ravel(), e2.ravel()]), np.concatenate([a1.ravel(), a2.ravel()])
    assert row["relative_l2"] == pytest.approx(np.linalg.norm(a - e) / np.linalg.norm(e), rel=1e-12)
    assert row["max_abs"] == pytest.approx(np.abs(a - e).max(), rel=1e-15)
    cosines = [float(x @ y / np.linalg.norm(x) / np.linalg.norm(y)) for x, y in ((e1.ravel(), a1.ravel()), (e2.ravel(), a2.ravel()))]
    assert row["cosine_min"] == pytest.approx(min(cosines), rel=1e-12)
    assert row["undefined_prompts"] == 0


def test_an_all_zero_target_makes_the_pooled_cosine_undefined(arrays):
    (e1, a1), (e2, _) = arrays
    row = pool_sites([_prompt({"layer.0": (e1, a1)}), _prompt({"layer.0": (e2, np.zeros_like(e2))})])[0]
    assert math.isnan(row["cosine_min"]) and row["undefined_prompts"] == 1
    assert row["relative_l2"] > 0.5  # the zero prompt's whole norm is error


def test_a_nan_target_is_counted_not_pooled_away(arrays):
    (e1, a1), (e2, a2) = arrays
    a2 = a2.copy()
    a2[:] = np.nan
    row = pool_sites([_prompt({"layer.0": (e1, a1)}), _prompt({"layer.0": (e2, a2)})])[0]
    assert math.isnan(row["max_abs"]) and math.isnan(row["cosine_min"])
    assert row["non_finite"] == a2.size and row["undefined_prompts"] == 1


def _step(site, local, gain=None, floor=rounding_floor()):
    return {"site": site, "local": local, "local_R": 1.2, "local_gain": gain, "rounding_gain": 0.0, "rounding_floor": floor}


def test_local_envelope_takes_the_largest_member_and_the_floor():
    target = [_step("layer.0", 1e-2, gain=2e-3), _step("final_norm", 3e-3)]
    members = {"a": [_step("layer.0", 2e-3, gain=-5e-4), _step("final_norm", 0.0)],
               "b": [_step("layer.0", 4e-3, gain=1e-4), _step("final_norm", 0.0)]}
    rows = local_envelope(target, members)
    assert rows[0]["envelope_local_max"] == 4e-3 and rows[0]["envelope_gain_max"] == 5e-4
    assert rows[0]["local_ratio"] == pytest.approx(2.5)
    # Every member exact at the final norm: the ratio is taken against one rounding, not against 0.
    assert rows[1]["envelope_local_max"] == 0.0
    assert rows[1]["local_ratio"] == pytest.approx(3e-3 / rounding_floor())


def test_a_step_off_by_one_rounding_passes_and_three_fail():
    floor = rounding_floor()
    members = {"a": [_step("final_norm", 0.0)]}
    for local, expected in ((floor, Status.PASS), (3.5 * floor, Status.FAIL)):
        rows = local_envelope([_step("final_norm", local)], members)
        verdict = judge(complete({"prompts": [], "analysis": {"local": {"steps": rows}}}))
        assert verdict.status is expected, (local, verdict.findings)
