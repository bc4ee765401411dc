"""Live canary: a served model's prompt log-probabilities against a golden store's reference, with nothing
installed in the server, so it can run against production.

For every prompt of the store, the teacher-forced sequence (prompt + the stored reference's greedy continuation)
is sent as token ids to the server's OpenAI-compatible ``/completions`` endpoint with vLLM's ``prompt_logprobs``
(an extra body parameter), ``max_tokens`` 1 and temperature 0. vLLM answers, for every position t >= 1 of the
sequence, the log-probabilities of its top-k tokens given tokens 0..t-1: the distribution the reference's logits
row t-1 describes. The reference's log-probabilities are ``log_softmax`` of its stored logits, in float64.

The one rule (a FAIL, exit 1): a real top-1 flip. At row t-1 the reference prefers token i, the server ranks j
first (j != i). The flip margin is m = lp_ref(i) - lp_ref(j) >= 0. It is a near-tie, not a failure, when

    m <= bound = 2 * ulp_bf16(max(|logit_i|, |logit_j|)) + z * sqrt(2) * sigma_envelope

which is precision.analysis.near_tie's bound with the noise scale taken from the golden store instead of the
target: a server returns only its top-k tokens, too few to measure its own noise, and a faulty server must not
widen the gate it is judged by. sigma_envelope at a row is the largest, over the store's implementation-envelope
members, RMS over the tokens other than i and j of the centred log-probability difference (member - reference)
(centred: log-probabilities of two engines differ by a per-row constant, their log-partition functions). Rows of
prompts the envelope did not run take the largest sigma of the rows it did run. The rounding allowance counts one
BF16 unit in the last place for each side (the served dtype is not reported by the server; BF16 is the widest
the tool assumes, as near_tie.mantissa_bits does). z is near_tie.family_z over all rows compared in the canary (1 %
family-wise false-alarm rate under the noise model).

Reported, not judged: the largest |lp_server(t) - lp_ref(t)| of the teacher-forced tokens, per prompt.
"""

from __future__ import annotations

import json
import math
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from precision.analysis.near_tie import FAMILY_ALPHA, family_z, mantissa_bits, ulp
from precision.capture.reader import CaptureReader, PromptRecord
from precision.errors import PrecisionError
from precision.golden import verified_store
from precision.names import LOGITS, NEAR_TIE, POSITIONS

DEFAULT_TOP_K = 20
"""prompt_logprobs asked for: vLLM's default --max-logprobs is 20, so a production server accepts it."""
DEFAULT_TIMEOUT_S = 120.0


class CanaryServerError(PrecisionError):
    """The URL does not lead to a server the canary can use (down, wrong address, not vLLM, refused request)."""


@dataclass(frozen=True)
class StoredPrompt:
    """One prompt as the store holds it: the sequence to send, and where its reference and envelope rows lie. Tensors
    are read one prompt at a time, and envelope rows only where a flip needs them (a store of a 166k vocabulary
    holds gigabytes of logits)."""

    id: str
    category: str
    token_ids: tuple[int, ...]
    reference: tuple[CaptureReader, PromptRecord]
    members: tuple[tuple[CaptureReader, PromptRecord], ...]
    """The envelope members that ran this exact sequence."""


@dataclass(frozen=True)
class ReferenceRows:
    """The reference's predictions of one prompt: for each compared position t (>= 1), its logits row t-1."""

    positions: np.ndarray
    logits: np.ndarray
    """[len(positions), V] as stored (BF16 values widened exactly to float32)."""
    log_partition: np.ndarray
    """float64 per row: logsumexp of the row, so that lp_ref(v) = logits[row, v] - log_partition[row] (log_softmax)."""

    def log_probs(self, row: int) -> np.ndarray:
        return self.logits[row].astype(np.float64) - self.log_partition[row]


def _log_softmax(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    shifted = values - values.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _logits_rows(reader: CaptureReader, record: PromptRecord) -> tuple[np.ndarray, Any]:
    """(captured positions, the checked tensor handle) of one prompt; verified_store has hashed every file already."""
    handle = reader.arrays(record, verify=False)
    if LOGITS not in handle.names():
        raise PrecisionError(f"{reader.path}: prompt {record.id!r} has no logits; a canary needs a store captured with logits")
    return handle.array(POSITIONS).astype(np.int64), handle


def _compared_rows(prompt: StoredPrompt) -> np.ndarray:
    """Indices of the reference's captured rows that predict a token of the sequence (not the last position's)."""
    positions, _ = _logits_rows(*prompt.reference)
    return np.flatnonzero(positions + 1 < len(prompt.token_ids))


def reference_rows(prompt: StoredPrompt, chunk_rows: int = 64) -> ReferenceRows:
    positions, handle = _logits_rows(*prompt.reference)
    keep = _compared_rows(prompt)
    logits = handle.array(LOGITS)[keep]
    log_partition = np.empty(len(keep))
    for start in range(0, len(keep), chunk_rows):  # float64 a few rows at a time
        block = logits[start:start + chunk_rows].astype(np.float64)
        top = block.max(axis=-1, keepdims=True)
        log_partition[start:start + chunk_rows] = (top + np.log(np.exp(block - top).sum(axis=-1, keepdims=True)))[:, 0]
    return ReferenceRows(positions[keep] + 1, logits, log_partition)


def _member_log_probs(member: tuple[CaptureReader, PromptRecord], position: int) -> np.ndarray | None:
    """The member's log_softmax (float64) predicting ``position``, or None where it did not capture row position-1."""
    positions, handle = _logits_rows(*member)
    found = np.flatnonzero(positions == position - 1)
    return _log_softmax(handle.rows(LOGITS, int(found[0]), int(found[0]) + 1)[0]) if found.size else None


def load_expectations(store_path: str | Path) -> list[StoredPrompt]:
    """The store's prompts and the envelope members that ran each, after checking every recorded hash."""
    store_path = Path(store_path)
    store = verified_store(store_path)
    reference = CaptureReader(store_path / store["captures"]["reference"]["dir"])
    members = [CaptureReader(store_path / entry["dir"]) for entry in store["captures"]["envelope"].values()]
    member_records = [{r.id: r for r in member.prompts} for member in members]
    prompts = []
    for record in reference.prompts:
        ran = tuple((member, records[record.id]) for member, records in zip(members, member_records)
                    if record.id in records and records[record.id].forced_ids == record.forced_ids)
        prompts.append(StoredPrompt(record.id, record.category, record.forced_ids, (reference, record), ran))
    if not any(p.members for p in prompts):
        raise PrecisionError(f"golden store {store_path} has no envelope capture of its prompts; the canary's near-tie bound needs one: "
                             "create the store again with 'precision-check golden create'")
    return prompts


def _centred_rms_without(diff_row: np.ndarray, i: int, j: int) -> float:
    others = np.delete(diff_row, sorted({i, j}))
    return float(others.std()) if others.size else math.inf


def _largest_envelope_sigma(prompts: list[StoredPrompt]) -> float:
    """The largest centred RMS of (member - reference) log-probabilities over every row any member ran: the noise
    scale of positions of prompts no member ran."""
    largest = 0.0
    for prompt in prompts:
        if not prompt.members:
            continue
        reference = reference_rows(prompt)
        for member in prompt.members:
            for row, position in enumerate(reference.positions):
                member_row = _member_log_probs(member, int(position))
                if member_row is not None:
                    largest = max(largest, float((member_row - reference.log_probs(row)).std()))
    return largest if largest > 0 else math.inf


# -- the server ---------------------------------------------------------------------------------------------------
def _request(url: str, body: dict | None, timeout: float) -> dict:
    data = None if body is None else json.dumps(body).encode("utf-8")
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", errors="replace")[:300]
        raise CanaryServerError(f"{url} answered HTTP {exc.code}: {detail}") from exc
    except (urllib.error.URLError, socket.timeout, ConnectionError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CanaryServerError(f"cannot reach {url} ({reason}); check that the server is running and --url is its OpenAI base URL, "
                                "e.g. http://HOST:PORT/v1") from exc
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise CanaryServerError(f"{url} did not answer JSON (it began {text[:80]!r}); --url must be an OpenAI-compatible base URL ending in /v1") from exc


def check_url(url: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise PrecisionError(f"--url {url!r} is not an http(s) URL; give the server's OpenAI base URL, e.g. http://127.0.0.1:8000/v1")
    return url.rstrip("/")


def served_model(url: str, wanted: str | None, timeout: float) -> str:
    """The model name to send: ``wanted`` after checking the server serves it, or the server's only model."""
    answer = _request(f"{url}/models", None, timeout)
    names = [m.get("id") for m in answer.get("data", []) if isinstance(m, dict)] if isinstance(answer, dict) else []
    if not names:
        raise CanaryServerError(f"{url}/models lists no model; --url must be an OpenAI-compatible server's base URL (e.g. http://HOST:PORT/v1)")
    if wanted is None:
        if len(names) > 1:
            raise PrecisionError(f"{url} serves {names}; choose one with --model")
        return names[0]
    if wanted not in names:
        raise PrecisionError(f"{url} does not serve {wanted!r}; it serves {names}")
    return wanted


def prompt_logprobs(url: str, model: str, token_ids: tuple[int, ...], top_k: int, timeout: float) -> list[dict[int, tuple[float, int]] | None]:
    """Per sequence position: {token id: (log-probability, rank)} of the server's top-k tokens (and the sequence's own
    token, which vLLM always adds), None at position 0."""
    body = {"model": model, "prompt": list(token_ids), "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": top_k}
    answer = _request(f"{url}/completions", body, timeout)
    choices = answer.get("choices") if isinstance(answer, dict) else None
    entries = choices[0].get("prompt_logprobs") if isinstance(choices, list) and choices and isinstance(choices[0], dict) else None
    if not isinstance(entries, list) or len(entries) != len(token_ids):
        raise CanaryServerError(f"{url}/completions returned no prompt_logprobs for {len(token_ids)} tokens: the canary needs a vLLM server "
                                "(its OpenAI-compatible server, 'vllm serve', accepts prompt_logprobs as an extra body parameter)")
    out: list[dict[int, tuple[float, int]] | None] = []
    for entry in entries:
        if entry is None:
            out.append(None)
            continue
        try:
            out.append({int(token): (float(v["logprob"]), int(v["rank"])) for token, v in entry.items()})
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise CanaryServerError(f"{url}/completions returned prompt_logprobs in an unknown layout ({str(entry)[:120]}); expected vLLM's "
                                    "{token id: {logprob, rank, decoded_token}}") from exc
    return out


# -- judging ------------------------------------------------------------------------------------------------------
@dataclass
class PromptResult:
    id: str
    category: str
    positions: int = 0
    flips: list[dict] = field(default_factory=list)
    max_forced_logprob_error: float = 0.0
    """max over compared positions t of |lp_server(token_t) - lp_ref(token_t)| (nats)."""

    @property
    def real_flips(self) -> list[dict]:
        return [f for f in self.flips if not f[NEAR_TIE]]


def _envelope_sigma(prompt: StoredPrompt, reference: ReferenceRows, row: int, i: int, j: int) -> float | None:
    """The largest, over the members that ran this row, centred RMS of (member - reference) log-probabilities over the
    tokens other than i and j; None where no member ran it."""
    expected = reference.log_probs(row)
    sigmas = []
    for member in prompt.members:
        member_row = _member_log_probs(member, int(reference.positions[row]))
        if member_row is not None:
            sigmas.append(_centred_rms_without(member_row - expected, i, j))
    return max(sigmas) if sigmas else None


def judge(prompts: list[StoredPrompt], answers: list[list[dict[int, tuple[float, int]] | None]], alpha: float = FAMILY_ALPHA) -> list[PromptResult]:
    """Per prompt: every top-1 flip with its margin and bound (see the module docstring), and the largest
    log-probability error of the teacher-forced tokens."""
    z = family_z(sum(len(_compared_rows(p)) for p in prompts), alpha)
    bits = mantissa_bits(None)
    results, unplaced = [], []
    for prompt, answer in zip(prompts, answers):
        reference = reference_rows(prompt)
        result = PromptResult(prompt.id, prompt.category, positions=len(reference.positions))
        vocab = reference.logits.shape[1]
        for row, t in enumerate(reference.positions):
            served = answer[int(t)]
            if not served:
                raise CanaryServerError(f"the server returned no log-probabilities at position {t} of prompt {prompt.id!r}")
            forced = prompt.token_ids[int(t)]
            if forced in served:
                error = abs(served[forced][0] - (float(reference.logits[row, forced]) - reference.log_partition[row]))
                result.max_forced_logprob_error = max(result.max_forced_logprob_error, error)
            top = min(served, key=lambda token: served[token][1])
            expected = int(np.argmax(reference.logits[row]))
            if top == expected:
                continue
            if not 0 <= top < vocab:
                raise CanaryServerError(f"the server ranks token {top} first at position {t} of prompt {prompt.id!r}, outside the stored "
                                        f"reference's vocabulary of {vocab}: it serves another model or tokenizer than the store's")
            flip = {"position": int(t), "expected_token": expected, "actual_token": int(top),
                    "margin": float(reference.logits[row, expected]) - float(reference.logits[row, top]),  # = lp_ref(i) - lp_ref(j), exact in float64
                    "rounding_allowance": 2 * ulp(max(abs(float(reference.logits[row, expected])), abs(float(reference.logits[row, top]))), bits),
                    "z": z}
            sigma = _envelope_sigma(prompt, reference, row, expected, int(top))
            if sigma is None:
                unplaced.append(flip)
            else:
                flip.update(envelope_sigma=sigma, envelope_sigma_source="this position")
            result.flips.append(flip)
        results.append(result)
    if unplaced:
        largest = _largest_envelope_sigma(prompts)
        for flip in unplaced:
            flip.update(envelope_sigma=largest, envelope_sigma_source="largest of the envelope's positions")
    for flip in (f for r in results for f in r.flips):
        flip["bound"] = flip["rounding_allowance"] + z * math.sqrt(2.0) * flip["envelope_sigma"]
        flip[NEAR_TIE] = bool(flip["margin"] <= flip["bound"])
    return results


def run_canary(url: str, store: str | Path, *, model: str | None = None, top_k: int = DEFAULT_TOP_K,
               timeout: float = DEFAULT_TIMEOUT_S) -> list[PromptResult]:
    """Send every stored prompt to the server and judge its answers (see the module docstring)."""
    url = check_url(url)
    if top_k < 1:
        raise PrecisionError(f"--top-k {top_k}: must be at least 1 (the server's --max-logprobs caps it; vLLM's default is 20)")
    name = served_model(url, model, timeout)  # the server first: a wrong URL is the commonest mistake, and the cheapest to find
    prompts = load_expectations(store)
    answers = [prompt_logprobs(url, name, p.token_ids, top_k, timeout) for p in prompts]
    return judge(prompts, answers)
