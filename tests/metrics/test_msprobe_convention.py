"""The "msprobe" metric convention against numbers made by msprobe's own compare functions
(tests/metrics/data/msprobe_reference.json; how it was made is in make_msprobe_reference.py), and the
default convention's differences from it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from precision.metrics import tensor
from precision.metrics.msprobe import msprobe_metrics
from precision.metrics.tensor import tensor_stats

DATA = json.loads((Path(__file__).parent / "data" / "msprobe_reference.json").read_text())
CASES = {case["name"]: case for case in DATA["cases"]}
MSPROBE_FIELDS = ("cosine", "euclidean_distance", "max_abs", "max_relative", "one_thousandth_err_ratio",
                  "five_thousandths_err_ratio")


def arrays(case) -> tuple[np.ndarray, np.ndarray]:
    def read(text):
        return np.array([float.fromhex(v) for v in text.split()], dtype=np.float64).astype(case["dtype"]).reshape(case["shape"])

    return read(case["expected"]), read(case["actual"])


def assert_msprobe_numbers(values: dict, case) -> None:
    for name in MSPROBE_FIELDS:
        want, got = case["msprobe"][name], values[name]
        if isinstance(want, str):  # "unsupported", "N/A", "Nan": no number
            assert math.isnan(got), (case["name"], name, got)
        elif name == "euclidean_distance":  # unrounded float64 sum in another order: last bits only
            assert got == pytest.approx(want, rel=1e-13, abs=0.0), (case["name"], name)
        else:  # rounded by msprobe to 12 (cosine above 0.9999: 6) decimals: exactly equal
            assert got == want, (case["name"], name, got, want)


@pytest.mark.parametrize("name", list(CASES))
def test_tensor_stats_msprobe_convention_reproduces_msprobe(name):
    case = CASES[name]
    e, a = arrays(case)
    stats = tensor_stats(e, a, convention="msprobe")
    assert stats.convention == "msprobe"
    assert_msprobe_numbers({f: getattr(stats, f) for f in MSPROBE_FIELDS}, case)
    assert_msprobe_numbers(msprobe_metrics(e, a), case)


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if len(c["shape"]) == 2 and c["shape"][0] > 1])
def test_streaming_msprobe_convention_in_row_blocks(name):
    case = CASES[name]
    e, a = arrays(case)
    stream = tensor.StreamingStats(e.shape, convention="msprobe")
    for start in range(0, e.shape[0], 3):
        stream.add(e[start:start + 3], a[start:start + 3])
    stats = stream.result()
    assert_msprobe_numbers({f: getattr(stats, f) for f in MSPROBE_FIELDS}, case)
    assert stats.non_finite == tensor_stats(e, a).non_finite


def test_bf16_torch_tensors_give_msprobe_numbers():
    torch = pytest.importorskip("torch")
    case = CASES["bfloat16_values"]
    e, a = arrays(case)
    e_t, a_t = torch.from_numpy(e).to(torch.bfloat16), torch.from_numpy(a).to(torch.bfloat16)
    assert torch.equal(e_t.float(), torch.from_numpy(e))  # the stored values are bf16 values
    stats = tensor_stats(e_t, a_t, convention="msprobe")
    assert_msprobe_numbers({f: getattr(stats, f) for f in MSPROBE_FIELDS}, case)


def test_references_near_1e7_differ_only_by_the_floor():
    # The case: this tool's 1e-6 floor makes every relative error of a 1e-3 perturbation of values near
    # 1e-7 tiny (share 1.0); msprobe divides by the reference itself (share about 0.68 = P(|N(0,1)| < 1)).
    case = CASES["references_near_1e-7"]
    e, a = arrays(case)
    ours = tensor_stats(e, a)
    assert ours.convention == "precision-check"
    assert ours.one_thousandth_err_ratio == 1.0
    theirs = case["msprobe"]["one_thousandth_err_ratio"]
    assert 0.6 < theirs < 0.75
    assert tensor_stats(e, a, convention="msprobe").one_thousandth_err_ratio == theirs
    # without the floor (no reference is exactly 0 here) the two conventions agree
    floorless = np.abs(a.astype(np.float64) - e) / np.abs(e.astype(np.float64))
    assert abs(float(np.mean(floorless < 1e-3)) - theirs) <= 2 / e.size  # float32 vs float64 quotient at the edge


def test_msprobe_zeroes_matching_non_finite_but_our_record_keeps_them():
    case = CASES["non_finite_at_the_same_elements"]
    e, a = arrays(case)
    stats = tensor_stats(e, a, convention="msprobe")
    assert stats.one_thousandth_err_ratio == case["msprobe"]["one_thousandth_err_ratio"]
    # msprobe calls +Inf against -Inf "the same position" and zeroes it; the non-finite record flags it
    assert stats.non_finite.mismatched == 1 and stats.non_finite.mismatched_first_index == (3, 0)
    assert stats.non_finite.expected_nan == 1 and stats.non_finite.actual_nan == 1


def test_default_convention_differs_from_msprobe_where_documented():
    # exact zeros in the reference: this tool divides by the floor 1e-6, msprobe by float32 eps
    e, a = arrays(CASES["exact_zero_references"])
    ours, theirs = tensor_stats(e, a), tensor_stats(e, a, convention="msprobe")
    assert ours.max_relative != theirs.max_relative
    assert theirs.max_relative == CASES["exact_zero_references"]["msprobe"]["max_relative"]
    # cosine of two vectors whose norms are below float64 eps: msprobe says 1, this tool measures them
    e, a = arrays(CASES["norms_below_float64_eps"])
    assert tensor_stats(e, a, convention="msprobe").cosine == 1.0
    assert tensor_stats(e, a).cosine == pytest.approx(1.0)  # a = 1.5 e: parallel, measured (scaled path)
    e = np.array([1e-20, 0.0])
    a = np.array([0.0, 1e-20])
    assert tensor_stats(e, a, convention="msprobe").cosine == 1.0
    assert tensor_stats(e, a).cosine == 0.0


def test_euclidean_distance_both_conventions():
    e, a = np.array([[3.0, 4.0], [0.0, np.nan]]), np.array([[3.0, 5.0], [2.0, 1.0]])
    # this tool: over the pairs finite on both sides: sqrt(0 + 1 + 4)
    assert tensor_stats(e, a).euclidean_distance == pytest.approx(math.sqrt(5.0), rel=1e-15)
    # msprobe: a NaN in only one side makes every number unsupported
    assert math.isnan(tensor_stats(e, a, convention="msprobe").euclidean_distance)


def test_unknown_convention_is_refused():
    with pytest.raises(ValueError, match="msprobe"):
        tensor_stats(np.ones(3), np.ones(3), convention="msprob")
    with pytest.raises(ValueError, match="precision-check"):
        tensor.StreamingStats((3,), convention="")
