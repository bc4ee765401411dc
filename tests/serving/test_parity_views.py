"""The parity building blocks that need no engine, on real captures of stories260K (transformers BF16 and FP32):
the restricted view a compiled configuration is compared on, and the per-site invariance that names the first site
where a state changes (both ways: a capture against itself names none; against another dtype, the first site that
differs)."""

from __future__ import annotations

from precision.analysis.compare import compare_captures
from precision.names import EMBED, FINAL_NORM, LOGITS
from precision.serving.invariance import site_invariance
from precision.serving.views import restricted_capture


def test_a_capture_is_invariant_against_itself(stories_reference):
    result = site_invariance(stories_reference, stories_reference)
    assert result["first_bitwise_site"] is None and result["first_site_beyond_limit"] is None
    assert all(row["all"]["bitwise_identical"] and row["all"]["relative_l2"] == 0.0 for row in result["sites"])


def test_the_first_changed_site_is_named(stories_reference, stories_truth):
    result = site_invariance(stories_reference, stories_truth, relative_limit=1e-3)
    rows = {row["site"]: row["all"] for row in result["sites"]}
    assert rows[EMBED]["relative_l2"] > 0  # the FP32 embedding is not the BF16 one rounded
    assert result["first_bitwise_site"] == EMBED
    first = next(site for site, row in rows.items() if row["relative_l2"] > 1e-3)
    assert result["first_site_beyond_limit"] == first


def test_restricted_view_compares_on_the_kept_sites_with_the_same_figures(stories_reference, stories_truth, tmp_path):
    sites = [FINAL_NORM, LOGITS]
    ref_view = restricted_capture(stories_reference, sites, tmp_path / "ref-view")
    truth_view = restricted_capture(stories_truth, sites, tmp_path / "truth-view")
    assert all(record.sites == sites for record in ref_view.prompts)
    full = {s["site"]: s["relative_l2"] for s in compare_captures(stories_reference, stories_truth)["sites"]}
    restricted = {s["site"]: s["relative_l2"] for s in compare_captures(ref_view, truth_view)["sites"]}
    assert restricted == {site: full[site] for site in sites}
    again = restricted_capture(stories_reference, sites, tmp_path / "ref-view")  # reused, not rewritten
    assert again.manifest_sha256() == ref_view.manifest_sha256()
