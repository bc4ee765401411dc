"""The theory band: the relative error BF16 rounding alone predicts, per site, drawn beside the measured curves.

Model (order of magnitude; it ignores how layers amplify the error they inherit, which the measured
amplification shows):
- one BF16 rounding of a value has a relative error of at most u = 2^-8 and about u/sqrt(3) in RMS;
- a length-K reduction with FP32 accumulators adds about sqrt(K) * 2^-24 (probabilistic growth, Higham & Mary
  2019), which is negligible next to the BF16 output rounding for every K of a Llama;
- the residual stream after decoder layer i has received n = 4 (i + 1) rounded contributions (attention output,
  residual add, MLP output, residual add per layer); if they were independent and not amplified, its error
  against FP32 truth would lie between one rounding (u/sqrt(3)) and sqrt(n) u/sqrt(3);
- two engines that round independently differ by sqrt(2) times that: the band drawn for target vs reference.
"""

from __future__ import annotations

import math

from precision.capture import sites as site_names

BF16_U = 2.0**-8
FP32_U = 2.0**-24
ONE_ROUNDING = BF16_U / math.sqrt(3.0)
ROUNDINGS_PER_LAYER = 4
UNIT_ROUNDOFF = {"bfloat16": BF16_U, "float16": 2.0**-11, "float32": FP32_U, "float64": 2.0**-53}


def rounding_floor(dtype_name: str = "bfloat16") -> float:
    """The relative RMS error of one rounding to ``dtype_name`` (u / sqrt(3), u its unit roundoff): the least a
    step computed by another correct implementation may differ by, since each rounds its output once. Ratios of
    local error and local R are taken against at least this, so a step off by one rounding never fails."""
    return UNIT_ROUNDOFF.get(dtype_name, BF16_U) / math.sqrt(3.0)


def theory_band(sites: list[str], *, hidden_size: int, intermediate_size: int | None, head_dim: int | None,
                sequence_length: int, num_layers: int | None = None) -> list[dict]:
    """Per site, the band of relative errors BF16 rounding predicts. The final norm and the logits come after
    all ``num_layers`` decoder layers, captured or not (--layers keeps a subset)."""
    reductions = {"hidden": hidden_size, "intermediate": intermediate_size or hidden_size, "head_dim": head_dim or hidden_size,
                  "sequence": sequence_length}
    accumulation = math.sqrt(max(reductions.values())) * FP32_U
    band = []
    layers_seen = 0
    for site in sites:
        index = site_names.layer_index(site)
        if site == site_names.EMBED:
            roundings = 1
        elif index is not None:
            layers_seen = index + 1
            roundings = ROUNDINGS_PER_LAYER * layers_seen
        else:  # final norm and logits add one rounding each on top of the last layer
            roundings = ROUNDINGS_PER_LAYER * (num_layers or layers_seen) + (1 if site == site_names.FINAL_NORM else 2)
        low = ONE_ROUNDING + accumulation
        high = math.sqrt(roundings) * (ONE_ROUNDING + accumulation)
        band.append({"site": site, "roundings": roundings, "vs_truth_low": low, "vs_truth_high": high,
                     "between_engines_low": math.sqrt(2.0) * low, "between_engines_high": math.sqrt(2.0) * high})
    return band


def model_reductions(config: dict) -> dict:
    """hidden, intermediate and head sizes from a config.json."""
    text = config.get("text_config", config)
    heads = text.get("num_attention_heads") or 1
    return {"hidden_size": text["hidden_size"], "intermediate_size": text.get("intermediate_size"),
            "head_dim": text.get("head_dim") or text["hidden_size"] // heads}
