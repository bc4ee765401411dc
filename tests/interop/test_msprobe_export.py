"""msprobe_compare.csv: msprobe's compare result layout, its values against msprobe's own compare of the same dumps."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from precision.analysis.verdict import judge
from precision.capture.reader import CaptureReader
from precision.cli import main
from precision.interop.msprobe_export import CSV_NAME, METRIC_COLUMNS, MSPROBE_COLUMNS, msprobe_rows
from precision.io import read_result_json
from tests.interop.conftest import require_msprobe

PINNED_HEADER = [
    "NPU Name", "Bench Name", "NPU Dtype", "Bench Dtype", "NPU Tensor Shape", "Bench Tensor Shape", "NPU Requires_grad",
    "Bench Requires_grad", "Cosine", "EucDist", "MaxAbsErr", "MaxRelativeErr", "One Thousandth Err Ratio",
    "Five Thousandths Err Ratio", "NPU max", "NPU min", "NPU mean", "NPU l2norm", "Bench max", "Bench min", "Bench mean",
    "Bench l2norm", "Requires_grad Consistent", "Result", "Err_message", "NPU_Stack_Info", "Data_name",
]
"""The header row of the CSV `msprobe compare --target_path NPU_STEP --golden_path BENCH_STEP` writes for two L0
tensor dumps (mindstudio-probe 26.2.0, on stories260K here): CompareConst.COMPARE_RESULT_HEADER + NPU_Stack_Info +
Data_name. Kept so the header stays checked where msprobe is not installed."""

MSPROBE_NAMES = {"embed": "Module.model.embed_tokens.Embedding.forward.0.output.0",
                 "final_norm": "Module.model.norm.LlamaRMSNorm.forward.0.output.0",
                 "logits": "Module.lm_head.Linear.forward.0.output.0"}


def _msprobe_name(site: str) -> str:
    if site.startswith("layer."):
        return f"Module.model.layers.{site.split('.')[1]}.LlamaDecoderLayer.forward.0.output.0"
    return MSPROBE_NAMES[site]


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    return rows[0], [dict(zip(rows[0], r)) for r in rows[1:]]


def _python(code: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
def comparison_dir(imported_bf16, imported_fp16, tmp_path_factory) -> Path:
    """precision-check compare of the imported dumps: BF16 reference, FP16 target."""
    out = tmp_path_factory.mktemp("cmp") / "cmp"
    assert main(["-q", "compare", str(imported_bf16), str(imported_fp16), "--out", str(out)]) == 0
    return out


def test_the_header_is_msprobes_own():
    assert list(MSPROBE_COLUMNS) == PINNED_HEADER
    require_msprobe()
    code = ("import json; from msprobe.core.common.const import CompareConst as C; "
            "print(json.dumps(list(C.COMPARE_RESULT_HEADER) + [C.STACK, C.DATA_NAME]))")
    assert json.loads(_python(code).strip().splitlines()[-1]) == list(MSPROBE_COLUMNS)


def test_the_metrics_equal_msprobes_compare_of_the_same_dumps(bf16_dump, fp16_dump, comparison_dir, tmp_path):
    """msprobe compares its own FP16 dump (NPU) with its BF16 dump (bench); our CSV of the imported dumps holds the
    same Cosine, EucDist, MaxAbsErr, MaxRelativeErr and Err Ratios at every imported site of the first prompt."""
    require_msprobe()
    out = tmp_path / "msprobe-compare"
    code = "import sys; from msprobe.msprobe import main; sys.argv = ['msprobe'] + sys.argv[1:]; main()"
    _python(code, "compare", "--target_path", str(fp16_dump / "step0"), "--golden_path", str(bf16_dump / "step0"), "--output_path", str(out))
    theirs_header, theirs = _read_csv(next(out.glob("compare_result_*.csv")))
    ours_header, ours = _read_csv(comparison_dir / CSV_NAME)
    assert ours_header == theirs_header
    by_name = {row["NPU Name"]: row for row in theirs}
    first = read_result_json(comparison_dir / "comparison.json")["prompts"][0]["id"]
    rows = [row for row in ours if row["NPU Name"].startswith(first + ".")]
    assert len(rows) == 8  # embed, 5 layers, final_norm, logits
    for row in rows:
        site = row["NPU Name"][len(first) + 1:]
        other = by_name[_msprobe_name(site)]
        assert (row["NPU Dtype"], row["Bench Dtype"]) == (other["NPU Dtype"], other["Bench Dtype"]) == ("torch.float16", "torch.bfloat16")
        for column in METRIC_COLUMNS:
            if column == "EucDist":  # unrounded: summed in another order than msprobe's BLAS (precision.metrics.msprobe)
                assert float(row[column]) == pytest.approx(float(other[column]), rel=1e-14), (site, column)
            else:
                assert float(row[column]) == float(other[column]), (site, column, row[column], other[column])
        assert float(row["Cosine"]) < 1.0  # an FP16 run differs: the equalities are not between zeros


def test_the_statistics_are_float64_over_every_element(comparison_dir):
    comparison = read_result_json(comparison_dir / "comparison.json")
    _, rows = _read_csv(comparison_dir / CSV_NAME)
    readers = {side: CaptureReader(comparison[role]["path"]) for side, role in (("NPU", "actual"), ("Bench", "expected"))}
    for row in rows:
        prompt_id, site = next((p["id"], row["NPU Name"][len(p["id"]) + 1:]) for p in comparison["prompts"] if row["NPU Name"].startswith(p["id"] + "."))
        for side, reader in readers.items():
            record = next(r for r in reader.prompts if r.id == prompt_id)
            values = reader.arrays(record).array(site).astype(np.float64)
            assert float(row[f"{side} max"]) == values.max() and float(row[f"{side} min"]) == values.min()
            assert float(row[f"{side} mean"]) == pytest.approx(values.mean(), rel=1e-12)
            assert float(row[f"{side} l2norm"]) == pytest.approx(math.sqrt(np.sum(values * values)), rel=1e-12)
            assert row[f"{side} Tensor Shape"] == str(list(values.shape))


def test_the_result_column_is_our_verdict_at_each_site(stories, stories_reference, comparison_dir, tmp_path):
    """A healthy FP16 target: every row passes. A NaN planted in layer 2's output: layers 0-1 pass, layer 2 is an
    error naming the rule; each prompt's worst row is its verdict."""
    from precision.backends import BackendOptions, create_backend
    from precision.capture.writer import CapturePlan, capture

    _, rows = _read_csv(comparison_dir / CSV_NAME)
    assert {row["Result"] for row in rows} == {"pass"} and {row["Err_message"] for row in rows} == {"[]"}
    assert judge(read_result_json(comparison_dir / "comparison.json")).status.value == "PASS"

    faulty = capture(create_backend("hf:cpu:bf16", stories, BackendOptions(variants=("fault:nan:2:3",))),
                     CapturePlan.following(stories_reference), tmp_path / "nan", show_progress=False)
    assert main(["-q", "compare", str(stories_reference.path), str(faulty.path), "--out", str(tmp_path / "cmp")]) == 0
    comparison = read_result_json(tmp_path / "cmp" / "comparison.json")
    verdict = judge(comparison)
    _, rows = _read_csv(tmp_path / "cmp" / CSV_NAME)
    result = {row["NPU Name"]: row for row in rows}
    for prompt in comparison["prompts"]:
        assert result[f"{prompt['id']}.layer.1"]["Result"] == "pass"
        assert result[f"{prompt['id']}.layer.2"]["Result"] == "error"
        assert "non-finite" in json.loads(result[f"{prompt['id']}.layer.2"]["Err_message"])[0]
    levels = {"PASS": "pass", "WARN": "warning", "FAIL": "error"}
    for prompt in verdict.prompts:
        mine = [row["Result"] for row in rows if row["NPU Name"].startswith(prompt.id + ".")]
        assert max(mine, key=["pass", "warning", "error"].index) == levels[prompt.status.value] == "error"


def test_compare_report_and_export_write_it_and_force_replaces_it(imported_bf16, imported_fp16, comparison_dir, tmp_path):
    out = tmp_path / "cmp"
    for extra in ([], ["--force"]):
        assert main(["-q", "compare", str(imported_bf16), str(imported_fp16), "--out", str(out), *extra]) == 0
        assert (out / CSV_NAME).is_file()
    first = (out / CSV_NAME).read_text()
    assert main(["-q", "report", str(out)]) == 0 and (out / CSV_NAME).read_text() == first
    assert main(["-q", "export-msprobe", str(out), "--out", str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "elsewhere" / CSV_NAME).read_text() == first


def test_without_the_captures_the_metrics_come_from_an_msprobe_convention_comparison(imported_bf16, imported_fp16, comparison_dir, tmp_path):
    assert main(["-q", "compare", str(imported_bf16), str(imported_fp16), "--out", str(tmp_path / "cmp"), "--metric-convention", "msprobe"]) == 0
    document = read_result_json(tmp_path / "cmp" / "comparison.json")
    with_captures = msprobe_rows(document, judge(document))
    document["expected"]["path"] = str(tmp_path / "moved-away")
    without = msprobe_rows(document, judge(document))
    for full, partial in zip(with_captures, without):
        assert [partial[c] for c in METRIC_COLUMNS] == [full[c] for c in METRIC_COLUMNS]
        assert partial["NPU max"] == "N/A" and "not readable here" in partial["Err_message"]
    # A comparison in this tool's own convention holds no msprobe numbers to fall back on.
    own = read_result_json(comparison_dir / "comparison.json")
    own["actual"]["path"] = str(tmp_path / "moved-away")
    assert {row["Cosine"] for row in msprobe_rows(own, judge(own))} == {"N/A"}


def test_each_row_is_judged_by_the_verdicts_findings_at_its_site(stories, stories_reference, tmp_path):
    """Layer 3's MLP weight x 1.5: the relative L2 error exceeds 0.1 from some layer on. The verdict's per-site
    findings (each naming its site) put 'gross-error' at exactly the sites over the limit and none below it; the
    prompt's finding names its largest site; the CSV's Result is 'error' at exactly those rows."""
    from precision.backends import BackendOptions, create_backend
    from precision.capture.writer import CapturePlan, capture

    faulty = capture(create_backend("hf:cpu:bf16", stories, BackendOptions(variants=("fault:scale-weight:3:1.5",))),
                     CapturePlan.following(stories_reference), tmp_path / "scaled", show_progress=False)
    assert main(["-q", "compare", str(stories_reference.path), str(faulty.path), "--out", str(tmp_path / "cmp")]) == 0
    comparison = read_result_json(tmp_path / "cmp" / "comparison.json")
    verdict = judge(comparison)
    _, rows = _read_csv(tmp_path / "cmp" / CSV_NAME)
    result = {row["NPU Name"]: row["Result"] for row in rows}
    for prompt, judged in zip(comparison["prompts"], verdict.prompts):
        over = {s["site"] for s in prompt["sites"] if s["metrics"]["relative_l2"] > 0.1}
        assert over and "embed" not in over and "layer.0" not in over  # fires at some sites, not at others
        assert {f.site for f in judged.site_findings if f.rule == "gross-error"} == over
        gross = next(f for f in judged.findings if f.rule == "gross-error")
        assert gross.site == max(prompt["sites"], key=lambda s: s["metrics"]["relative_l2"])["site"]
        assert {s["site"] for s in prompt["sites"] if result[f"{prompt['id']}.{s['site']}"] == "error"} == over
