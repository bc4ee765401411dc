"""The worker-side preflight and fingerprint (precision.backends.vllm_preflight).

Fake torch_npu / vllm_ascend modules (types.ModuleType in sys.modules, as vllm-ascend's own unit tests do) stand in
for an Ascend host: a complete one, one whose torch_npu lacks every attribute, one whose get_cann_version raises.
The graph decision is checked on vLLM's real configuration objects (an eager and a compiled one, built by vLLM's
EngineArgs for stories260K without starting an engine) and on the real vLLM CPU engine's preflight."""

from __future__ import annotations

import json
import sys
import types
from unittest import mock

import pytest
import torch

from precision.backends import vllm_preflight
from precision.backends.vllm_preflight import fingerprint, graph_mode_reasons, preflight_record, soc_family
from tests.conftest import requires_vllm


def fake_module(monkeypatch, name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    for key, value in attributes.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)
    return module


@pytest.fixture
def ascend_host(monkeypatch, tmp_path):
    """A complete fake Ascend host: torch_npu 2.9 on an A3 (SoC 253), vllm-ascend with its build info, custom ops
    and an Ascend config; torch.npu with HF32 switches."""
    cann = {"CANN": "8.3.RC1", "RUNTIME": "8.3.RC1.b1", "HCCL": "8.3.RC1.h1", "OPP_KERNEL": "8.3.RC1.k1", "DRIVER": "25.2.0"}
    torch_npu = fake_module(monkeypatch, "torch_npu", __version__="2.9.0.post1")
    torch_npu.version = types.SimpleNamespace(git_version="abc123")
    torch_npu.utils = types.SimpleNamespace(get_cann_version=lambda module: cann[module])
    torch_npu.npu = types.SimpleNamespace(get_soc_version=lambda: 253)
    npu = types.SimpleNamespace(get_device_name=lambda: "Ascend910_9392", matmul=types.SimpleNamespace(allow_hf32=False),
                                conv=types.SimpleNamespace(allow_hf32=True))
    monkeypatch.setattr(torch, "npu", npu, raising=False)
    fake_module(monkeypatch, "vllm_ascend", __version__="0.23.0")
    fake_module(monkeypatch, "vllm_ascend._build_info", __device_type__="A3")
    fake_module(monkeypatch, "vllm_ascend.utils", enable_custom_op=lambda: True)
    config = types.SimpleNamespace(torchair_graph_config=types.SimpleNamespace(enabled=False),
                                   xlite_graph_config=types.SimpleNamespace(enabled=False), weight_nz_mode=0,
                                   enable_flashcomm1=False, vllm_config=object())
    clear = mock.Mock()
    fake_module(monkeypatch, "vllm_ascend.ascend_config", get_ascend_config=lambda: config, clear_ascend_config=clear)
    return {"config": config, "clear": clear}


def test_fingerprint_on_a_complete_ascend_host(ascend_host):
    record = fingerprint({})
    assert record["vllm_ascend_build_device_type"] == "A3"
    assert record["torch_npu"] == "2.9.0.post1" and record["torch_npu_git"] == "abc123"
    assert record["cann"]["versions"] == {"CANN": "8.3.RC1", "RUNTIME": "8.3.RC1.b1", "HCCL": "8.3.RC1.h1", "OPP_KERNEL": "8.3.RC1.k1", "DRIVER": "25.2.0"}
    assert set(record["cann"]["sources"].values()) == {"torch_npu.utils.get_cann_version"}
    assert record["soc_version"] == 253 and record["chip_family"] == "A3"
    assert record["device_name"] == "Ascend910_9392"
    assert record["allow_hf32_matmul"] is False and record["allow_hf32_conv"] is True
    assert record["custom_ops_available"] is True
    assert record["deterministic_algorithms"] is False
    json.dumps(record)


def test_fingerprint_with_every_attribute_missing_is_null_not_an_error(monkeypatch):
    fake_module(monkeypatch, "torch_npu")  # an old torch_npu: a module with nothing in it
    fake_module(monkeypatch, "vllm_ascend")
    monkeypatch.setattr(torch, "npu", types.SimpleNamespace(), raising=False)
    record = fingerprint({})
    for key in ("vllm_ascend_build_device_type", "torch_npu", "torch_npu_git", "soc_version", "chip_family", "device_name",
                "allow_hf32_matmul", "allow_hf32_conv", "custom_ops_available"):
        assert record[key] is None, key
    assert set(record["cann"]["versions"].values()) == {None} and record["cann"]["sources"] == {}


def test_cann_versions_fall_back_to_the_toolkit_install_info(monkeypatch, tmp_path):
    import platform

    def raising(module):
        raise RuntimeError("get_cann_version needs torch_npu >= 2.5")

    torch_npu = fake_module(monkeypatch, "torch_npu", __version__="2.1.0")
    torch_npu.utils = types.SimpleNamespace(get_cann_version=raising)
    info = tmp_path / f"{platform.machine()}-linux" / "ascend_toolkit_install.info"
    info.parent.mkdir()
    info.write_text("package_name=Ascend-cann-toolkit\nversion=8.0.RC3\ninnerversion=V100R001C19SPC002B261\n")
    cann = vllm_preflight.cann_versions(torch_npu, {"ASCEND_HOME_PATH": str(tmp_path)})
    assert cann["versions"]["CANN"] == "8.0.RC3" and cann["sources"]["CANN"] == str(info)
    assert cann["versions"]["RUNTIME"] is None and "RUNTIME" not in cann["sources"]


def test_no_torch_npu_no_ascend_fields(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # import torch_npu raises ImportError
    record = fingerprint({})
    assert record["torch_npu"] is None and record["cann"] is None and record["soc_version"] is None


@pytest.mark.parametrize("soc, family", [(220, "A2"), (223, "A2"), (225, "A2"), (250, "A3"), (255, "A3"), (200, "310P"),
                                         (205, "310P"), (260, "A5"), (226, None), (256, None), (100, None), (None, None), ("x", None)])
def test_soc_version_to_chip_family(soc, family):
    assert soc_family(soc) == family


# -- the record of a worker and the graph decision ----------------------------------------------------------------
class NPUWorker:
    def __init__(self, runner, config, rank=0):
        self.model_runner, self.vllm_config, self.rank = runner, config, rank


class NPUModelRunner:
    def __init__(self, model, use_aclgraph):
        self.model, self.use_aclgraph = model, use_aclgraph

    def get_model(self):
        return self.model


class ACLGraphWrapper:
    pass


def ascend_worker(use_aclgraph=False, model=None, cudagraph_mode="NONE", mode="NONE", enforce_eager=True):
    config = types.SimpleNamespace(compilation_config=types.SimpleNamespace(mode=mode, cudagraph_mode=cudagraph_mode),
                                   model_config=types.SimpleNamespace(enforce_eager=enforce_eager))
    return NPUWorker(NPUModelRunner(model if model is not None else types.SimpleNamespace(), use_aclgraph), config)


def test_worker_record_reads_the_ascend_config_and_the_worker_environment(ascend_host, monkeypatch):
    monkeypatch.setenv("HCCL_DETERMINISTIC", "strict")
    monkeypatch.setenv("PYTORCH_NPU_ALLOC_CONF", "expandable_segments:True")
    record = preflight_record(ascend_worker())
    assert record["engine"]["worker_class"] == "NPUWorker" and record["engine"]["model_runner_class"] == "NPUModelRunner"
    assert record["engine"]["torchair_graph_enabled"] is False and record["engine"]["xlite_graph_enabled"] is False
    assert record["ascend_config"]["weight_nz_mode"] == 0 and "vllm_config" not in record["ascend_config"]
    assert record["environment"]["HCCL_DETERMINISTIC"] == "strict" and record["environment"]["LCCL_DETERMINISTIC"] is None
    assert record["environment"]["PYTORCH_NPU_ALLOC_CONF"] == "expandable_segments:True"
    assert record["fingerprint"]["chip_family"] == "A3"
    assert graph_mode_reasons(record) == []
    assert type(record["fingerprint"]["torch"]) is str  # not torch's TorchVersion: vLLM's msgspec RPC refuses str subclasses
    assert json.loads(json.dumps(record)) == record


@pytest.mark.parametrize("worker, reason", [
    (lambda: ascend_worker(use_aclgraph=True), "use_aclgraph=True"),
    (lambda: ascend_worker(model=ACLGraphWrapper()), "ACLGraphWrapper"),
    (lambda: ascend_worker(cudagraph_mode="PIECEWISE"), "cudagraph_mode=PIECEWISE"),
    (lambda: ascend_worker(mode="VLLM_COMPILE"), "compilation_mode=VLLM_COMPILE"),
    (lambda: ascend_worker(enforce_eager=False), "enforce_eager=False"),
])
def test_graph_decision_on_an_ascend_worker(ascend_host, worker, reason):
    assert reason in " ".join(graph_mode_reasons(preflight_record(worker())))


def test_graph_decision_reads_the_torchair_and_xlite_switches(ascend_host):
    ascend_host["config"].xlite_graph_config.enabled = True
    assert "xlite_graph_enabled=True" in graph_mode_reasons(preflight_record(ascend_worker()))


def test_a_worker_with_nothing_readable_still_answers():
    record = preflight_record(object())
    assert record["engine"]["model_runner_class"] is None and record["modules"] is None and record["rank"] is None
    assert graph_mode_reasons(record) == []


def test_teardown_helpers_call_vllm_ascend_where_it_exists(ascend_host):
    assert vllm_preflight.clear_ascend_config() is True
    ascend_host["clear"].assert_called_once_with()


def test_teardown_helpers_without_vllm_ascend(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm_ascend", None)
    monkeypatch.setitem(sys.modules, "vllm_ascend.ascend_config", None)
    assert vllm_preflight.clear_ascend_config() is False


# -- real vLLM ------------------------------------------------------------------------------------------------------
@requires_vllm
@pytest.mark.vllm
@pytest.mark.parametrize("enforce_eager, graph", [(True, False), (False, True)])
def test_graph_decision_on_vllms_real_configuration(stories_path, enforce_eager, graph):
    """vLLM's own EngineArgs build the configuration the worker would hold: the eager one passes, the compiled one
    (what enforce_eager=False gives on this CPU build) is refused."""
    from vllm.engine.arg_utils import EngineArgs  # only to build the real configuration object

    from precision.backends.head_padding import pad_heads
    from precision.default_model import cache_root
    from precision.model import inspect_model

    path = pad_heads(inspect_model(stories_path), 32, cache_root() / "models")
    config = EngineArgs(model=str(path), enforce_eager=enforce_eager, max_model_len=256).create_engine_config()
    worker = types.SimpleNamespace(vllm_config=config, model_runner=None)
    reasons = graph_mode_reasons(preflight_record(worker))
    assert bool(reasons) is graph, reasons


def test_an_engines_shared_memory_files_are_removed_after_it_stops_and_no_one_elses(tmp_path):
    """vLLM CPU's tensor-parallel buffers (<identity>-<group>-cpushm_<rank>) outlive the engine: only the stopped
    engine's own are removed; another engine's, other files and an identity that is not a plain name are left."""
    from precision.backends.vllm_preflight import remove_shared_memory

    own = ["vllm_dist_aa-tp:0-[0-1]-cpushm_0", "vllm_dist_aa-tp:0-[0-1]-cpushm_1"]
    others = ["vllm_dist_bb-tp:0-[0-1]-cpushm_0", "vllm_dist_aa-notes", "sem.loky-1-x"]
    for name in own + others:
        (tmp_path / name).write_bytes(b"x")
    assert remove_shared_memory(["vllm_dist_aa", None, "vllm_dist_aa", "../etc"], directory=tmp_path) == sorted(own)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(others)
    assert remove_shared_memory([None], directory=tmp_path) == []
