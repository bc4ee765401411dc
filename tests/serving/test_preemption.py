"""The preempt workload without an engine: the worker's recompute bookkeeping on fake steps (the real hooks, fed
step layouts and tensors), the scheduler model that plans the workload, and the evidence summary."""

from __future__ import annotations

import pytest
import torch

from precision.backends import vllm_compat
from precision.names import EMBED, layer_site
from precision.serving import preemption
from precision.serving.engine import ServingBackend, ServingConfig
from precision.serving.worker import OUTER, ServingWorkerExtension

SEQUENCE = list(range(100, 110))
HIDDEN = 4


class FakeSteps:
    """Drives a ServingWorkerExtension's hooks the way a forward step does: ``step(rows)`` with rows
    [(request id, prompt, positions, values)], each value a float filling that position's row."""

    def __init__(self, monkeypatch):
        self.worker = ServingWorkerExtension()
        self.worker._parity_reset(SEQUENCE, None)
        self.worker._parity_armed = True
        self.worker._parity_counters_before = {}
        self.layout: list = []
        monkeypatch.setattr(vllm_compat, "step_request_rows", lambda _worker: self.layout)
        self.layer_hook = self.worker._parity_hook(layer_site(0), vllm_compat.layer_residual_stream, 0)
        self.embed_hook = self.worker._parity_hook(EMBED, lambda out: out, None)

    def step(self, rows) -> None:
        self.layout, positions, values, start = [], [], [], 0
        for req_id, prompt, step_positions, step_values in rows:
            self.layout.append((req_id, prompt, start, start + len(step_positions)))
            start += len(step_positions)
            positions += step_positions
            values += step_values
        positions_tensor = torch.tensor(positions)
        hidden = torch.tensor([[v] * HIDDEN for v in values], dtype=torch.bfloat16)
        self.embed_hook(None, (), hidden)
        self.layer_hook(None, (positions_tensor, hidden), (hidden, torch.zeros_like(hidden)))
        self.worker._parity_outer_hook(None, (None, positions_tensor), {}, hidden)

    def recomputation(self) -> dict:
        return self.worker._parity_recomputation()


def test_a_restarted_request_is_counted_and_its_last_computation_kept(monkeypatch):
    fake = FakeSteps(monkeypatch)
    fake.step([("seq", SEQUENCE, [0, 1, 2, 3], [1.0, 2.0, 3.0, 4.0])])
    fake.step([("seq", SEQUENCE, [4, 5, 6], [5.0, 6.0, 7.0])])
    # Preempted, then readmitted: vLLM computes it again from position 0; position 5 comes out differently.
    fake.step([("seq", SEQUENCE, [0, 1, 2, 3, 4, 5], [1.0, 2.0, 3.0, 4.0, 5.0, 6.5])])
    fake.step([("seq", SEQUENCE, [6, 7, 8, 9], [7.0, 8.0, 9.0, 10.0])])
    found = fake.recomputation()
    assert found["restarts"] == 1
    assert found["positions"] == 7 and found["recomputed_positions"] == list(range(7))  # 0..6 were computed twice
    assert found["rows"] == {EMBED: 7, layer_site(0): 7, OUTER: 7}
    assert found["bitwise_equal"] == {EMBED: False, layer_site(0): False, OUTER: False}
    assert found["max_abs_difference"][layer_site(0)] == 0.5
    kept = fake.worker._parity_rows[layer_site(0)]
    assert sorted(kept) == list(range(10)) and kept[5][0].item() == 6.5  # the last computation, the output's own


def test_a_bitwise_recomputation_is_reported_equal(monkeypatch):
    fake = FakeSteps(monkeypatch)
    fake.step([("seq", SEQUENCE, [0, 1, 2], [1.0, 2.0, 3.0])])
    fake.step([("seq", SEQUENCE, list(range(10)), [float(p + 1) for p in range(10)])])
    found = fake.recomputation()
    assert found["restarts"] == 1 and found["positions"] == 3
    assert all(found["bitwise_equal"].values()) and set(found["max_abs_difference"].values()) == {0.0}


def test_chunked_prefill_and_decode_steps_are_no_restart(monkeypatch):
    fake = FakeSteps(monkeypatch)
    fake.step([("other", [7, 7], [0, 1], [9.0, 9.0]), ("seq", SEQUENCE, [0, 1, 2, 3, 4], [1.0, 2.0, 3.0, 4.0, 5.0])])
    fake.step([("other", [7, 7], [2], [9.0]), ("seq", SEQUENCE, [5, 6, 7, 8, 9], [6.0, 7.0, 8.0, 9.0, 10.0])])
    fake.step([("seq", SEQUENCE, [10], [11.0])])  # a decode step: the engine's own token, not stored
    found = fake.recomputation()
    assert found == {"positions": 0, "restarts": 0, "recomputed_positions": [], "rows": {}, "bitwise_equal": {}, "max_abs_difference": {}}
    assert sorted(fake.worker._parity_rows[OUTER]) == list(range(10))


def test_a_second_request_recomputing_a_position_is_recomputation_without_restart(monkeypatch):
    fake = FakeSteps(monkeypatch)
    fake.step([("cold", SEQUENCE, list(range(10)), [float(p) for p in range(10)])])
    fake.step([("warm", SEQUENCE, [8, 9], [8.0, 9.0])])  # warm-prefix: the tail of the last block computed again
    found = fake.recomputation()
    assert found["restarts"] == 0 and found["positions"] == 2 and all(found["bitwise_equal"].values())


# -- the plan ----------------------------------------------------------------------------------------------------
def test_the_plan_sizes_the_cache_for_one_sequence_and_its_companion_and_predicts_a_preemption():
    plan = preemption.plan_preemption([24, 38], max_model_len=39, block_size=32, max_position=512)
    assert plan.pool == 3 and plan.max_model_len == 96
    for length, companion in plan.companions.items():
        # The companion's prompt takes every block the sequence's prompt leaves: the sequence is admitted, just.
        assert -(-companion.prompt_length // 32) == plan.pool - -(-length // 32)
        assert companion.predicted_positions_before_preemption is not None
        assert 0 < companion.predicted_positions_before_preemption < length
    settings = plan.engine_settings()
    assert settings["num_gpu_blocks_override"] == plan.pool + 1 and settings["disable_log_stats"] is False


def test_the_scheduler_model_preempts_only_when_the_cache_is_short():
    # The companion (63 prompt tokens, 32 new) and the sequence (24) on 3 blocks: the companion's decode needs a
    # fourth block while the sequence is in flight.
    assert preemption.simulate(63, 32, 24, pool=3, budget=17, block_size=32) == 21
    # One block more and both fit: the sequence finishes, never preempted.
    assert preemption.simulate(63, 32, 24, pool=4, budget=17, block_size=32) is None
    # A budget that prefills the sequence in the step it is admitted leaves no step to preempt it in.
    assert preemption.simulate(63, 32, 24, pool=3, budget=200, block_size=32) is None


def test_companion_tokens_are_never_a_prefix_of_the_sequence():
    sequence = [5, 6, 7, 8]
    tokens = preemption.companion_tokens(sequence, [sequence, [5, 6]], 3)
    assert len(tokens) == 3 and tokens != sequence[:3]
    assert preemption.companion_tokens(sequence, [sequence], 2) != sequence[:2]


# -- the backend's settings and the evidence --------------------------------------------------------------------
@pytest.fixture
def no_vllm_names(monkeypatch):
    monkeypatch.setattr(vllm_compat, "engine_arg_names", lambda: None)


def test_the_preempt_workload_sets_its_engine_defaults_and_the_configuration_overrides_them(stories, no_vllm_names):
    from precision.backends.base import BackendOptions

    sequences = [[1] * 24, [2] * 38]
    served = ServingBackend(stories, ServingConfig.from_mapping("p", {"workload": "preempt"}), BackendOptions(max_model_len=39), companions=sequences)
    kwargs = served.engine_kwargs()
    assert kwargs["num_gpu_blocks_override"] == 4 and kwargs["block_size"] == 32 and kwargs["max_num_seqs"] == 2
    assert kwargs["enable_chunked_prefill"] is True and kwargs["max_model_len"] == 96 and kwargs["enforce_eager"] is True
    larger = ServingBackend(stories, ServingConfig.from_mapping("p", {"workload": "preempt", "block_size": 64}),
                            BackendOptions(max_model_len=39), companions=sequences)
    assert larger.engine_kwargs()["block_size"] == 64 and larger.preemption_plan().block_size == 64
    assert ServingBackend(stories, ServingConfig.from_mapping("a", {}), BackendOptions(max_model_len=39)).engine_kwargs().get("num_gpu_blocks_override") is None


def test_companions_are_refused_with_the_preempt_workload():
    from precision.errors import PrecisionError

    with pytest.raises(PrecisionError, match="one companion"):
        ServingConfig.from_mapping("p", {"workload": "preempt", "companions": 3})
    assert ServingConfig.from_mapping("p", {"workload": "preempt"}).workload == "preempt"


def test_the_summary_reports_preemptions_and_the_recomputation_both_ways():
    equal = {"positions": 21, "restarts": 1, "rows": {"layer.0": 21}, "bitwise_equal": {"layer.0": True}, "max_abs_difference": {"layer.0": 0.0}}
    differs = {**equal, "bitwise_equal": {"layer.0": False}, "max_abs_difference": {"layer.0": 0.25}}
    summary = preemption.summarize([{"recomputation": equal, "engine_preemptions": 1}, {"recomputation": equal, "engine_preemptions": 2}])
    assert summary["engine_preemptions"] == [1, 2] and summary["recomputation_bitwise_equal"] is True
    assert "3 preemption(s)" in preemption.sentence(summary) and "bitwise equal" in preemption.sentence(summary)
    summary = preemption.summarize([{"recomputation": differs, "engine_preemptions": 1}])
    assert summary["recomputation_bitwise_equal"] is False and summary["sites_recomputed_differently"] == ["layer.0"]
    assert "different from the first computation at layer.0" in preemption.sentence(summary)
    assert preemption.summarize([{"calls": {}}]) is None


class WithEvidence:
    """A real capture as a served one whose worker recorded ``recomputed`` positions for each prompt."""

    def __init__(self, capture, recomputed):
        self._capture, self.prompts = capture, capture.prompts
        evidence = [{"positions_from_earlier_requests": [], "recomputation": {"recomputed_positions": recomputed}} for _ in capture.prompts]
        self.manifest = {**capture.manifest, "backend": {**capture.manifest["backend"], "serving": {"evidence": evidence}}}

    def arrays(self, record):
        return self._capture.arrays(record)


def test_invariance_compares_recomputed_positions_apart_both_ways(stories_reference, stories_truth):
    from precision.serving.invariance import site_invariance

    same = site_invariance(stories_reference, WithEvidence(stories_reference, [0, 1, 2]))
    first = same["sites"][0]
    assert first["recomputed"]["rows"] == 3 * len(stories_reference.prompts) and first["recomputed"]["bitwise_identical"]
    assert first["computed_once"]["rows"] == first["all"]["rows"] - first["recomputed"]["rows"]
    other = site_invariance(stories_reference, WithEvidence(stories_truth, [0, 1, 2]))
    assert not other["sites"][0]["recomputed"]["bitwise_identical"] and other["sites"][0]["recomputed"]["relative_l2"] > 0
    assert "recomputed" not in site_invariance(stories_reference, WithEvidence(stories_reference, []))["sites"][0]
