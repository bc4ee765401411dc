"""Inputs of the metric functions: numpy arrays, anything numpy converts, and torch tensors of any float dtype."""

from __future__ import annotations

import numpy as np


def as_numpy(x) -> np.ndarray:
    """A numpy array of the values of ``x``, without copying when ``x`` already is one.

    torch tensors are detached and moved to the CPU; bfloat16, which numpy has no dtype for, is widened to float32
    (exact: every bfloat16 value is a float32 value). float16 stays float16. torch is not imported here: a tensor is
    recognised by its type's module, so that metric code runs (and the CLI starts) without torch."""
    if type(x).__module__.startswith("torch") and hasattr(x, "detach"):
        t = x.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return t.numpy()
    return np.asarray(x)
