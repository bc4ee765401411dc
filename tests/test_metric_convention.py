"""`--metric-convention msprobe`: the comparison's element-wise metrics are msprobe's own definitions (checked
against precision.metrics.msprobe_metrics, itself checked against numbers msprobe's compare functions made), the
choice is recorded, `verify` recomputes it the same way, and the default convention differs where the reference is
near zero (the 1e-6 floor)."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from precision.capture.arrays import TensorFile
from precision.cli import main
from precision.metrics import msprobe_metrics

MSPROBE_FIELDS = ("cosine", "euclidean_distance", "max_abs", "max_relative", "one_thousandth_err_ratio", "five_thousandths_err_ratio")


@pytest.fixture(scope="module")
def pair(capture_pair, tmp_path_factory):
    root = tmp_path_factory.mktemp("convention")
    shutil.copytree(capture_pair["ref"], root / "ref")  # compare writes nothing into its inputs; copies keep the shared ones apart
    shutil.copytree(capture_pair["tgt"], root / "tgt")
    for convention in ("precision-check", "msprobe"):
        assert main(["-q", "compare", str(root / "ref"), str(root / "tgt"), "--metric-convention", convention, "--out", str(root / convention)]) == 0
    return root


def _site(root, convention, name):
    comparison = json.loads((root / convention / "comparison.json").read_text())
    assert comparison["metric_convention"] == convention
    return next(s for s in comparison["prompts"][0]["sites"] if s["site"] == name)["metrics"]


@pytest.mark.parametrize("site", ["layer.2", "logits"])
def test_msprobe_convention_reproduces_msprobes_definitions(pair, site):
    e = TensorFile(next((pair / "ref" / "tensors").glob("0000.safetensors"))).array(site)
    a = TensorFile(next((pair / "tgt" / "tensors").glob("0000.safetensors"))).array(site)
    expected = msprobe_metrics(e, a)
    measured = _site(pair, "msprobe", site)
    for field in MSPROBE_FIELDS:
        assert math.isclose(measured[field], expected[field], rel_tol=1e-12, abs_tol=0.0), (field, measured[field], expected[field])


def test_the_default_convention_is_not_msprobes(pair):
    ours, theirs = _site(pair, "precision-check", "layer.2"), _site(pair, "msprobe", "layer.2")
    assert ours["relative_l2"] == theirs["relative_l2"]  # the verdict's metric is the same in both
    assert ours["max_relative"] != theirs["max_relative"] or ours["one_thousandth_err_ratio"] != theirs["one_thousandth_err_ratio"]


def test_an_unknown_convention_is_refused(pair, tmp_path, capsys):
    assert main(["compare", str(pair / "ref"), str(pair / "tgt"), "--metric-convention", "mine", "--out", str(tmp_path / "x")]) == 2
    assert "invalid choice: 'mine'" in capsys.readouterr().err
