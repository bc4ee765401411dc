"""precision-check doctor: the host report without an engine (real, and with faked package versions), exit codes,
and with --backend vllm the real vLLM CPU engine's preflight and prompt-logprob check on stories260K."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from precision import doctor as doctor_module
from precision.backends.vllm_logprob_check import EXACT_BOUND, FAIL_BOUND, compare_with_prompt_logprobs
from precision.cli import main
from precision.doctor import doctor, host_report, version_warnings
from precision.errors import BackendError
from tests.conftest import REPO, requires_vllm


def test_host_report_on_this_machine_imports_no_engine():
    code = "import sys; from precision.doctor import host_report; host_report(); print(sorted({'vllm', 'torch_npu'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr[-2000:]


def test_host_report_on_this_machine():
    report = host_report({})
    by_spec = {b.spec: b for b in report.backends}
    assert by_spec["hf:cpu"].can_run and by_spec["hf-layers:cpu"].can_run
    assert report.versions["python"] and report.versions["torch"]
    if "+cpu" in report.versions["torch"]:
        assert not by_spec["hf:cuda"].can_run and "CPU build" in by_spec["hf:cuda"].reason and by_spec["hf:cuda"].fix
    assert not by_spec["hf:npu"].can_run and "torch_npu is not installed" in by_spec["hf:npu"].reason


@pytest.fixture
def versions(monkeypatch):
    """Fake installed distributions: {distribution name: version}."""
    installed: dict[str, str] = {}

    def version(*names):
        return next((installed[n] for n in names if n in installed), None)

    monkeypatch.setattr(doctor_module, "distribution_version", version)
    return installed


@pytest.mark.parametrize("vllm, ascend, warned", [("0.11.0", "0.13.0rc1", True), ("0.13.0", "0.13.0rc1", False),
                                                  ("0.23.1", "0.23.0", False), ("0.32.0", "0.23.0", True)])
def test_vllm_and_vllm_ascend_major_minor_mismatch_is_warned(vllm, ascend, warned):
    warnings = version_warnings({"vllm": vllm, "vllm_ascend": ascend})
    assert any("differ in major.minor" in w for w in warnings) is warned


def test_vllm_ascend_without_torch_npu_cannot_run_and_says_how_to_fix(versions):
    versions.update({"torch": "2.9.0", "transformers": "5.19.0", "vllm": "0.23.0", "vllm-ascend": "0.23.0"})
    report = host_report({})
    vllm = report.status_of("vllm")
    assert not vllm.can_run and vllm.device == "npu" and "torch_npu is not installed" in vllm.reason and "vllm-ascend" in vllm.fix
    with pytest.raises(BackendError, match="backend vllm cannot run here.*torch_npu.*fix: install vllm, vllm-ascend"):
        doctor("vllm", environ={})


def test_no_vllm_installed(versions):
    versions.update({"torch": "2.13.0+cpu", "transformers": "5.19.0"})
    vllm = host_report({}).status_of("vllm")
    assert not vllm.can_run and "not installed" in vllm.reason and "scripts/install.sh" in vllm.fix


@requires_vllm
def test_a_refused_environment_variable_makes_vllm_unable_to_run():
    vllm = host_report({"VLLM_USE_V2_MODEL_RUNNER": "1"}).status_of("vllm")
    assert not vllm.can_run and "VLLM_USE_V2_MODEL_RUNNER" in vllm.reason
    assert host_report({}).status_of("vllm").can_run


def test_numerics_environment_lists_the_ascend_variables(monkeypatch):
    monkeypatch.setenv("PYTORCH_NPU_ALLOC_CONF", "expandable_segments:True")
    monkeypatch.setenv("TASK_QUEUE_ENABLE", "2")
    environment = host_report().environment
    assert environment["PYTORCH_NPU_ALLOC_CONF"] == "expandable_segments:True" and environment["TASK_QUEUE_ENABLE"] == "2"


def test_cli_without_backend_exits_0_and_lists_every_backend(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for spec in doctor_module.BACKENDS:
        assert spec in out
    assert "versions: python" in out


def test_cli_json_is_the_whole_record(capsys):
    assert main(["doctor", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert {b["spec"] for b in record["backends"]} == set(doctor_module.BACKENDS) and record["engine"] is None


@pytest.mark.parametrize("spec, message", [("hf:npu", "torch_npu is not installed.*fix:"), ("hf-layers:cuda", "runs on the CPU only"),
                                           ("nonsense", "unknown backend")])
def test_cli_exits_2_when_the_asked_backend_cannot_run(capsys, spec, message):
    assert main(["doctor", "--backend", spec]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err


def test_cli_asked_backend_that_can_run_exits_0(capsys):
    assert main(["doctor", "--backend", "hf:cpu"]) == 0
    assert "hf:cpu" in capsys.readouterr().out


# -- the real engine ------------------------------------------------------------------------------------------------
@requires_vllm
@pytest.mark.vllm
def test_cli_with_backend_vllm_prints_the_real_engines_preflight(stories_path, capsys):
    assert main(["-q", "doctor", "--backend", "vllm", "--model", str(stories_path)]) == 0
    out = capsys.readouterr().out
    assert "engine preflight (read in the worker):" in out
    assert "worker_class=CPUWorker" in out and "model_runner_class=CPUModelRunner" in out
    assert "compilation_mode=NONE" in out and "cudagraph_mode=NONE" in out and "enforce_eager=True" in out
    assert "output_norm=RMSNorm" in out and "graph mode: none" in out
    assert "prompt-logprob check: PASS" in out


@pytest.fixture(scope="module")
def engine(stories):
    from precision.backends import BackendOptions, create_backend

    backend = create_backend("vllm", stories, BackendOptions(max_model_len=256))
    with backend:
        yield backend


@pytest.fixture(scope="module")
def prompt_ids(stories):
    from precision.tokenizer import load_tokenizer

    return list(load_tokenizer(stories.path)(doctor_module.DOCTOR_PROMPT)["input_ids"])


@requires_vllm
@pytest.mark.vllm
def test_prompt_logprob_check_passes_on_the_hook_logits_and_fails_on_shifted_or_other_logits(engine, stories, prompt_ids, tmp_path):
    """Real data both ways: the capture's own logits pass, exactly (measured max |Δ| 4.4e-7); the same logits one
    position off (20.1), and transformers' FP32 logits of the same tokens (another forward, 0.146), fail."""
    from precision.backends import create_backend
    from precision.capture.sites import CaptureSelection

    engine.capture(prompt_ids, CaptureSelection(), tmp_path / "vllm.safetensors")
    logits = load_file(str(tmp_path / "vllm.safetensors"))["logits"]
    engine_logprobs = engine.prompt_logprobs(prompt_ids, 5)
    own = compare_with_prompt_logprobs(logits, engine_logprobs, 5)
    assert own.status == "PASS" and own.exact and own.max_abs_logprob_difference <= EXACT_BOUND and own.top1_agreement == 1.0
    assert own.positions == len(prompt_ids) - 1

    shifted = compare_with_prompt_logprobs(torch.roll(logits, 1, dims=0), engine_logprobs, 5)
    assert shifted.status == "FAIL" and shifted.top1_agreement < 1.0

    with create_backend("hf:cpu:fp32", stories) as fp32:
        fp32.capture(prompt_ids, CaptureSelection(), tmp_path / "fp32.safetensors")
    other = compare_with_prompt_logprobs(load_file(str(tmp_path / "fp32.safetensors"))["logits"], engine_logprobs, 5)
    assert other.status == "FAIL" and not other.exact and other.max_abs_logprob_difference > FAIL_BOUND


@requires_vllm
@pytest.mark.vllm
def test_the_real_engines_preflight_record_is_in_the_manifest(engine, stories_reference, tmp_path):
    from precision.capture.writer import CapturePlan, capture

    target = capture(engine, CapturePlan.following(stories_reference), tmp_path / "target", show_progress=False)
    worker = target.manifest["backend"]["worker"]
    assert worker["engine"]["worker_class"] == "CPUWorker" and worker["engine"]["enforce_eager"] is True
    assert worker["modules"]["output_norm"] == "RMSNorm" and worker["modules"]["logits_processor"] == "LogitsProcessor"
    assert worker["fingerprint"]["torch_npu"] is None and worker["environment"]["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
