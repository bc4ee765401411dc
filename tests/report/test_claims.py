"""The report says only what the run measured: real runs of stories260K with and without FP32 truth, the
implementation envelope, the layer replay and a full set of layers, and the sentences each report may hold.

Every number in the explanation must be a value of the run's comparison.json (or a verdict threshold, or a named
theory constant), to the precision it is printed with; a sentence about absent data may only say it is absent."""

from __future__ import annotations

import bisect
import math
import re
from pathlib import Path

import pytest

from precision.analysis.theory import BF16_U, ONE_ROUNDING
from precision.analysis.verdict import Verdict, judge
from precision.io import read_result_json
from precision.report import _load_manifests
from precision.report.view import build_view
from precision.report.explanation import NO_ENVELOPE, NO_TRUTH, NOT_MEASURED, R_SAME_BAND, REORDER_PREFIXES, explain, r_wording

# A number standing on its own: not part of a name (layer.4, split-k:32, top-1, FP32, L2) or a formula (2^-8, √3).
NUMBER = re.compile(r"(?<![\w.^√:+\-/])(-?\d+(?:\.\d+)?(?:e[+-]?\d+)?)(?![\w^.]*\^)(%?)")


def _load(run: Path) -> tuple[dict, Verdict, dict, Path]:
    """The run's comparison, its verdict and the report's view model, as `precision-check report` builds them."""
    comparison = read_result_json(run / "comparison.json")
    verdict = judge(comparison)
    return comparison, verdict, build_view(comparison, verdict, manifests=_load_manifests(comparison)), run


def _texts(view: dict) -> list[str]:
    """The report's own sentences: explanation, conclusion and the verdict rows it composes. The sentences of the
    verdict rules (findings, quoted by a failing row and by the "This run FAILS" paragraph) belong to verdict.py."""
    quoted = {f.message for f in view["verdict"].findings} | {f.message for p in view["verdict"].prompts for f in p.findings}
    rows = [f"{r['item']}: {r['evidence']}" for r in view["verdict_rows"] if r["evidence"] not in quoted]
    return [p for p in view["explanation"] if not p.startswith("This run FAILS")] + [view["conclusion"]] + rows


def _clauses(texts: list[str]) -> list[str]:
    return [c.strip() for t in texts for c in re.split(r"(?<=[.;:])\s+(?=[A-Za-z`])|;\s*", t) if c.strip()]


PER_TOKEN_KEYS = {"per_position", "positions", "expected_generated", "actual_generated", "prompt_ids", "forced_ids", "generated_ids",
                  "non_finite_positions"}
"""Token ids and per-position series: the explanation never quotes them, and hundreds of them would let any small
number pass as 'measured'."""


def _numbers_of(value, out: list[float]) -> None:
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        if math.isfinite(value):
            out.append(abs(float(value)))  # a sentence may word the sign ("scaled by (1 - x)")
    elif isinstance(value, dict):
        for k, v in value.items():
            if k not in PER_TOKEN_KEYS:
                _numbers_of(v, out)
    elif isinstance(value, list):
        out.append(float(len(value)))
        for v in value:
            _numbers_of(v, out)


def _measured_values(comparison: dict, verdict: Verdict, manifests: dict) -> list[float]:
    values: list[float] = []
    _numbers_of(comparison, values)
    for manifest in manifests.values():  # the model's shape and the capture's run time
        _numbers_of({"model": manifest.get("model"), "runtime_seconds": manifest.get("runtime_seconds")}, values)
    _numbers_of(verdict.to_json()["thresholds"], values)
    values += [BF16_U, ONE_ROUNDING, R_SAME_BAND, 1.0]
    return sorted(values)


def _printed_precision(token: str, percent: bool) -> tuple[float, float]:
    """The value a printed number stands for and half a unit of its last printed digit."""
    mantissa, _, exponent = token.partition("e")
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    scale = 10.0 ** (int(exponent) if exponent else 0) * (0.01 if percent else 1.0)
    return float(token) * (0.01 if percent else 1.0), 0.5 * 10.0 ** -decimals * scale


def unexplained_numbers(text: str, values: list[float]) -> list[str]:
    """Numbers in ``text`` that no measured value rounds to."""
    missing = []
    for match in NUMBER.finditer(text):
        token, percent = match.group(1), bool(match.group(2))
        value, half_unit = _printed_precision(token, percent)
        slack = half_unit * (1 + 1e-9) + 1e-15
        i = bisect.bisect_left(values, value - slack)
        if not (i < len(values) and values[i] <= value + slack):
            missing.append(token + match.group(2))
    return missing


def test_number_matching_rejects_a_number_the_run_did_not_produce():
    values = sorted([0.013436163660181303, 0.25, 5.0])
    assert unexplained_numbers("an error of 1.34e-02 after layer.4 at 25%, 5 layers, FP32, top-1, 2^-8, u/√3", values) == []
    assert unexplained_numbers("about 2.5", values) == ["2.5"]
    assert unexplained_numbers("an error of 1.35e-02", values) == ["1.35e-02"]
    assert unexplained_numbers("at 26%", values) == ["26%"]


@pytest.fixture(scope="module")
def default_report(run_dir):
    return _load(run_dir)


@pytest.fixture(scope="module")
def no_envelope_report(fp16_no_envelope_run):
    return _load(fp16_no_envelope_run)


@pytest.fixture(scope="module")
def subset_report(fp16_subset_run):
    return _load(fp16_subset_run)


@pytest.mark.parametrize("report", ["default_report", "no_envelope_report", "subset_report"])
def test_every_number_in_the_explanation_comes_from_the_run(report, request):
    comparison, verdict, view, run = request.getfixturevalue(report)
    values = _measured_values(comparison, verdict, view["manifests"])
    for text in view["explanation"] + [view["conclusion"]] + [r["evidence"] for r in view["verdict_rows"]]:
        assert unexplained_numbers(text, values) == [], text


def test_default_run_states_envelope_truth_and_layers_from_its_numbers(default_report):
    comparison, verdict, view, run = default_report
    text = " ".join(_texts(view))
    assert f"all {comparison['num_layers']} decoder layers" in text
    logits = next(s for s in comparison["sites"] if s["site"] == "logits")
    assert f"R = {logits['R']:.2f}" in text and r_wording(logits["R"], verdict.thresholds.r_logits_fail) in text
    row = next(r for r in comparison["analysis"]["envelope"]["sites"] if r["site"] == "logits")
    assert f"{len(row['members'])} legitimate implementation variants" in text
    order = max(v for k, v in row["members"].items() if k.startswith(REORDER_PREFIXES))
    placement = max(v for k, v in row["members"].items() if not k.startswith(REORDER_PREFIXES))
    larger = "rounding placement moves it more than order does" if placement > order else "accumulation order moves it more than rounding placement does"
    assert larger in text
    assert ("within the largest variant" if row["ratio"] <= 1.0 else "beyond the largest variant") in text
    assert NOT_MEASURED not in text


def test_r_wording_follows_the_measured_r(default_report, no_envelope_report):
    """R near 1 (a BF16 target with eager attention) and R far below 1 (an FP16 target) get different words."""
    limit = default_report[1].thresholds.r_logits_fail
    r_bf16 = next(s for s in default_report[0]["sites"] if s["site"] == "logits")["R"]
    r_fp16 = next(s for s in no_envelope_report[0]["sites"] if s["site"] == "logits")["R"]
    assert abs(r_bf16 - 1.0) <= R_SAME_BAND and r_fp16 < 1.0 - R_SAME_BAND, (r_bf16, r_fp16)
    assert "about as accurate" in r_wording(r_bf16, limit) and "about as accurate" not in r_wording(r_fp16, limit)
    assert f"{r_fp16:.2f} times the reference's" in r_wording(r_fp16, limit)
    assert "further from FP32" in r_wording(limit * 1.2, limit) and "above the limit" in r_wording(limit * 1.2, limit)


def test_without_an_envelope_no_sentence_claims_one(no_envelope_report):
    comparison, verdict, view, run = no_envelope_report
    assert comparison["analysis"]["envelope"] is None and comparison["analysis"]["local"]["steps"], "this run replays without an envelope"
    clauses = _clauses(_texts(view))
    about_envelope = [c for c in clauses if re.search(r"envelope|variant|implementation choice", c, re.I)]
    assert about_envelope and all(NO_ENVELOPE in c for c in about_envelope), about_envelope
    assert "within what legitimate implementation choices produce" not in view["conclusion"]
    html = (run / "report.html").read_text()
    assert "Envelope: the largest difference" not in html and "No implementation envelope was measured in this run" in html


def test_with_a_layer_subset_no_sentence_claims_every_layer(subset_report):
    comparison, verdict, view, run = subset_report
    text = " ".join(_texts(view))
    assert "decoder layers 0, 2 of 5" in text
    for claim in ("every layer captured", "every layer's", "every replayed layer", "all layers", "all 5 decoder layers", "last decoder layer"):
        assert claim not in text.lower(), claim
    for name in ("report.html", "summary.md"):
        document = (run / name).read_text().lower()
        assert "every layer captured" not in document and "decoder layers 0, 2 of 5" in document, name


def test_without_truth_no_sentence_claims_fp32_or_r(subset_report):
    comparison, verdict, view, run = subset_report
    assert comparison["truth"] is None
    clauses = _clauses(_texts(view))
    about_truth = [c for c in clauses if "FP32" in c or re.search(r"\bR\b", c)]
    assert about_truth and all(NO_TRUTH in c for c in about_truth), about_truth
    assert "R =" not in " ".join(_texts(view))
    summary = (run / "summary.md").read_text()
    assert "FP32" not in summary and "R =" not in summary


def test_explanation_paragraphs_depend_on_the_data_they_quote(default_report, subset_report):
    """The same renderer leaves out what one run lacks and keeps what the other has."""
    default_text = " ".join(explain(*default_report[:2]))
    subset_text = " ".join(explain(*subset_report[:2]))
    for present_only_with_data in ("Against the FP32 run", "Re-running the reference itself", "Replaying every reference layer"):
        assert present_only_with_data in default_text and present_only_with_data not in subset_text
