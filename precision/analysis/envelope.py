"""The implementation envelope: how far legitimate implementation choices alone move the reference.

The reference is re-run with each member of ``DEFAULT_MEMBERS`` (see precision.backends.variants): reordered
and split accumulation in every matrix product, and, because two correct BF16 engines differ mostly in WHERE
they round (fused RMSNorm, fused SwiGLU) and in their attention algorithm, those variants too, alone and
combined. Accumulation order alone moves a BF16 model very little (one-ULP flips at ~0.1% of outputs); an
envelope of reorderings alone would call every healthy engine broken.

Per site, the envelope is the set of member errors against the unperturbed reference; the target's error is
placed in it as a ratio to the largest member error and as a percentile (share of members below it).
Per replayed step, the local envelope is the largest local error and the largest |local gain| of any member.
The step's local ratio is its local error over max(that largest local error, the step's rounding floor): where
every member computes a step bit for bit like the reference (a norm with unit weights, fused or not), the
envelope there is 0 and a target off by a single rounding would otherwise get an infinite ratio.
"""

from __future__ import annotations

import math

from precision import names
from precision.analysis.compare import compare_captures, pool_sites, ratio
from precision.capture.reader import CaptureReader

DEFAULT_MEMBERS: tuple[tuple[str, ...], ...] = (
    ("permute-k:1",),
    ("split-k:256",),
    ("attn:eager",),
    ("norm:fused",),
    ("mlp:fused",),
    ("attn:eager", "norm:fused", "mlp:fused", "split-k:512"),
)
"""One member per way two correct engines differ, and all of them combined. Split-k cuts a product's inner dimension
into slices of 256 (a 2560-wide product into 10), as split-K GEMMs cut it into a few: FP32 accumulation in another
order, like permute-k. Chunks of 16 (an earlier default) made one 41 x 2560 x 10496 product 120x slower than the
BF16 one on this project's 2-core CPU, the envelope's largest cost on a 3.9B model. Second samples of the same
kind (permute-k:2, split-k:1024, earlier defaults) set no maximum: on the seed model's shape (benchmarks/README.md)
the combined member had the largest error at all 34 sites, and split-k:1024's error was within 0.4% of
split-k:256's at every site."""

DEFAULT_MAX_TOKENS = 2048
"""Envelope members run on the prompts of at most this many tokens (eager attention is quadratic in memory)."""


def member_name(member: tuple[str, ...]) -> str:
    return "+".join(member)


def envelope_prompt_ids(reference: CaptureReader, max_tokens: int = DEFAULT_MAX_TOKENS) -> list[str]:
    return [r.id for r in reference.prompts if len(r.forced_ids) <= max_tokens]


def site_envelope(reference: CaptureReader, members: dict[str, CaptureReader], comparison: dict, prompt_ids: list[str]) -> dict:
    """Member errors per site, and where the target's error (pooled over the same prompts) falls."""
    target_sites = {s["site"]: s for s in pool_sites([p for p in comparison["prompts"] if p["id"] in set(prompt_ids)])}
    member_sites = {name: {s["site"]: s for s in compare_captures(reference, capture, prompt_ids=prompt_ids)["sites"]}
                    for name, capture in members.items()}
    rows = []
    for site, target in target_sites.items():
        errors = {name: sites[site][names.RELATIVE_L2] for name, sites in member_sites.items()}
        largest = max(errors.values())
        rows.append({
            "site": site,
            "target": target[names.RELATIVE_L2],
            "members": errors,
            "max": largest,
            "ratio": ratio(target[names.RELATIVE_L2], largest),
            "percentile": sum(e < target[names.RELATIVE_L2] for e in errors.values()) / len(errors),
        })
    return {"members": list(members), "prompts": prompt_ids, "sites": rows}


def local_envelope(target_steps: list[dict], member_steps: dict[str, list[dict]]) -> list[dict]:
    """Each replayed step of the target beside the largest local error and |gain| of any envelope member."""
    rows = []
    for index, step in enumerate(target_steps):
        locals_ = [steps[index]["local"] for steps in member_steps.values()]
        gains = [abs(steps[index][names.LOCAL_GAIN]) for steps in member_steps.values() if steps[index][names.LOCAL_GAIN] is not None]
        largest_local = max(locals_) if locals_ else math.nan
        largest_gain = max(gains) if gains else None
        floor = step.get("rounding_floor", 0.0)
        rows.append({
            **step,
            "envelope_local_max": largest_local,
            names.LOCAL_RATIO: ratio(step["local"], max(largest_local, floor)) if locals_ else None,
            "envelope_gain_max": largest_gain,
        })
    return rows
