"""Batch-composition and cache-state invariance, per site, from a configuration's capture and the baseline's.

- Per site: is the configuration's state bitwise the baseline's, and its relative L2 error against it (float64):
  ||a - e||_2 / ||e||_2 over the rows compared, pooled over prompts as sqrt(sum ||a-e||^2) / sqrt(sum ||e||^2).
- Cache state: the same figures apart for the positions whose rows came from an earlier request (served from the
  prefix cache in the request under test) and the positions the request computed itself, per prompt as the
  worker recorded them (``positions_from_earlier_requests``).
- Recompute: the same figures apart for the positions the configuration computed more than once (a preempted
  request recomputed from scratch; the capture holds the last computation) and those it computed once, per prompt
  as the worker recorded them (``recomputation.recomputed_positions``).
The first site, in model order, where the state stops being bitwise identical, and the first where its relative
error exceeds ``relative_limit``, are named.
"""

from __future__ import annotations

import math

import numpy as np

from precision.capture.reader import CaptureReader
from precision.capture.sites import site_order
from precision.names import POSITIONS, RELATIVE_L2


def _accumulate(table: dict, site: str, group: str, expected: np.ndarray, actual: np.ndarray) -> None:
    entry = table.setdefault(site, {}).setdefault(group, {"rows": 0, "identical": True, "diff2": 0.0, "ref2": 0.0})
    if expected.size == 0:
        return
    entry["rows"] += expected.shape[0]
    entry["identical"] &= bool(np.array_equal(expected, actual))
    entry["diff2"] += float(np.sum((actual - expected) ** 2))
    entry["ref2"] += float(np.sum(expected ** 2))


def site_invariance(baseline: CaptureReader, served: CaptureReader, relative_limit: float = 0.0) -> dict:
    """Per site and position group ("all"; with a prefix-cache hit "cached" / "computed"; with a recomputation
    "recomputed" / "computed_once"): rows compared, bitwise
    identical or not, pooled relative L2; and the first sites that differ bitwise and beyond ``relative_limit``."""
    evidence = served.manifest["backend"].get("serving", {}).get("evidence", [])
    table: dict[str, dict] = {}
    for index, (e_rec, a_rec) in enumerate(zip(baseline.prompts, served.prompts)):
        entry = evidence[index] if index < len(evidence) else {}
        cached = set(entry.get("positions_from_earlier_requests", ()))
        recomputed = set((entry.get("recomputation") or {}).get("recomputed_positions", ()))
        eh, ah = baseline.arrays(e_rec), served.arrays(a_rec)
        positions = eh.array(POSITIONS).tolist()
        from_cache = np.array([p in cached for p in positions], dtype=bool)
        again = np.array([p in recomputed for p in positions], dtype=bool)
        for site in a_rec.sites:
            expected = eh.array(site).astype(np.float64)
            actual = ah.array(site).astype(np.float64)
            _accumulate(table, site, "all", expected, actual)
            if cached:
                _accumulate(table, site, "cached", expected[from_cache], actual[from_cache])
                _accumulate(table, site, "computed", expected[~from_cache], actual[~from_cache])
            if recomputed:
                _accumulate(table, site, "recomputed", expected[again], actual[again])
                _accumulate(table, site, "computed_once", expected[~again], actual[~again])
    rows = []
    for site in site_order(list(table)):
        groups = {}
        for group, entry in table[site].items():
            relative = math.sqrt(entry["diff2"]) / math.sqrt(entry["ref2"]) if entry["ref2"] > 0 else (0.0 if entry["diff2"] == 0 else math.inf)
            groups[group] = {"rows": entry["rows"], "bitwise_identical": entry["identical"], RELATIVE_L2: relative}
        rows.append({"site": site, **groups})
    first_bitwise = next((r["site"] for r in rows if not r["all"]["bitwise_identical"]), None)
    first_beyond = next((r["site"] for r in rows if r["all"][RELATIVE_L2] > relative_limit), None)
    return {"sites": rows, "first_bitwise_site": first_bitwise, "first_site_beyond_limit": first_beyond, "relative_limit": relative_limit}
