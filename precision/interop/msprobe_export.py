"""msprobe_compare.csv: a comparison in the layout of msprobe's compare result, so scripts and spreadsheets made for
msprobe read ours.

Columns: MSPROBE_COLUMNS, msprobe's own names and order (mindstudio-probe 26.2.0: CompareConst.COMPARE_RESULT_HEADER
in msprobe/core/common/const.py, then NPU_Stack_Info and Data_name as acc_compare.make_result_df appends them in
tensor mode, which is the file `msprobe compare` writes for tensor dumps). NPU is the target (actual), Bench the
reference (expected). One row per (prompt, site), in comparison order:
- NPU Name / Bench Name: "<prompt id>.<site>" (site: embed, layer.<i>, final_norm, logits).
- Dtype and shape: the captured tensor's ("torch.bfloat16", "[positions, width]").
- Cosine, EucDist, MaxAbsErr, MaxRelativeErr, One / Five Thousandth(s) Err Ratio: msprobe's definitions
  (precision.metrics.msprobe), computed from the two captures' tensors whatever convention comparison.json used.
  "unsupported" where msprobe reports no number (an all-zero side, mismatched NaN/Inf).
- NPU / Bench max, min, mean, l2norm: over every element of the tensor, in float64 (msprobe takes them from its
  dump.json statistics, computed by torch in the tensor's own dtype, so its mean and l2norm can differ in the
  last digits); NaN or Inf anywhere propagates as it does in msprobe.
- Requires_grad columns: False, False, True (a capture holds no autograd state).
- Result: this tool's verdict at the row's site (site_results, from the verdict's findings, each naming its site):
  "error" (a FAIL there), "warning" (a WARN), "pass". msprobe's own Result column applies msprobe's thresholds; ours applies precision-check's rules. msprobe
  26.2.0 has no "Accuracy Reached or Not" column in this layout (older releases did); Result is where its
  spreadsheets read the judgement.
- Err_message: a JSON list of "<level>: <rule>: <sentence>" for every finding at the row, "[]" for a pass.
- NPU_Stack_Info: "N/A". Data_name: the two tensor files, as msprobe lists its two .pt files.
Sites only one capture holds (an msprobe import compared on the sites both hold: precision.interop.msprobe_compare)
have rows of their own, in model order: the other side's columns "N/A", Result "N/A", Err_message msprobe's
["No bench data matched."] (a site only the target holds) or ["No NPU data matched."] (only the reference).
Where the captures are not on this machine, the metric columns come from comparison.json when it was computed in
the msprobe convention and are "N/A" otherwise, and the statistics are "N/A"; Err_message says so.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np

from precision import names

CSV_NAME = "msprobe_compare.csv"
MSPROBE_COLUMNS = (
    "NPU Name", "Bench Name", "NPU Dtype", "Bench Dtype", "NPU Tensor Shape", "Bench Tensor Shape", "NPU Requires_grad",
    "Bench Requires_grad", "Cosine", "EucDist", "MaxAbsErr", "MaxRelativeErr", "One Thousandth Err Ratio",
    "Five Thousandths Err Ratio", "NPU max", "NPU min", "NPU mean", "NPU l2norm", "Bench max", "Bench min", "Bench mean",
    "Bench l2norm", "Requires_grad Consistent", "Result", "Err_message", "NPU_Stack_Info", "Data_name",
)
"""msprobe 26.2.0's compare result columns (see the module docstring for where they come from)."""
METRIC_COLUMNS = {"Cosine": names.COSINE, "EucDist": names.EUCLIDEAN_DISTANCE, "MaxAbsErr": names.MAX_ABS,
                  "MaxRelativeErr": names.MAX_RELATIVE, "One Thousandth Err Ratio": names.ONE_THOUSANDTH_ERR_RATIO,
                  "Five Thousandths Err Ratio": names.FIVE_THOUSANDTHS_ERR_RATIO}
RESULT_LEVELS = {"FAIL": "error", "WARN": "warning", "PASS": "pass"}
"""Our statuses as msprobe's Result levels."""
_BLOCK_ELEMENTS = 4 << 20  # rows are read in blocks of about this many elements, as compare reads the logits


def site_results(comparison: dict, verdict) -> dict[tuple[str, str], tuple[str, list[str]]]:
    """(prompt id, site) -> (worst status, the messages of the findings there), from the verdict's own findings:
    each prompt's per-site findings (precision.analysis.verdict.site_findings: every site where a per-site rule
    fires, with the verdict's thresholds) and the run-level findings that name the site (local R, local gain,
    local envelope, envelope). The worst row of a prompt is that prompt's verdict (the prompt's findings are one of
    each per-site rule); run-level findings that name no site (nondeterminism) belong to no row."""
    found_at: dict[tuple[str | None, str | None], list[tuple[str, str]]] = {}
    for finding in verdict.findings:
        if finding.site is not None and finding.status.value != "PASS":
            found_at.setdefault((None, finding.site), []).append((finding.status.value, f"{finding.rule}: {finding.message}"))
    for prompt in verdict.prompts:
        for finding in prompt.site_findings:
            found_at.setdefault((prompt.id, finding.site), []).append((finding.status.value, f"{finding.rule}: {finding.message}"))
    results = {}
    for prompt in comparison["prompts"]:
        for entry in prompt["sites"]:
            found = found_at.get((None, entry["site"]), []) + found_at.get((prompt["id"], entry["site"]), [])
            status = max((s for s, _ in found), key=("PASS", "WARN", "FAIL").index, default="PASS")
            results[(prompt["id"], entry["site"])] = (status, [f"{RESULT_LEVELS[s]}: {text}" for s, text in found])
    return results


def msprobe_rows(comparison: dict, verdict) -> list[dict[str, str]]:
    """The CSV's rows as {column: text} (see the module docstring)."""
    from precision.capture.reader import CaptureReader
    from precision.errors import PrecisionError

    results = site_results(comparison, verdict)
    readers, unavailable = {}, None
    for role in ("expected", "actual"):
        try:
            readers[role] = CaptureReader(comparison[role]["path"])
        except PrecisionError as exc:
            unavailable = f"the {role} capture is not readable here ({exc}); metrics from comparison.json"
    from precision.analysis.compare_jobs import in_order

    from_comparison = comparison.get("metric_convention") == "msprobe"  # then compare computed the metrics already
    cells = []  # (prompt id, site entry, the two tensor files or None)
    for prompt in comparison["prompts"]:
        files = None
        if unavailable is None:
            records = {role: next((r for r in reader.prompts if r.id == prompt["id"]), None) for role, reader in readers.items()}
            if None in records.values():
                unavailable = f"prompt {prompt['id']!r} is not in the captures at their recorded paths; metrics from comparison.json"
            else:
                files = (readers["expected"].arrays(records["expected"], verify=False), readers["actual"].arrays(records["actual"], verify=False))
        cells += [(prompt["id"], entry, files) for entry in prompt["sites"]]
    jobs = ((files[0], files[1], entry["site"], not from_comparison) for _, entry, files in cells if files is not None)
    figures = in_order(tensor_pair_figures, jobs)  # one site pair per job, on the metric worker threads
    rows = []
    for prompt_id, entry, files in cells:
        status, messages = results[(prompt_id, entry["site"])]
        found = (files, next(figures)) if files is not None else None
        rows.append(_row(comparison, prompt_id, entry, status, messages, found, unavailable))
    return _with_one_sided_rows(comparison, rows, cells) if unavailable is None else rows


def _with_one_sided_rows(comparison: dict, rows: list[dict[str, str]], cells: list) -> list[dict[str, str]]:
    """``rows`` with a row for every site only one capture holds (compared on the sites both hold: an msprobe
    import, precision.interop.msprobe_compare), in model order within its prompt: the missing side's columns
    "N/A", Result "N/A" and Err_message msprobe's "No bench data matched." (or "No NPU data matched." for a site
    only the reference holds: msprobe lists only NPU modules), the present side's statistics as for any row."""
    from precision.capture.sites import site_order

    compared: dict[str, list[str]] = {}
    files_of: dict[str, tuple] = {}
    for prompt_id, entry, files in cells:
        compared.setdefault(prompt_id, []).append(entry["site"])
        files_of[prompt_id] = files
    by_prompt: dict[str, dict[str, dict[str, str]]] = {}
    for (prompt_id, entry, _), row in zip(cells, rows):
        by_prompt.setdefault(prompt_id, {})[entry["site"]] = row
    result = []
    for prompt in comparison["prompts"]:
        e_file, a_file = files_of[prompt["id"]]
        held = {"Bench": set(e_file.names()) - {names.POSITIONS}, "NPU": set(a_file.names()) - {names.POSITIONS}}
        prompt_rows = by_prompt.get(prompt["id"], {})
        for site in site_order(sorted(held["Bench"] | held["NPU"] | set(prompt_rows))):
            if site in prompt_rows:
                result.append(prompt_rows[site])
            elif site in held["Bench"] or site in held["NPU"]:
                result.append(_one_sided_row(prompt["id"], site, "NPU" if site in held["NPU"] else "Bench",
                                             a_file if site in held["NPU"] else e_file))
    return result


def _one_sided_row(prompt_id: str, site: str, side: str, file) -> dict[str, str]:
    other = "Bench" if side == "NPU" else "NPU"
    row = {column: "N/A" for column in MSPROBE_COLUMNS}
    row.update({f"{side} Name": f"{prompt_id}.{site}", f"{side} Dtype": _torch_dtype(file.dtype_name(site)),
                f"{side} Tensor Shape": str(list(file.shape(site))), f"{side} Requires_grad": "False",
                "Err_message": json.dumps([f"No {'bench' if other == 'Bench' else 'NPU'} data matched."]),
                "Data_name": str([str(file.path), "N/A"] if side == "NPU" else ["N/A", str(file.path)])})
    stats = _Statistics()
    rows_per_block = max(1, _BLOCK_ELEMENTS // max(int(np.prod(file.shape(site)[1:], dtype=np.int64)), 1))
    for start in range(0, file.shape(site)[0], rows_per_block):
        stats.add(file.rows(site, start, min(start + rows_per_block, file.shape(site)[0])))
    for label, value in zip(("max", "min", "mean", "l2norm"), stats.result()):
        row[f"{side} {label}"] = _number(value, "nan")
    return row


def _row(comparison: dict, prompt_id: str, entry: dict, status: str, messages: list[str], found, unavailable) -> dict[str, str]:
    site = entry["site"]
    name = f"{prompt_id}.{site}"
    row = {"NPU Name": name, "Bench Name": name, "NPU Requires_grad": "False", "Bench Requires_grad": "False",
           "Requires_grad Consistent": "True", "Result": RESULT_LEVELS[status], "NPU_Stack_Info": "N/A"}
    if found is not None:
        (e_file, a_file), (metrics, e_stats, a_stats) = found
        if metrics is None:
            metrics = {key: entry["metrics"][key] for key in METRIC_COLUMNS.values()}
        row.update({"NPU Dtype": _torch_dtype(a_file.dtype_name(site)), "Bench Dtype": _torch_dtype(e_file.dtype_name(site)),
                    "NPU Tensor Shape": str(list(a_file.shape(site))), "Bench Tensor Shape": str(list(e_file.shape(site))),
                    "Data_name": str([str(a_file.path), str(e_file.path)])})
        for column, key in METRIC_COLUMNS.items():
            row[column] = _number(metrics[key], "unsupported")
        for side, stats in (("NPU", a_stats), ("Bench", e_stats)):
            for label, value in zip(("max", "min", "mean", "l2norm"), stats):
                row[f"{side} {label}"] = _number(value, "nan")
    else:
        dtypes = {role: comparison[role].get("dtype") for role in ("expected", "actual")}
        from_comparison = comparison.get("metric_convention") == "msprobe"
        row.update({"NPU Dtype": f"torch.{dtypes['actual']}", "Bench Dtype": f"torch.{dtypes['expected']}",
                    "NPU Tensor Shape": "N/A", "Bench Tensor Shape": "N/A", "Data_name": "N/A"})
        for column, key in METRIC_COLUMNS.items():
            row[column] = _number(entry["metrics"][key], "unsupported") if from_comparison else "N/A"
        for side in ("NPU", "Bench"):
            for label in ("max", "min", "mean", "l2norm"):
                row[f"{side} {label}"] = "N/A"
        messages = messages + [f"note: {unavailable if from_comparison else unavailable.replace('metrics from comparison.json', 'msprobe metrics unavailable (comparison.json holds the precision-check convention)')}"]
    row["Err_message"] = json.dumps(messages, ensure_ascii=False)
    return row


def tensor_pair_figures(e_file, a_file, site: str, with_metrics: bool = True):
    """msprobe's metrics of one site (precision.metrics.msprobe, streamed over row blocks; None without
    ``with_metrics``) and each side's float64 (max, min, mean, l2norm) over every element."""
    from precision.metrics.tensor import StreamingStats

    shape = tuple(e_file.shape(site))
    if tuple(a_file.shape(site)) != shape:
        raise ValueError(f"{site}: shapes {shape} and {tuple(a_file.shape(site))} differ")
    rows_per_block = max(1, _BLOCK_ELEMENTS // max(int(np.prod(shape[1:], dtype=np.int64)), 1))
    stream = StreamingStats(shape, "msprobe") if with_metrics else None
    sides = [_Statistics(), _Statistics()]
    for start in range(0, shape[0], rows_per_block):
        stop = min(start + rows_per_block, shape[0])
        e, a = e_file.rows(site, start, stop), a_file.rows(site, start, stop)
        if stream is not None:
            stream.add(e, a)
        sides[0].add(e)
        sides[1].add(a)
    if stream is None:
        return None, sides[0].result(), sides[1].result()
    result = stream.result()
    metrics = {key: getattr(result, key) for key in METRIC_COLUMNS.values()}
    return metrics, sides[0].result(), sides[1].result()


class _Statistics:
    """max, min, mean and l2 norm of every element, in float64; NaN and Inf propagate as in torch's statistics."""

    def __init__(self) -> None:
        self.max, self.min, self.sum, self.squares, self.count = -math.inf, math.inf, 0.0, 0.0, 0

    def add(self, block: np.ndarray) -> None:
        flat = block.reshape(-1)
        if flat.size == 0:
            return
        # max and min in the block's own dtype (widening to float64 is exact); sums over one float64 copy
        self.max = float(np.maximum(self.max, flat.max()))  # np.maximum keeps a NaN from either side
        self.min = float(np.minimum(self.min, flat.min()))
        values = flat.astype(np.float64)
        self.sum += float(values.sum())
        self.squares += float(np.einsum("i,i->", values, values))  # not BLAS: its threads contend with the metric workers
        self.count += values.size

    def result(self) -> tuple[float, float, float, float]:
        if not self.count:
            return (math.nan,) * 4
        return self.max, self.min, self.sum / self.count, math.sqrt(self.squares)


def _torch_dtype(safetensors_dtype: str) -> str:
    return {"BF16": "torch.bfloat16", "F16": "torch.float16", "F32": "torch.float32", "F64": "torch.float64"}.get(
        safetensors_dtype, safetensors_dtype)


def _number(value, nan_text: str) -> str:
    if value is None:
        return "N/A"
    value = float(value)
    if math.isnan(value):
        return nan_text
    return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")


def msprobe_csv_text(comparison: dict, verdict) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MSPROBE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(msprobe_rows(comparison, verdict))
    return buffer.getvalue()


def write_msprobe_csv(out_dir: str | Path, comparison: dict, verdict) -> Path:
    """Write ``out_dir/msprobe_compare.csv`` and list it in the directory's marker, so --force knows it as ours."""
    from precision.io import write_text_atomic

    out_dir = Path(out_dir)
    path = out_dir / CSV_NAME
    write_text_atomic(path, msprobe_csv_text(comparison, verdict))
    _register(out_dir)
    return path


def _register(out_dir: Path) -> None:
    from precision.outputs import OutputDir, read_marker

    marker = read_marker(out_dir)
    if marker is not None and CSV_NAME not in marker.get("entries", []):
        OutputDir(out_dir, marker["kind"]).register([CSV_NAME])


def export_comparison(comparison: str | Path, *, out: str | Path | None = None, thresholds=None) -> Path:
    """Judge a comparison.json (or the directory holding it) and write msprobe_compare.csv beside it or into ``out``."""
    from precision.analysis.verdict import judge
    from precision.io import read_comparison
    from precision.outputs import claim_for_update

    path, document = read_comparison(comparison)
    out_dir = Path(out) if out else path.parent
    with claim_for_update(out_dir, ("run", "comparison", "selftest-case"), new_kind="comparison", inputs=[]):
        return write_msprobe_csv(out_dir, document, judge(document, thresholds))

