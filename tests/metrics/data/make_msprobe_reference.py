"""Writes msprobe_reference.json: tensor pairs and the numbers msprobe's own compare functions give for them.

Run it with a Python that has mindstudio-probe installed, in a throwaway venv (msprobe is NOT a dependency of
precision-check, and the tests only read the JSON this writes):

    python3 -m venv /tmp/msprobe-venv && /tmp/msprobe-venv/bin/pip install mindstudio-probe numpy
    /tmp/msprobe-venv/bin/python tests/metrics/data/make_msprobe_reference.py

Each pair goes through what `msprobe compare` does with one tensor of a PyTorch dump: the tensor is squeezed
(msprobe/pytorch/compare/utils.py read_pt_data; bfloat16 is widened to float32 there, so bf16 cases are stored as
their exact float32 values), checked by ValidateTensor.check_tensor (empty, shape, 0-d, NaN/Inf positions, dtype)
and measured by compare_ops_apply with the six built-in columns. msprobe's n (NPU) is our actual, b (bench) our
expected. Values are stored as space-separated float.hex strings (exact, and NaN/Inf survive JSON); msprobe's results as it returns
them: a number, or a string ("unsupported", "N/A", "Nan").
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from msprobe.core.common.const import CompareConst
from msprobe.core.compare.npy_compare import CompareResult, ValidateTensor, compare_ops_apply

COLUMNS = {"Cosine": "cosine", "EucDist": "euclidean_distance", "MaxAbsErr": "max_abs", "MaxRelativeErr": "max_relative",
           "One Thousandth Err Ratio": "one_thousandth_err_ratio", "Five Thousandths Err Ratio": "five_thousandths_err_ratio"}


def bf16_values(x: np.ndarray) -> np.ndarray:
    """float32 -> the nearest bfloat16 (ties to even), as float32."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16) << 16
    return rounded.astype(np.uint32).view(np.float32)


def cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(20261130)
    f32 = np.float32
    out = {}
    e = rng.standard_normal((8, 32)).astype(f32)
    out["normal_rel_1e-3"] = (e, (e * (1 + 1e-3 * rng.standard_normal(e.shape))).astype(f32))
    e = (1e-7 * rng.standard_normal((5, 100))).astype(f32)
    out["references_near_1e-7"] = (e, (e * (1 + 1e-3 * rng.standard_normal(e.shape))).astype(f32))
    e = rng.standard_normal((4, 16)).astype(f32)
    a = (e * (1 + 2e-3 * rng.standard_normal(e.shape))).astype(f32)
    e[0, :4] = 0.0
    a[0, :2] = 0.0
    a[0, 2:4] = (1e-8, -3e-7)
    out["exact_zero_references"] = (e, a)
    out["both_all_zero"] = (np.zeros((3, 5), f32), np.zeros((3, 5), f32))
    out["reference_all_zero"] = (np.zeros((3, 5), f32), rng.standard_normal((3, 5)).astype(f32))
    out["target_all_zero"] = (rng.standard_normal((3, 5)).astype(f32), np.zeros((3, 5), f32))
    e = (1e-20 * rng.standard_normal(12)).astype(np.float64)
    out["norms_below_float64_eps"] = (e, e * 1.5)
    e = rng.standard_normal(20).astype(f32)
    out["opposite"] = (e, -e)
    e = rng.standard_normal((4, 8)).astype(f32)
    out["cosine_above_0.9999"] = (e, (e + 1e-4 * rng.standard_normal(e.shape)).astype(f32))
    e = rng.standard_normal((2, 8)).astype(f32)
    out["cosine_below_0.9999"] = (e, (e + 0.3 * rng.standard_normal(e.shape)).astype(f32))
    e = rng.standard_normal((4, 6)).astype(f32)
    a = (e * (1 + 1e-3 * rng.standard_normal(e.shape))).astype(f32)
    e[1, 2] = a[1, 2] = np.nan
    e[3, 0], a[3, 0] = np.inf, -np.inf  # msprobe compares Inf positions, not signs: zeroed like the NaN
    out["non_finite_at_the_same_elements"] = (e, a)
    e = rng.standard_normal((4, 6)).astype(f32)
    a = e.copy()
    e[0, 0] = np.nan
    a[2, 3] = np.nan
    out["non_finite_at_different_elements"] = (e, a)
    e = rng.standard_normal((4, 6)).astype(f32)
    a = e.copy()
    e[1, 1], a[1, 1] = np.nan, np.inf
    out["nan_against_inf"] = (e, a)
    out["one_element"] = (np.array([2.0], f32), np.array([2.5], f32))
    out["one_element_zero_reference"] = (np.array([[0.0]], f32), np.array([[1e-3]], f32))
    e = rng.standard_normal((6, 10)).astype(np.float16)
    out["float16"] = (e, (e.astype(np.float64) * (1 + 2e-3 * rng.standard_normal(e.shape))).astype(np.float16))
    e = rng.standard_normal((6, 10))
    a = e * (1 + 1e-3 * rng.standard_normal(e.shape))
    e[0, 0] = 0.0
    out["float64"] = (e, a)
    e = bf16_values(rng.standard_normal((16, 24)).astype(f32))
    out["bfloat16_values"] = (e, bf16_values(e * (1 + 4e-3 * rng.standard_normal(e.shape)).astype(f32)))
    return out


def msprobe_numbers(e: np.ndarray, a: np.ndarray) -> dict:
    n_value, b_value = np.squeeze(a.copy()), np.squeeze(e.copy())
    result = ValidateTensor().check_tensor(CompareResult(n_value, b_value))
    values, _ = compare_ops_apply(result.n_value, result.b_value, result.error_flag, result.err_msg,
                                  column_names=list(COLUMNS))
    return {COLUMNS[c]: (v if isinstance(v, str) else float(v)) for c, v in zip(COLUMNS, values)}


def main() -> int:
    import importlib.metadata

    records = []
    for name, (e, a) in cases().items():
        records.append({
            "name": name,
            "dtype": str(e.dtype),
            "shape": list(e.shape),
            "expected": " ".join(float(v).hex() for v in e.ravel().tolist()),
            "actual": " ".join(float(v).hex() for v in a.ravel().tolist()),
            "msprobe": msprobe_numbers(e, a),
        })
    data = {
        "note": "Made by tests/metrics/data/make_msprobe_reference.py with mindstudio-probe "
                f"{importlib.metadata.version('mindstudio-probe')} and numpy {np.__version__} (see its docstring). "
                "expected = msprobe's bench, actual = its NPU side; values as space-separated float.hex, row-major.",
        "cases": records,
    }
    out = Path(__file__).with_name("msprobe_reference.json")
    out.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
    print(f"wrote {out} ({len(records)} cases)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
