"""Near-tie or real flip: is a teacher-forced top-1 disagreement what rounding noise plausibly produces?

At a position the reference picks token i (logit e_i), the target token j (a_j). With d = a - e the target's
logit error, the target prefers j exactly when d_j - d_i > e_i - e_j, the flip margin m (>= 0).

Noise model (the null hypothesis "the target is a healthy re-rounding of the reference"): the logit errors of
the tokens at one position are draws of one distribution with mean ~0 and RMS sigma. sigma is estimated from
the OTHER V - 2 tokens of that position (``LogitsStats.other_rms``), so a fault on token i or j (a biased
lm_head row, a wrong constant on one logit) cannot raise the bound that judges it. Then d_j - d_i has RMS
sqrt(2) sigma, and treating it as normal, P(|d_j - d_i| > z sqrt(2) sigma) = 2 (1 - Phi(z)).

Stored logits are themselves rounded to their dtype: a stored difference of two logits differs from the exact
one by up to one unit in the last place (two half-ULP roundings) on each side, so a flip can show a stored
margin up to ulp_reference + ulp_target beyond the exact noise (ULPs at max(|e_i|, |e_j|), each side's dtype).

    bound = ulp_reference + ulp_target + z * sqrt(2) * sigma
    near-tie  <=>  m <= bound

z controls false alarms over the whole run: with n finite positions compared, Sidak's correction gives each
position the two-sided level alpha_1 = 1 - (1 - alpha)^(1/n), z = Phi^-1(1 - alpha_1 / 2), so that a healthy
target raises a real-flip FAIL somewhere in the run with probability at most alpha (FAMILY_ALPHA = 1 %) under the
model. Positions are the family because the rule fires once per position; at a position only tokens within the
bound of e_i can flip at all, and their count is small next to what z's tail already covers.
"""

from __future__ import annotations

import math
from statistics import NormalDist

FAMILY_ALPHA = 0.01
"""Probability that a healthy target shows at least one real flip in a run, under the noise model above."""

_MANTISSA_BITS = {"bfloat16": 7, "bf16": 7, "float16": 10, "fp16": 10, "half": 10, "float32": 23, "fp32": 23, "float": 23,
                  "float64": 52, "fp64": 52}


def mantissa_bits(dtype: str | None) -> int:
    """Explicit mantissa bits of a capture's dtype name; an unknown or missing name counts as BF16 (the widest
    rounding unit the tool captures), so the allowance is never smaller than the truth."""
    return _MANTISSA_BITS.get(str(dtype or "bfloat16").lower().replace("torch.", ""), 7)


def ulp(value: float, bits: int) -> float:
    """The unit in the last place of |value| with ``bits`` explicit mantissa bits (normal numbers)."""
    magnitude = abs(value)
    if magnitude == 0.0 or not math.isfinite(magnitude):
        return 0.0
    return 2.0 ** (math.floor(math.log2(magnitude)) - bits)


def family_z(positions: int, alpha: float = FAMILY_ALPHA) -> float:
    """z of a two-sided test at Sidak's per-position level for ``positions`` tests at family-wise level alpha."""
    n = max(int(positions), 1)
    per_position = -math.expm1(math.log1p(-alpha) / n)  # 1 - (1 - alpha)^(1/n), exact for large n
    return NormalDist().inv_cdf(1.0 - per_position / 2.0)


def classify_flips(flips: list[dict], positions: int, *, reference_dtype: str | None, target_dtype: str | None,
                   alpha: float = FAMILY_ALPHA) -> None:
    """Sets ``z``, ``ulp``, ``rounding_allowance``, ``bound`` and ``near_tie`` on each flip (in place); each flip
    carries its ``flip_margin``, ``other_rms`` and ``flip_scale`` (see LogitsStats)."""
    z = family_z(positions, alpha)
    ref_bits, target_bits = mantissa_bits(reference_dtype), mantissa_bits(target_dtype)
    for flip in flips:
        ref_ulp = ulp(flip["flip_scale"], ref_bits)
        allowance = ref_ulp + ulp(flip["flip_scale"], target_bits)
        sigma = flip["other_rms"]
        noise = z * math.sqrt(2.0) * sigma if math.isfinite(sigma) else math.inf  # V <= 2: no other token to measure
        bound = allowance + noise
        flip.update(z=z, alpha=alpha, family_positions=positions, ulp=ref_ulp, rounding_allowance=allowance, bound=bound,
                    near_tie=bool(flip["flip_margin"] <= bound))
