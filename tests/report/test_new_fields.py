"""Whatever the comparison records about a flip or a non-finite value is shown, from real runs with planted faults;
fields a comparison lacks are simply not shown (the other report tests render comparisons without faults)."""

from __future__ import annotations

import html as html_lib
import re

from precision.io import read_result_json


def _section(report: str, name: str) -> str:
    body = re.search(rf'<section id="{name}">(.*?)</section>', report, re.S).group(1)
    return re.sub(r"\s+", " ", html_lib.unescape(re.sub(r"<[^>]+>", " ", body)))


def test_every_non_finite_site_is_listed_with_its_counts(nan_fault_run):
    comparison = read_result_json(nan_fault_run / "comparison.json")
    layers = _section((nan_fault_run / "report.html").read_text(), "layers")
    first = comparison["analysis"]["first_non_finite"]
    assert first is not None and f"First, in model order: prompt {first['prompt']} , {first['site']}" in layers
    listed = [(p["id"], s["site"], s["metrics"]["non_finite"]) for p in comparison["prompts"] for s in p["sites"]
              if any(v for k, v in s["metrics"]["non_finite"].items() if isinstance(v, int) and k != "first_index")]
    assert listed, "the planted NaN reaches the comparison"
    for prompt, site, counts in listed:
        shown = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts.items() if k != "first_index" and v not in (None, 0, []))
        assert f"{prompt} {site} {shown}" in layers, (prompt, site, shown)


def test_flip_fields_of_the_comparison_are_shown(logit_bias_run):
    comparison = read_result_json(logit_bias_run / "comparison.json")
    flips = [f for p in comparison["prompts"] for f in p["logits"]["flips"]]
    assert flips and not any(f["near_tie"] for f in flips), "a +30 logit bias makes real flips"
    texts = _section((logit_bias_run / "report.html").read_text(), "texts")
    for key in flips[0]:
        if key not in ("position", "expected_token", "actual_token", "expected_margin", "near_tie"):
            assert key.replace("_", " ") in texts, key
    assert texts.count("real flip") == len(flips)
