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

import numpy as np

from precision.analysis.near_tie import FAMILY_ALPHA, family_z, mantissa_bits, ulp
from precision.capture.reader import CaptureReader, PromptRecord
from precision.errors import PrecisionError
from precision.golden import load_store, verify_store
from precision.names import LOGITS, NEAR_TIE, POSITIONS

DEFAULT_TOP_K = 20
"""prompt_logprobs asked for: vLLM's default --max-logprobs is 20, so a production server accepts it."""
DEFAULT_TIMEOUT_S = 120.0


class CanaryServerError(PrecisionError):
    """The URL does not lead to a server the canary can use (down, wrong address, not vLLM, refused request)."""


@dataclass(frozen=True)
class StoredPrompt:
    """One prompt as the store holds it: the sequence to send and the reference's rows to compare with."""

    id: str
    category: str
    token_ids: tuple[int, ...]
    rows: np.ndarray
    """Sequence positions t whose prediction is compared (the reference's logits row t-1 is stored)."""
    log_probs: np.ndarray
    """float64 [len(rows), V]: log_softmax of the reference's logits at row t-1, for each t in ``rows``."""
    logits: np.ndarray
    """float32 [len(rows), V]: the reference's stored logits (BF16 values, widened exactly), for the ULP allowance."""
    envelope_diffs: list[np.ndarray] = field(default_factory=list)
    """Per envelope member that ran this prompt: float64 [len(rows), V] log-probability difference member - reference."""


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    values = logits.astype(np.float64)
    shifted = values - values.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _rows_of(reader: CaptureReader, record: PromptRecord) -> tuple[np.ndarray, np.ndarray]:
    """(positions t >= 1 compared, logits rows t-1) of one prompt of a capture."""
    handle = reader.arrays(record)
    if LOGITS not in handle.names():
        raise PrecisionError(f"{reader.path}: prompt {record.id!r} has no logits; a canary needs a store captured with logits")
    positions = handle.array(POSITIONS).astype(np.int64)
    logits = handle.array(LOGITS)
    keep = positions + 1 < len(record.forced_ids)  # the last row predicts a token beyond the sequence
    return positions[keep] + 1, logits[keep]


def load_expectations(store_path: str | Path) -> list[StoredPrompt]:
    """The store's prompts, reference log-probabilities and envelope differences, after checking every hash."""
    store_path = Path(store_path)
    store = load_store(store_path)
    problems = verify_store(store_path)
    if problems:
        raise PrecisionError(f"golden store {store_path} does not match its recorded hashes ({len(problems)} problem(s); first: {problems[0]}); "
                             "run 'precision-check golden verify' for the list, and create the store again")
    reference = CaptureReader(store_path / store["captures"]["reference"]["dir"])
    members = [CaptureReader(store_path / entry["dir"]) for entry in store["captures"]["envelope"].values()]
    member_records = [{r.id: r for r in member.prompts} for member in members]
    prompts = []
    for record in reference.prompts:
        rows, logits = _rows_of(reference, record)
        log_probs = _log_softmax(logits)
        diffs = []
        for member, records in zip(members, member_records):
            other = records.get(record.id)
            if other is None or other.forced_ids != record.forced_ids:
                continue
            member_rows, member_logits = _rows_of(member, other)
            if np.array_equal(member_rows, rows):
                diffs.append(_log_softmax(member_logits) - log_probs)
        prompts.append(StoredPrompt(record.id, record.category, record.forced_ids, rows, log_probs, logits, diffs))
    if not any(p.envelope_diffs for p in prompts):
        raise PrecisionError(f"golden store {store_path} has no envelope capture of its prompts; the canary's near-tie bound needs one: "
                             "create the store again with 'precision-check golden create'")
    return prompts


def _centred_rms(values: np.ndarray) -> float:
    return float(values.std()) if values.size else math.inf


def _centred_rms_without(diff_row: np.ndarray, i: int, j: int) -> float:
    return _centred_rms(np.delete(diff_row, sorted({i, j})))


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


def _envelope_sigmas(prompt: StoredPrompt, row: int, i: int, j: int) -> float | None:
    sigmas = [_centred_rms_without(diff[row], i, j) for diff in prompt.envelope_diffs]
    return max(sigmas) if sigmas else None


def judge(prompts: list[StoredPrompt], answers: list[list[dict[int, tuple[float, int]] | None]], alpha: float = FAMILY_ALPHA) -> list[PromptResult]:
    """Per prompt: every top-1 flip with its margin and bound (see the module docstring), and the largest
    log-probability error of the teacher-forced tokens."""
    total = sum(len(p.rows) for p in prompts)
    z = family_z(total, alpha)
    bits = mantissa_bits(None)
    results, pending = [], []
    for prompt, answer in zip(prompts, answers):
        result = PromptResult(prompt.id, prompt.category, positions=len(prompt.rows))
        for row, t in enumerate(prompt.rows):
            served = answer[int(t)]
            if not served:
                raise CanaryServerError(f"the server returned no log-probabilities at position {t} of prompt {prompt.id!r}")
            forced = prompt.token_ids[int(t)]
            if forced in served:
                result.max_forced_logprob_error = max(result.max_forced_logprob_error, abs(served[forced][0] - prompt.log_probs[row, forced]))
            top = min(served, key=lambda token: served[token][1])
            expected = int(np.argmax(prompt.log_probs[row]))
            if top == expected or top >= prompt.log_probs.shape[1]:
                continue
            margin = float(prompt.log_probs[row, expected] - prompt.log_probs[row, top])
            scale = max(abs(float(prompt.logits[row, expected])), abs(float(prompt.logits[row, top])))
            flip = {"position": int(t), "expected_token": expected, "actual_token": int(top), "margin": margin,
                    "rounding_allowance": 2 * ulp(scale, bits), "z": z}
            sigma = _envelope_sigmas(prompt, row, expected, int(top))
            result.flips.append(flip)
            pending.append((flip, sigma))
        results.append(result)
    largest = None
    for flip, sigma in pending:
        if sigma is None and largest is None:
            largest = max((float(d.std(axis=1).max()) for p in prompts for d in p.envelope_diffs if len(d)), default=math.inf)
        flip["envelope_sigma"] = sigma if sigma is not None else largest
        flip["envelope_sigma_source"] = "this position" if sigma is not None else "largest of the envelope's positions"
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
