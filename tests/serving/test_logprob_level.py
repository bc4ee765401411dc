"""The prompt-logprobs level without an engine: its metrics against a numpy oracle, its rules both ways on real
captures of stories260K (transformers BF16 reference as the baseline, FP32 truth, an envelope member), and its
capture path (forced, and the fallback when the hook capture raises NoHookLevelError) through the real capture
writer with a stand-in engine that answers prompt_logprobs from the reference's own logits."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from precision.analysis.verdict import Status
from precision.names import LOGITS
from precision.serving.engine import NoHookLevelError, ServingBackend, ServingConfig
from precision.serving.logprob_compare import (ACTUAL_DELTA, R_TOPK, TOPK_DELTA, ServedLogprobs, compare_logprob_level,
                                               judge_logprob_level, position_metrics)
from precision.serving.logprob_level import DETAIL_PROMPT_LOGPROBS, FALLBACK, FORCED, LogprobLevelBackend, served_level, served_logprobs

TOP_K = 20


def _served_from_logits(logits: np.ndarray, forced_ids: list[int], rows: list[int], top_k: int = TOP_K) -> ServedLogprobs:
    """What vLLM returns, built from ``logits`` (one row per entry of ``rows``): float32 log_softmax, top-K by rank."""
    x = logits.astype(np.float32)
    lp = x - x.max(axis=1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(axis=1, keepdims=True))
    ids = np.argsort(-lp, axis=1, kind="stable")[:, :top_k]
    actual = np.asarray([forced_ids[r + 1] for r in rows])
    return ServedLogprobs(rows=np.asarray(rows), top_ids=ids, top_logprobs=np.take_along_axis(lp, ids, axis=1).astype(np.float64),
                          actual_ids=actual, actual_logprobs=lp[np.arange(len(rows)), actual].astype(np.float64))


def test_position_metrics_match_a_numpy_oracle():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(6, 50)) * 3
    conf = base + rng.normal(size=base.shape) * 0.3
    forced = list(rng.integers(0, 50, size=7))
    served = _served_from_logits(conf, forced, list(range(6)), top_k=5)
    got = position_metrics(base, served)
    for r in range(6):
        ref = base[r] - math.log(sum(math.exp(v) for v in base[r]))
        own = conf[r].astype(np.float32)
        own_lp = own - np.float32(np.log(np.exp(own - own.max()).sum())) - own.max()
        top = sorted(range(50), key=lambda t: -own_lp[t])[:5]
        assert got[TOPK_DELTA][r] == pytest.approx(max(abs(float(own_lp[t]) - ref[t]) for t in top), abs=1e-5)
        assert got[ACTUAL_DELTA][r] == pytest.approx(float(own_lp[forced[r + 1]]) - ref[forced[r + 1]], abs=1e-5)
        flipped = int(np.argmax(base[r])) != top[0]
        assert (r in [f["position"] for f in got["flips"]]) == flipped
    for flip in got["flips"]:
        r = flip["position"]
        i, j = int(np.argmax(base[r])), flip["actual_token"]
        assert flip["flip_margin"] == pytest.approx(base[r, i] - base[r, j])
        deltas = [float(served.top_logprobs[r, k]) - (base[r, t] - math.log(np.exp(base[r]).sum()))
                  for k, t in enumerate(served.top_ids[r]) if t not in (i, j)]
        mean = sum(deltas) / len(deltas)
        assert flip["other_rms"] == pytest.approx(math.sqrt(sum((d - mean) ** 2 for d in deltas) / len(deltas)))


def _records(capture, transform=lambda logits: logits):
    """Each prompt's logprobs as an engine would serve them from ``transform(the capture's logits)``."""
    out = []
    for record in capture.prompts:
        logits = capture.arrays(record).array(LOGITS)
        rows = list(range(len(record.forced_ids) - 1))
        out.append((record.id, _served_from_logits(transform(logits)[rows], list(record.forced_ids), rows)))
    return out


@pytest.fixture(scope="module")
def member(stories, stories_reference, tmp_path_factory):
    from precision.backends import BackendOptions, create_backend
    from precision.capture.writer import CapturePlan, capture

    backend = create_backend("hf:cpu:bf16", stories, BackendOptions(variants=("attn:eager", "norm:fused", "mlp:fused", "split-k:512")))
    return capture(backend, CapturePlan.following(stories_reference), tmp_path_factory.mktemp("member") / "m", show_progress=False)


def _judged(baseline, records, truth, reference, members):
    document = compare_logprob_level(baseline, records, top_k=TOP_K, truth=truth, reference=reference, members=members,
                                     envelope_prompts=[r.id for r in reference.prompts], target_dtype="bfloat16")
    return document, judge_logprob_level(document)


def test_the_baselines_own_logprobs_pass_every_rule(stories_reference, stories_truth, member):
    document, verdict = _judged(stories_reference, _records(stories_reference), stories_truth, stories_reference, {"m": member})
    assert verdict.status is Status.PASS
    assert document["topk_max"] < 1e-5  # only vLLM-style float32 log_softmax against float64
    assert all(abs(p[R_TOPK] - 1.0) < 1e-3 for p in document["prompts"])
    assert not [f for p in document["prompts"] for f in p["flips"]]
    assert document["envelope"]["ratio"] < 1e-3


def test_the_fp32_truth_as_served_passes_closer_to_truth(stories_reference, stories_truth, member):
    """Another correct forward (FP32): R_topk < 1, its flips (if any) are near-ties, the envelope rule stays quiet."""
    document, verdict = _judged(stories_reference, _records(stories_truth), stories_truth, stories_reference, {"m": member})
    assert verdict.status is Status.PASS, verdict.summary
    assert all(p[R_TOPK] < 1.0 for p in document["prompts"])
    assert all(f["near_tie"] for p in document["prompts"] for f in p["flips"])


def test_logits_one_position_off_fail_by_flips_r_and_envelope(stories_reference, stories_truth, member):
    shifted = _records(stories_reference, lambda logits: np.roll(logits, -1, axis=0))
    document, verdict = _judged(stories_reference, shifted, stories_truth, stories_reference, {"m": member})
    assert verdict.status is Status.FAIL
    rules = {f.rule for p in verdict.prompts for f in p.findings} | {f.rule for f in verdict.findings}
    assert {"real-flip", "r-topk", "envelope"} <= rules
    assert all(p[R_TOPK] > 1.5 for p in document["prompts"])


class _StandIn:
    """The engine's answers for the fallback test: prompt_logprobs from the reference capture's logits."""

    def __init__(self, reference):
        self.logits = {tuple(r.forced_ids): reference.arrays(r).array(LOGITS) for r in reference.prompts}

    def output(self, token_ids: list[int]):
        logits = self.logits[tuple(token_ids)].astype(np.float32)
        lp = logits - logits.max(axis=1, keepdims=True)
        lp = lp - np.log(np.exp(lp).sum(axis=1, keepdims=True))
        entries = [None]
        for p in range(1, len(token_ids)):
            row = lp[p - 1]
            order = np.argsort(-row, kind="stable")
            chosen = {int(t): SimpleNamespace(logprob=float(row[t]), rank=k + 1) for k, t in enumerate(order[:TOP_K])}
            own = token_ids[p]
            chosen.setdefault(own, SimpleNamespace(logprob=float(row[own]), rank=int((row > row[own]).sum()) + 1))
            entries.append(chosen)
        return SimpleNamespace(prompt_logprobs=entries, request_id="0", num_cached_tokens=0)


def _stand_in_backend(monkeypatch, stories, reference, detail: str, hook_error: bool, workload: str = "alone"):
    from precision.serving import logprob_level

    calls = {"hooks": 0}
    engine = _StandIn(reference)

    def hook_capture(self, token_ids, selection, path):
        calls["hooks"] += 1
        if hook_error:
            raise NoHookLevelError("neither the decoder layers' hooks nor the outer model's forward saw every position (stand-in)")
        raise AssertionError("the stand-in has no hook level")

    monkeypatch.setattr(ServingBackend, "_capture_impl", hook_capture)
    monkeypatch.setattr(logprob_level.vllm_compat, "greedy_params", lambda **kw: kw)
    monkeypatch.setattr(logprob_level.vllm_compat, "rpc", lambda llm, method, *args: [{"num_aot_compiles": 0}])
    backend = LogprobLevelBackend(stories, ServingConfig.from_mapping("c", {"detail": detail, "workload": workload}))
    def activate():
        backend._counters_before, backend._kwargs, backend._llm = {}, {}, None

    monkeypatch.setattr(backend, "_activate_impl", activate)
    monkeypatch.setattr(backend, "_deactivate_impl", lambda: None)
    monkeypatch.setattr(backend, "_generate_impl", lambda ids, n: [])
    monkeypatch.setattr(backend, "_serve", lambda ids, params: (engine.output(ids), {"cached_tokens": 0}))
    monkeypatch.setattr(backend, "_describe_impl", lambda: {"engine": "vllm", "dtype": "bfloat16",
                                                           "serving": {**backend.serving.to_json(), "evidence": backend.evidence,
                                                                       "prompt_logprobs_top_k": backend.top_k}})
    return backend, calls


@pytest.mark.parametrize("detail, hook_error, reason", [("auto", True, FALLBACK), (DETAIL_PROMPT_LOGPROBS, False, FORCED)])
def test_capture_at_the_level_forced_or_as_the_fallback(monkeypatch, stories, stories_reference, stories_truth, tmp_path,
                                                       detail, hook_error, reason):
    from precision.capture.writer import CapturePlan, capture

    backend, calls = _stand_in_backend(monkeypatch, stories, stories_reference, detail, hook_error)
    served = capture(backend, CapturePlan.following(stories_reference), tmp_path / "served", show_progress=False)
    assert served_level(served) == DETAIL_PROMPT_LOGPROBS
    evidence = served.manifest["backend"]["serving"]["evidence"]
    assert all(e["why"].startswith(reason) for e in evidence)
    # Auto tries the hooks once; after the fallback every sequence is served at this level. Forced never tries them.
    assert calls["hooks"] == (1 if hook_error else 0)
    assert all(record.sites == [] for record in served.prompts)  # the tensor files hold the positions only
    document = compare_logprob_level(stories_reference, served_logprobs(served), top_k=TOP_K, truth=stories_truth)
    assert judge_logprob_level(document).status is Status.PASS and document["topk_max"] < 1e-5


def test_a_fallback_after_a_hook_level_capture_is_refused(monkeypatch, stories, stories_reference):
    from precision.capture.sites import CaptureSelection
    from precision.errors import BackendError

    backend, _ = _stand_in_backend(monkeypatch, stories, stories_reference, "auto", True)
    backend.evidence.append({"level": "layers"})  # an earlier sequence reached the decoder layers' hooks
    with pytest.raises(BackendError, match="compared alike"):
        backend._capture_impl(list(stories_reference.prompts[0].forced_ids), CaptureSelection(), None)


def test_the_parity_report_names_the_level_and_why(monkeypatch, stories, stories_reference, stories_truth, member, tmp_path):
    from precision.capture.writer import CapturePlan, capture
    from precision.serving.logprob_level import logprob_row
    from precision.serving.report import write_parity_report

    backend, _ = _stand_in_backend(monkeypatch, stories, stories_reference, DETAIL_PROMPT_LOGPROBS, False)
    served = capture(backend, CapturePlan.following(stories_reference), tmp_path / "served", show_progress=False)
    document, verdict = _judged(stories_reference, served_logprobs(served), stories_truth, stories_reference, {"m": member})
    row = logprob_row(backend.serving, served, document, verdict)
    parity = {"status": verdict.status.value, "model": "m", "prompts": "p", "scale": "s", "configurations": [row], "wall_seconds": 1.0}
    (tmp_path / "report").mkdir()
    paths = write_parity_report(tmp_path / "report", parity)
    markdown = paths["summary.md"].read_text(encoding="utf-8")
    assert "| c |" in markdown and "prompt-logprobs (forced by the configuration" in markdown
    assert "n/a (logprobs only)" in markdown and f"over the top {TOP_K}" in markdown
    assert "R_topk" in markdown and "The prompt-logprobs level's metrics" in markdown
    html = paths["report.html"].read_text(encoding="utf-8")
    assert "n/a (logprobs only)" in html and "forced by the configuration" in html


def test_a_workload_this_level_does_not_serve_is_refused_not_served_alone(monkeypatch, stories, stories_reference):
    from precision.errors import BackendError

    backend, _ = _stand_in_backend(monkeypatch, stories, stories_reference, DETAIL_PROMPT_LOGPROBS, False)
    backend._check_workload()  # "alone" is served
    object.__setattr__(backend.serving, "workload", "a-workload-of-the-future")
    with pytest.raises(BackendError, match="not served at the prompt-logprobs level"):
        backend._check_workload()


def test_a_warm_prefix_workload_at_this_level_says_the_cache_was_not_read(monkeypatch, stories, stories_reference, tmp_path):
    from precision.capture.writer import CapturePlan, capture
    from precision.serving.logprob_level import evidence_summary

    backend, _ = _stand_in_backend(monkeypatch, stories, stories_reference, DETAIL_PROMPT_LOGPROBS, False, workload="warm-prefix")
    served = capture(backend, CapturePlan.following(stories_reference), tmp_path / "served", show_progress=False)
    why = evidence_summary(served)["why"]
    assert "reads no prefix cache" in why and "cached tokens reported: [0, 0]" in why
