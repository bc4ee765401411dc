"""The worker's host copies, chunked logits and residual-stream check on the real vLLM CPU build.

Bit-identity against the code before them: tests/backends/vllm_worker_before.py is the worker extension as it
was (commit 0b9e9a7: tensors kept where the model computed them, logits of all rows in one compute_logits call;
any RPC it lacks, such as the driver's preflight, served by today's extension);
an engine running it (in a process of its own) and an engine running today's worker capture the same prompts, and every capture file must
have the same sha256, also when the logits are forced into chunks of a few rows (the engine runs in-process,
VLLM_ENABLE_V1_MULTIPROCESSING=0, so patching host_copy.LOGITS_CHUNK_BYTES here reaches the worker)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from precision.backends import BackendOptions, create_backend, host_copy, vllm_compat
from precision.capture.sites import CaptureSelection
from precision.errors import BackendError
from precision.model import inspect_model
from precision.planning import plan_from_prompts
from tests.conftest import REPO, requires_vllm

pytestmark = [requires_vllm, pytest.mark.vllm]

BEFORE = "tests.backends.vllm_worker_before.BeforeWithDriverRpcs"
SELECTIONS = {"all": CaptureSelection(), "every3-some-layers": CaptureSelection(positions="every:3", layers=(1, 3))}
CHUNK_ROWS = {"one-call": None, "5-rows": 5, "7-rows": 7}
"""Logits chunk sizes for today's worker: None is the default budget (one call for these prompts). Not fewer than
5: vLLM's CPU GEMM on this AMX machine takes another kernel for 4 rows or fewer, which rounds a few rows
differently (host_copy.MIN_CHUNK_ROWS), so 3-row chunks are NOT bit-identical here (measured; see the report)."""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class CollectResults:
    """Records what every worker's precision_collect returned (the driver keeps only rank 0's errors)."""

    def __init__(self, monkeypatch):
        self.results: list[list[dict]] = []
        rpc = vllm_compat.rpc

        def recording(llm, method, *args):
            out = rpc(llm, method, *args)
            if method == "precision_collect":
                self.results.append(out)
            return out

        monkeypatch.setattr(vllm_compat, "rpc", recording)


def capture_all(model_path: str, prompts: list[list[int]], out: Path, chunk_rows: dict[str, int | None]) -> dict[str, list]:
    """sha256 of every capture file, per prompt and selection: [(chunk size name, sha256), ...], from ONE engine."""
    model = inspect_model(model_path)
    vocabulary = json.loads((Path(model.path) / "config.json").read_text())["vocab_size"]
    hashes: dict[str, list] = {}
    out.mkdir(parents=True)
    default_budget = host_copy.LOGITS_CHUNK_BYTES
    with create_backend("vllm", model, BackendOptions(max_model_len=min(2048, model.max_position_embeddings))) as engine:
        for chunk_name, rows in chunk_rows.items():
            host_copy.LOGITS_CHUNK_BYTES = default_budget if rows is None else rows * 4 * vocabulary
            try:
                for index, ids in enumerate(prompts):
                    for selection_name, selection in SELECTIONS.items():
                        path = out / f"{index}-{selection_name}-{chunk_name}.safetensors"
                        engine.capture(ids, selection, path)
                        hashes.setdefault(f"{index}-{selection_name}", []).append((chunk_name, sha256(path)))
            finally:
                host_copy.LOGITS_CHUNK_BYTES = default_budget
    return hashes


def capture_before_in_a_fresh_process(model_path: str, prompts: list[list[int]], out: Path) -> dict[str, list]:
    """The same with the worker of before: vLLM adds a worker extension to its worker class's bases for the whole
    process, so a second extension class cannot be used in the same process."""
    out.parent.mkdir(parents=True, exist_ok=True)
    request = out.parent / "before-request.json"
    request.write_text(json.dumps({"model": model_path, "prompts": prompts, "out": str(out)}))
    code = "import sys; from tests.backends.test_vllm_worker_capture import _before_main; _before_main(sys.argv[1])"
    done = subprocess.run([sys.executable, "-c", code, str(request)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out.parent / "before-hashes.json").read_text())


def _before_main(request_path: str) -> None:
    from precision.backends import vllm as vllm_backend
    from tests.backends import vllm_worker_before  # noqa: F401  it reads the driver's extension name: before patching it

    request = json.loads(Path(request_path).read_text())
    vllm_backend.WORKER_EXTENSION = BEFORE
    hashes = capture_all(request["model"], request["prompts"], Path(request["out"]), {"before": None})
    (Path(request_path).parent / "before-hashes.json").write_text(json.dumps(hashes))


@pytest.mark.parametrize("which", ["stories260K", "built-in"])
def test_captures_are_bit_identical_to_the_worker_before(which, stories_path, builtin_path, short_prompts, tmp_path, monkeypatch):
    model_path = str(stories_path if which == "stories260K" else builtin_path)
    prompt_file = short_prompts if which == "stories260K" else REPO / "golden" / "default.jsonl"
    prompts = [list(p.prompt_ids) for p in plan_from_prompts(prompt_file, inspect_model(model_path), max_new_tokens=8).prompts]
    assert max(len(ids) for ids in prompts) > 5 * 3, "chunks must really split"
    before = capture_before_in_a_fresh_process(model_path, prompts, tmp_path / "before")
    collected = CollectResults(monkeypatch)
    after = capture_all(model_path, prompts, tmp_path / "after", CHUNK_ROWS)
    assert before.keys() == after.keys()
    for key in before:
        [(_, expected)] = before[key]
        assert dict(after[key]) == {name: expected for name in CHUNK_ROWS}, key
    first = collected.results[0][0]
    num_layers = inspect_model(model_path).num_layers
    assert first["errors"] == [] and first["residual_checked"] == [f"layer.{i}" for i in range(num_layers)]
    assert all(r[0]["residual_checked"] == [] for r in collected.results[1:])  # the first capture only
    calls = [r[0]["logits_calls"] for r in collected.results]
    per_chunking = len(prompts) * len(SELECTIONS)
    assert set(calls[:per_chunking]) == {1} and max(calls[per_chunking:]) > 2  # the default is one call; forced ones split


def test_a_norm_receiving_another_stream_refuses_the_capture_naming_both_modules(stories_path, stories_prompts_direct, tmp_path, monkeypatch):
    """Layer 2's input_layernorm is made to add 1/64 to the residual it receives: layer.1 as captured (out[0] +
    out[1]) is then not the stream the model goes on with, and the capture is refused naming both modules. The
    same engine passes the check before the change and after it is undone.

    First, what the check relies on, read from vLLM's CPU build: norm(x, residual) returns the tuple (normed,
    x + residual), the sum added in float32 and rounded, as a tensor that is neither input (the native
    implementation; vLLM's CUDA kernel writes into the inputs instead, which is why the worker copies it)."""
    model = inspect_model(stories_path)
    collected = CollectResults(monkeypatch)
    with create_backend("vllm", model, BackendOptions(max_model_len=256)) as engine:
        ids = stories_prompts_direct(model)[0]
        seen = []
        engine._llm.collective_rpc(_spy_on_layer_2_norm, args=(seen,))
        engine.generate(ids, 1)
        engine._llm.collective_rpc(_remove_spy)
        assert seen and all(s == ("tuple", 2, True, True) for s in seen), seen
        engine.capture(ids, CaptureSelection(), tmp_path / "ok.safetensors")
        assert collected.results[-1][0]["residual_checked"] == [f"layer.{i}" for i in range(model.num_layers)]
        rearm_check_with(engine, _shift_residual_of_layer_2_norm)
        with pytest.raises(BackendError) as excinfo:
            engine.capture(ids, CaptureSelection(), tmp_path / "refused.safetensors")
        message = str(excinfo.value)
        assert "residual-stream check failed: layer.1" in message
        assert "model.layers.1's out[0] + out[1]" in message and "model.layers.2.input_layernorm" in message
        assert not (tmp_path / "refused.safetensors").exists()
        rearm_check_with(engine, _restore_layer_2_norm)
        engine.capture(ids, CaptureSelection(), tmp_path / "again.safetensors")
        assert collected.results[-1][0]["errors"] == []
        assert sha256(tmp_path / "again.safetensors") == sha256(tmp_path / "ok.safetensors")


@pytest.fixture
def stories_prompts_direct(short_prompts):
    return lambda model: [list(p.prompt_ids) for p in plan_from_prompts(short_prompts, model, max_new_tokens=8).prompts]


def rearm_check_with(engine, change) -> None:
    """Applies ``change(worker)`` in every worker and reinstalls the hooks, which arms the residual check again."""
    vllm_compat.rpc(engine._llm, "precision_remove_hooks")
    engine._llm.collective_rpc(change)
    vllm_compat.rpc(engine._llm, "precision_install_hooks")


def _layer_2_norm(worker):
    return vllm_compat.worker_model(worker).model.layers[2].input_layernorm


def _shift_residual_of_layer_2_norm(worker) -> None:
    norm = _layer_2_norm(worker)
    original = norm.forward
    norm.forward = lambda x, residual=None: original(x, None if residual is None else residual + 1 / 64)
    norm._precision_test_original = original


def _restore_layer_2_norm(worker) -> None:
    norm = _layer_2_norm(worker)
    del norm.forward  # the instance attribute goes; the class's forward is used again
    del norm._precision_test_original


def _spy_on_layer_2_norm(worker, seen: list) -> None:
    def hook(_module, inputs, output):
        x, residual = inputs
        seen.append((type(output).__name__, len(output), output[1].data_ptr() not in (x.data_ptr(), residual.data_ptr()),
                     torch.equal(output[1], (x.float() + residual.float()).to(x.dtype))))

    _layer_2_norm(worker)._precision_test_spy = _layer_2_norm(worker).register_forward_hook(hook)


def _remove_spy(worker) -> None:
    _layer_2_norm(worker)._precision_test_spy.remove()
