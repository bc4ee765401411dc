"""The hook logits checked against vLLM's own prompt logprobs, on a running engine (part of ``doctor --backend vllm``).

The capture computes logits itself, from the final-norm rows the hooks kept (vLLM never calls lm_head as a module).
This check asks the same engine, without hooks, for the logprobs of every prompt position (``prompt_logprobs``, the
top-K tokens plus the prompt's own token) and compares them with ``log_softmax`` of the captured logits. It catches
hooks on the wrong module, rows out of order or shifted by one position, and logits taken from another tensor than
the one vLLM samples from.

Definitions (float64 on our side; vLLM's values as it returns them):
- ``positions``: prompt positions compared, 1 .. n-1 (position p's distribution is captured logits row p-1).
- ``max_abs_logprob_difference``: max over those positions and over every token vLLM returned there of
  |log_softmax(captured logits row p-1)[token] - vLLM's logprob of token at p|.
- ``top1_agreement``: the share of positions where the token vLLM ranks 1 has the largest captured logprob (a tie
  for the largest counts as agreement: BF16 logits tie often).
- ``exact``: max difference <= EXACT_BOUND (a fact, not a verdict: the hooks read the very logits the engine samples
  from; on a device whose two forwards differ run to run it may be False while the capture is right).
- status PASS: max difference <= FAIL_BOUND and top-1 agreement 1; FAIL otherwise.
Measured on vLLM CPU with stories260K (tests/test_doctor.py): the capture's own logits 4.4e-7 (PASS, exact); the same
logits one position off 20.1 (FAIL); transformers' FP32 logits of the same tokens 0.146 and its BF16 logits 0.187
(FAIL: another forward of the model is not what this engine samples from).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

EXACT_BOUND = 1e-3
"""Both sides from the same logits of one eager forward differ only by vLLM's float32 log_softmax (about 1e-6 at the
magnitudes of logprobs); 1e-3 is generous for that and below one BF16 step of a logit of 1 (7.8e-3)."""
FAIL_BOUND = 0.0689
"""vllm-ascend's own bar for the same prefill token computed by two execution paths (tests/e2e/pull_request/utils.py
``compare_logprobs``, per the shared notes): it tolerates an NPU's run-to-run differences between the capture's forward
and the logprob forward; above it, the hook logits are not what the engine samples from."""


@dataclass(frozen=True)
class LogprobCheck:
    positions: int
    top_k: int
    max_abs_logprob_difference: float
    worst_position: int | None
    top1_agreement: float
    exact: bool
    status: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return (f"{self.status}: hook logits vs vLLM's prompt logprobs over {self.positions} positions (top {self.top_k}): "
                f"max |Δ logprob| {self.max_abs_logprob_difference:.3g} (PASS <= {FAIL_BOUND:g}; exact <= {EXACT_BOUND:g}: "
                f"{'yes' if self.exact else 'no'})"
                f"{'' if self.worst_position is None else f' at position {self.worst_position}'}, "
                f"top-1 agreement {self.top1_agreement:.3f}")


def compare_with_prompt_logprobs(hook_logits: Any, engine_logprobs: Sequence[Mapping[int, tuple[float, int]] | None],
                                 top_k: int) -> LogprobCheck:
    """``hook_logits``: the captured logits of every position, [n, vocabulary]; ``engine_logprobs``: for each prompt
    position, {token: (logprob, rank)} as vLLM returned it (None at position 0)."""
    import torch

    logprobs = torch.log_softmax(hook_logits.to(torch.float64), dim=-1)
    worst, worst_position, agreed, compared = 0.0, None, 0, 0
    for position in range(1, len(engine_logprobs)):
        entries = engine_logprobs[position]
        if not entries:
            continue
        row = logprobs[position - 1]
        compared += 1
        for token, (value, _rank) in entries.items():
            difference = abs(float(row[token]) - float(value))
            if math.isnan(difference):
                difference = math.inf  # NaN on either side counts as the worst difference
            if difference > worst:
                worst, worst_position = difference, position
        first = [token for token, (_value, rank) in entries.items() if rank == 1]
        agreed += bool(first) and float(row[first[0]]) >= float(row.max())
    if compared == 0:
        raise ValueError("no prompt position to compare: the prompt needs at least two tokens")
    agreement = agreed / compared
    status = "PASS" if worst <= FAIL_BOUND and agreement == 1.0 else "FAIL"
    return LogprobCheck(compared, top_k, worst, worst_position, agreement, worst <= EXACT_BOUND, status)


def run_prompt_logprob_check(backend: Any, token_ids: Sequence[int], path: Any, top_k: int = 5) -> LogprobCheck:
    """Capture ``token_ids`` with the active vLLM backend (every position, logits included) into ``path``, ask the
    same engine for its prompt logprobs, compare."""
    from safetensors.torch import load_file

    from precision.capture.sites import CaptureSelection
    from precision.names import LOGITS

    backend.capture(list(token_ids), CaptureSelection(), path)
    logits = load_file(str(path))[LOGITS]
    return compare_with_prompt_logprobs(logits, backend.prompt_logprobs(list(token_ids), top_k), top_k)
