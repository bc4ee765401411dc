"""The vLLM backend's driver side on Ascend terms: settings refused before the engine starts, start-up errors of any
type turned into one line, the CPU-only environment defaults and the teardown between engines. The engine is a
fake LLM class here (no NPU is reachable); the real vLLM CPU engine runs in test_ascend_preflight.py."""

from __future__ import annotations

import os

import pytest

from precision.backends import BackendOptions, create_backend, vllm as vllm_backend, vllm_compat, vllm_preflight
from precision.backends.ascend_settings import refuse_capture_breaking_settings
from precision.errors import BackendError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

REFUSED_ENGINE_ARGS = [
    ({"additional_config": {"xlite_graph_config": {"enabled": True}}}, "xlite_graph_config.enabled", "xlite"),
    ({"additional_config": {"torchair_graph_config": {"enabled": True}}}, "torchair_graph_config.enabled", "v0.11 and earlier"),
    ({"additional_config": {"enable_flashcomm1": True}}, "enable_flashcomm1", "v0.23"),
    ({"additional_config": {"finegrained_tp_config": {"lmhead_tensor_parallel_size": 2}}}, "lmhead_tensor_parallel_size", "rows"),
    ({"additional_config": {"enable_reduce_sample": True}}, "enable_reduce_sample", "vocabulary shard"),
    ({"additional_config": {"dump_config": {"level": "L1"}}}, "dump_config", "msprobe"),
    ({"additional_config": {"dump_config_path": "/tmp/dump.json"}}, "dump_config_path", "msprobe"),
    ({"additional_config": {"profiling_chunk_config": {"enabled": True}}}, "profiling_chunk_config.enabled", "chunks"),
    ({"additional_config": '{"enable_reduce_sample": true}'}, "enable_reduce_sample", "vocabulary shard"),
    ({"pipeline_parallel_size": 2}, "pipeline_parallel_size", "tensor_parallel_size"),
    ({"data_parallel_size": 2}, "data_parallel_size", "--shard"),
    ({"compilation_config": 3}, "compilation_config", "enforce_eager=True"),
    ({"compilation_config": {"mode": "VLLM_COMPILE"}}, "compilation_config", "graph"),
    ({"compilation_config": {"level": 3}}, "compilation_config", "graph"),
    ({"compilation_config": {"cudagraph_mode": "FULL_AND_PIECEWISE"}}, "cudagraph_mode", "graph"),
    ({"compilation_config": {"cudagraph_mode": "PIECEWISE"}}, "cudagraph_mode", "graph"),
    ({"compilation_config": {"cudagraph_capture_sizes": [1, 2, 4]}}, "cudagraph_capture_sizes", "graph"),
    ({"compilation_config": '{"mode": 3}'}, "compilation_config", "graph"),
]


@pytest.mark.parametrize("engine_args, setting, hint", REFUSED_ENGINE_ARGS, ids=[r[1] + "-" + str(i) for i, r in enumerate(REFUSED_ENGINE_ARGS)])
def test_settings_that_break_a_capture_are_refused_before_the_engine(stories, engine_args, setting, hint):
    backend = create_backend("vllm", stories, BackendOptions(engine_args=engine_args))
    with pytest.raises(BackendError, match="cannot be captured") as raised:
        backend.validate()
    message = str(raised.value)
    assert setting in message and hint in message
    assert "\n" not in message


REFUSED_ENVIRONMENT = [
    ("VLLM_USE_V2_MODEL_RUNNER", "1", "V2 runner"),
    ("VLLM_ASCEND_ENABLE_FLASHCOMM1", "1", "v0.11 to v0.23"),
    ("VLLM_ASCEND_ENABLE_FLASHCOMM", "true", "v0.9.1"),
    ("VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE", "2", "FlashComm2"),
    ("VLLM_ASCEND_ENABLE_FLASHCOMM3", "1", "FlashComm"),  # a later release's name: caught by the FlashComm rule
]


@pytest.mark.parametrize("name, value, hint", REFUSED_ENVIRONMENT, ids=[r[0] for r in REFUSED_ENVIRONMENT])
def test_environment_variables_that_break_a_capture_are_refused(stories, monkeypatch, name, value, hint):
    monkeypatch.setenv(name, value)
    backend = create_backend("vllm", stories)
    with pytest.raises(BackendError, match=f"environment {name}.*cannot be captured.*{hint}.*unset it"):
        backend.validate()


@pytest.mark.parametrize("engine_args, environ", [
    ({"additional_config": {"xlite_graph_config": {"enabled": False}, "torchair_graph_config": {"enabled": False},
                            "enable_flashcomm1": False, "enable_reduce_sample": False, "dump_config": None,
                            "finegrained_tp_config": {"lmhead_tensor_parallel_size": 1}}}, {}),
    ({"pipeline_parallel_size": 1, "data_parallel_size": 1, "tensor_parallel_size": 2}, {}),
    ({"compilation_config": {"mode": "NONE", "cudagraph_mode": "NONE"}}, {}),
    ({"compilation_config": 0}, {}),
    ({}, {"VLLM_USE_V2_MODEL_RUNNER": "0", "VLLM_ASCEND_ENABLE_FLASHCOMM1": "0", "VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE": "0"}),
], ids=["ascend-keys-off", "tensor-parallel", "compilation-none", "compilation-level-0", "variables-off"])
def test_the_same_settings_switched_off_pass(engine_args, environ):
    refuse_capture_breaking_settings(engine_args, environ)


def test_ascend_scheduler_config_is_warned_as_ignored_from_v013(caplog):
    refuse_capture_breaking_settings({"additional_config": {"ascend_scheduler_config": {"enabled": True}}}, {})
    assert any("ascend_scheduler_config is ignored by vllm-ascend v0.13" in r.getMessage() for r in caplog.records)


# -- the engine lifecycle with a fake LLM ---------------------------------------------------------------------------
class FakeCore:
    def __init__(self, calls):
        self.calls = calls

    def shutdown(self):
        self.calls.append("shutdown")


class FakeEngine:
    def __init__(self, calls):
        self.engine_core = FakeCore(calls)


def eager_record(**engine):
    return {"rank": 0, "engine": {"worker_class": "NPUWorker", "model_runner_class": "NPUModelRunner", "compilation_mode": "NONE",
                                  "cudagraph_mode": "NONE", "enforce_eager": True, "use_aclgraph": False, **engine},
            "modules": {}, "environment": {}, "fingerprint": {}}


@pytest.fixture
def fake_vllm(monkeypatch, stories):
    """A fake LLM class on a chosen platform; returns (set_up(device, record, error), calls, environment seen at start)."""
    calls: list[str] = []
    seen: dict[str, str | None] = {}
    state = {"record": eager_record(), "error": None}

    class FakeLLM:
        def __init__(self, **kwargs):
            seen.update({k: os.environ.get(k) for k in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE")})
            if state["error"] is not None:
                raise state["error"]
            calls.append("start")
            self.llm_engine = FakeEngine(calls)

        def collective_rpc(self, method, args=()):
            calls.append(method)
            return {"precision_preflight": [state["record"]],
                    "precision_install_hooks": [{"num_layers": stories.num_layers, "model_class": "LlamaForCausalLM"}]}.get(method, [True])

    for name in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(vllm_compat, "llm_class", lambda: FakeLLM)
    monkeypatch.setattr(vllm_compat, "engine_arg_names", lambda: None)
    monkeypatch.setattr(vllm_backend.VllmBackend, "_loadable_model", lambda self: (self.model.path, None))
    monkeypatch.setattr(vllm_backend, "platform_record", lambda device: {"device": device})
    monkeypatch.setattr(vllm_preflight, "cleanup_distributed", lambda: calls.append("cleanup_dist_env_and_memory") or True)
    monkeypatch.setattr(vllm_preflight, "clear_ascend_config", lambda: calls.append("clear_ascend_config") or True)

    def set_up(device, record=None, error=None):
        monkeypatch.setattr(vllm_backend, "device_type", lambda: device)
        state["record"] = record or eager_record()
        state["error"] = error

    return set_up, calls, seen


def test_startup_error_of_any_type_becomes_one_line_naming_the_settings(fake_vllm, stories):
    set_up, _calls, _seen = fake_vllm
    set_up("npu", error=RuntimeError("torchair graph mode requires enforce_eager to be False\nsecond line of the traceback"))
    backend = create_backend("vllm", stories, BackendOptions(engine_args={"additional_config": {"refresh": True}}))
    with pytest.raises(BackendError) as raised:
        backend.activate()
    message = str(raised.value)
    assert "\n" not in message
    assert "RuntimeError: torchair graph mode requires enforce_eager to be False" in message
    assert "'additional_config': {'refresh': True}" in message and "'enforce_eager': True" in message
    assert "traceback in" in message and "second line" not in message
    assert not backend.is_active


def test_startup_error_exits_2_through_the_cli(fake_vllm, stories_path, short_prompts, tmp_path, capsys):
    from precision.cli import main

    set_up, _calls, _seen = fake_vllm
    set_up("npu", error=KeyError("max_num_seqs"))
    code = main(["-q", "capture", "--backend", "vllm", "--model", str(stories_path), "--prompts", str(short_prompts),
                 "--out", str(tmp_path / "c"), "--max-new-tokens", "2"])
    assert code == 2
    err = capsys.readouterr().err
    assert "vLLM could not start the engine" in err and "KeyError" in err and "Traceback" not in err


def test_cpu_defaults_are_set_only_on_cpu_and_removed_after(fake_vllm, stories):
    set_up, _calls, seen = fake_vllm
    set_up("cpu")
    backend = create_backend("vllm", stories)
    with backend:
        assert os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
        assert backend.describe()["environment_defaults"] == {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1",
                                                              "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    assert seen == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1"}
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ and "VLLM_CPU_KVCACHE_SPACE" not in os.environ


@pytest.mark.parametrize("device", ["npu", "cuda"])
def test_no_cpu_defaults_on_an_accelerator(fake_vllm, stories, device):
    set_up, _calls, seen = fake_vllm
    set_up(device)
    backend = create_backend("vllm", stories)
    with backend:
        description = backend.describe()
        assert description["environment_defaults"] == {}
        assert description["worker"]["engine"]["worker_class"] == "NPUWorker"
    assert seen == {"VLLM_ENABLE_V1_MULTIPROCESSING": None, "VLLM_CPU_OMP_THREADS_BIND": None, "VLLM_CPU_KVCACHE_SPACE": None}


def test_a_user_setting_is_kept_on_cpu(fake_vllm, stories, monkeypatch):
    set_up, _calls, seen = fake_vllm
    set_up("cpu")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    with create_backend("vllm", stories) as backend:
        assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in backend.describe()["environment_defaults"]
    assert seen["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1" and os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"


def test_teardown_on_ascend_clears_the_ascend_config_and_the_distributed_state(fake_vllm, stories):
    set_up, calls, _seen = fake_vllm
    set_up("npu")
    backend = create_backend("vllm", stories)
    with backend:
        pass
    assert calls[-4:] == ["precision_remove_hooks", "shutdown", "cleanup_dist_env_and_memory", "clear_ascend_config"]
    assert backend._teardown == {"cleanup_dist_env_and_memory": True, "clear_ascend_config": True, "shared_memory_removed": []}


def test_teardown_on_cpu_cleans_the_distributed_state_only(fake_vllm, stories):
    set_up, calls, _seen = fake_vllm
    set_up("cpu")
    with create_backend("vllm", stories):
        pass
    assert "cleanup_dist_env_and_memory" in calls and "clear_ascend_config" not in calls


@pytest.mark.parametrize("engine, reason", [
    ({"cudagraph_mode": "FULL_AND_PIECEWISE"}, "cudagraph_mode=FULL_AND_PIECEWISE"),
    ({"compilation_mode": "VLLM_COMPILE"}, "compilation_mode=VLLM_COMPILE"),
    ({"use_aclgraph": True}, "use_aclgraph=True"),
    ({"enforce_eager": False}, "enforce_eager=False"),
    ({"torchair_graph_enabled": True}, "torchair_graph_enabled=True"),
    ({"xlite_graph_enabled": True}, "xlite_graph_enabled=True"),
    ({"worker_class": "XliteWorker"}, "worker XliteWorker"),
    ({"runner_model_class": "ACLGraphWrapper"}, "ACLGraphWrapper"),
])
def test_a_worker_running_a_graph_refuses_the_capture_and_shuts_the_engine_down(fake_vllm, stories, engine, reason):
    set_up, calls, _seen = fake_vllm
    set_up("npu", record=eager_record(**engine))
    backend = create_backend("vllm", stories)
    with pytest.raises(BackendError, match="compiled or captured graph") as raised:
        backend.activate()
    assert reason in str(raised.value)
    assert "precision_install_hooks" not in calls and "shutdown" in calls and "clear_ascend_config" in calls
    assert not backend.is_active


def test_an_eager_worker_starts(fake_vllm, stories):
    set_up, calls, _seen = fake_vllm
    set_up("npu")
    with create_backend("vllm", stories) as backend:
        assert backend.preflight["engine"]["enforce_eager"] is True
    assert calls[:3] == ["start", "precision_preflight", "precision_install_hooks"]
