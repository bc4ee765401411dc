"""Names of the captured tensors ("sites") and which positions / layers a capture keeps.

Sites, in model order:
    embed        residual stream after the embedding (transformers' hidden_states[0])
    layer.<i>    residual stream after decoder layer i, i = 0 .. L-1 (the last one is the pre-norm output)
    final_norm   output of the final RMSNorm (transformers' hidden_states[L])
    logits       full-vocabulary logits (lm_head applied to final_norm)
Every tensor is [captured positions, width] in the backend's dtype; the int64 tensor ``positions`` lists which
token positions the rows are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from precision.errors import PrecisionError
from precision.names import EMBED, FINAL_NORM, LAYER_PREFIX, LOGITS, POSITIONS, layer_site  # noqa: F401  (re-exported)

_LAYER = re.compile(rf"^{re.escape(LAYER_PREFIX)}(\d+)$")


def layer_index(site: str) -> int | None:
    match = _LAYER.match(site)
    return int(match.group(1)) if match else None


def site_order(sites: list[str]) -> list[str]:
    """Sites sorted in model order: embed, layers ascending, final_norm, logits."""

    def key(site: str) -> tuple[int, int]:
        if site == EMBED:
            return (0, 0)
        index = layer_index(site)
        if index is not None:
            return (1, index)
        return (2, 0) if site == FINAL_NORM else (3, 0)

    return sorted(sites, key=key)


@dataclass(frozen=True)
class CaptureSelection:
    """Which positions and layers to keep, to bound capture size.

    positions: "all", "last", or "every:K" (positions 0, K, 2K, ... plus the last one).
    layers: None for all decoder layers, else a tuple of layer indices (embed, final_norm and logits are
    always kept).
    """

    positions: str = "all"
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        self.position_indices(1)  # validates the spelling early

    @classmethod
    def parse(cls, positions: str = "all", layers: str = "all") -> "CaptureSelection":
        if layers in ("all", "", None):
            layer_tuple = None
        else:
            try:
                layer_tuple = tuple(sorted({int(part) for part in layers.split(",")}))
            except ValueError:
                raise PrecisionError(f"--layers {layers!r}: use 'all' or a comma-separated list of layer indices such as 0,5,31") from None
        return cls(positions=positions, layers=layer_tuple)

    def position_indices(self, length: int) -> list[int]:
        if self.positions == "all":
            return list(range(length))
        if self.positions == "last":
            return [length - 1]
        if self.positions.startswith("every:"):
            try:
                step = int(self.positions.split(":", 1)[1])
            except ValueError:
                step = 0
            if step >= 1:
                picked = list(range(0, length, step))
                return picked if picked[-1] == length - 1 else picked + [length - 1]
        raise PrecisionError(f"--positions {self.positions!r}: use 'all', 'last' or 'every:K' with K >= 1")

    def layer_indices(self, num_layers: int) -> list[int]:
        if self.layers is None:
            return list(range(num_layers))
        bad = [i for i in self.layers if not 0 <= i < num_layers]
        if bad:
            raise PrecisionError(f"--layers asks for {bad}, but the model has layers 0..{num_layers - 1}")
        return list(self.layers)

    def to_json(self) -> dict:
        return {"positions": self.positions, "layers": "all" if self.layers is None else list(self.layers)}
