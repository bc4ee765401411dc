"""The vLLM worker extension without vLLM: a small torch model with vLLM's layout (deferred residual add, fused
add+RMSNorm returning (normed, stream)) driven through the extension's own methods, as collective_rpc would."""

from __future__ import annotations

import types

import pytest
import torch

from precision.backends import host_copy, vllm_compat
from precision.backends.vllm_worker import CaptureWorkerExtension
from precision.errors import BackendError
from safetensors.torch import load_file

HIDDEN, VOCAB, LAYERS = 8, 37, 3


class FusedAddNorm(torch.nn.Module):
    """vLLM's native fused_add_rms_norm: the add in float32 rounded to the input dtype, returned as the stream."""

    def forward(self, x, residual=None):
        if residual is None:
            return x * 2
        stream = (x.float() + residual.float()).to(x.dtype)
        return stream * 2, stream


class DecoderLayer(torch.nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.input_layernorm = FusedAddNorm()
        self.scale = scale

    def forward(self, hidden, residual):
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        return torch.tanh(hidden) * self.scale, residual


class Model(torch.nn.Module):
    """A vLLM-shaped model: ``model.embed_tokens / layers / norm`` and ``compute_logits`` (counted)."""

    def __init__(self, logits_on_this_rank: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(VOCAB, HIDDEN).to(torch.bfloat16)
        self.model.layers = torch.nn.ModuleList(DecoderLayer(0.5 + i / 7) for i in range(LAYERS))
        self.model.norm = FusedAddNorm()
        self.lm_head = torch.nn.Linear(HIDDEN, VOCAB, bias=False).to(torch.bfloat16)
        self.config = types.SimpleNamespace(vocab_size=VOCAB)
        self.logits_rows: list[int] = []
        self.logits_on_this_rank = logits_on_this_rank

    def forward(self, ids):
        hidden, residual = self.model.embed_tokens(ids), None
        for layer in self.model.layers:
            hidden, residual = layer(hidden, residual)
        return self.model.norm(hidden, residual)[0]

    def compute_logits(self, hidden_states):
        self.logits_rows.append(int(hidden_states.shape[0]))
        return self.lm_head(hidden_states) if self.logits_on_this_rank else None


class Worker(CaptureWorkerExtension):
    def __init__(self, model: Model, rank: int = 0):
        self.model_runner = types.SimpleNamespace(get_model=lambda: model)
        self.rank = rank


IDS = torch.tensor([1, 5, 9, 2, 30, 7, 7, 3, 11, 4, 36])


def capture(worker: Worker, path, positions=None, layers=None) -> dict:
    worker.precision_arm(list(range(len(IDS))) if positions is None else positions, layers, str(path))
    with torch.inference_mode():
        worker.model_runner.get_model()(IDS)
    return worker.precision_collect()


def test_capture_is_the_residual_stream_and_checks_it_on_the_first_capture_only(tmp_path):
    model = Model()
    worker = Worker(model)
    assert worker.precision_install_hooks() == {"num_layers": LAYERS, "model_class": "Model"}
    first = capture(worker, tmp_path / "a.safetensors")
    assert first["errors"] == [] and first["path"] == str(tmp_path / "a.safetensors")
    assert first["residual_checked"] == [f"layer.{i}" for i in range(LAYERS)]
    tensors = load_file(first["path"])
    embed = model.model.embed_tokens(IDS)
    assert torch.equal(tensors["embed"], embed)
    # layer.0's stream is embedding + what layer 0 added, as its consumer (layer 1's norm) computes it
    hidden0, residual0 = model.model.layers[0](embed, None)
    assert torch.equal(tensors["layer.0"], hidden0 + residual0)
    assert torch.equal(tensors["logits"], model.lm_head(tensors["final_norm"]))
    second = capture(worker, tmp_path / "b.safetensors")
    assert second["residual_checked"] == [] and second["errors"] == []
    assert load_file(second["path"]).keys() == tensors.keys()


def test_logits_chunks_are_bounded_and_equal_to_all_rows_at_once(tmp_path, monkeypatch):
    model = Model()
    worker = Worker(model)
    worker.precision_install_hooks()
    whole = load_file(capture(worker, tmp_path / "whole.safetensors")["path"])
    assert model.logits_rows == [len(IDS)]
    monkeypatch.setattr(host_copy, "LOGITS_CHUNK_BYTES", 3 * VOCAB * 4)  # 3 rows of float32 logits
    model.logits_rows.clear()
    result = capture(worker, tmp_path / "chunked.safetensors")
    assert model.logits_rows == [3, 3, 5] and result["logits_calls"] == 3  # the last 2 rows joined the chunk before
    monkeypatch.setattr(host_copy, "LOGITS_CHUNK_BYTES", 5 * VOCAB * 4)  # 5, 5 and a last row joined: 5, 6
    model.logits_rows.clear()
    assert capture(worker, tmp_path / "joined.safetensors")["logits_calls"] == 2 and model.logits_rows == [5, 6]
    chunked = load_file(result["path"])
    assert all(torch.equal(whole[name], chunked[name]) for name in whole)


def test_a_rank_without_logits_makes_the_same_calls_and_writes_nothing(tmp_path, monkeypatch):
    """Under tensor parallelism compute_logits gathers shards: every rank must call it as often as rank 0."""
    monkeypatch.setattr(host_copy, "LOGITS_CHUNK_BYTES", 2 * VOCAB * 4)
    model = Model(logits_on_this_rank=False)
    worker = Worker(model, rank=1)
    worker.precision_install_hooks()
    result = capture(worker, tmp_path / "rank1.safetensors")
    assert result["path"] is None and result["logits_calls"] == 5 and model.logits_rows == [2] * 4 + [3]
    assert not (tmp_path / "rank1.safetensors").exists()


def test_chunks_never_end_with_a_few_rows():
    """A GEMM of a few rows takes another kernel (measured on vLLM's CPU build: 4 rows or fewer round differently)."""
    assert host_copy.chunk_bounds(403 * 3 + 2, 403) == [(0, 403), (403, 806), (806, 1211)]
    assert host_copy.chunk_bounds(403 * 3 + 64, 403) == [(0, 403), (403, 806), (806, 1209), (1209, 1273)]
    assert host_copy.chunk_bounds(3, 403) == [(0, 3)] and host_copy.chunk_bounds(0, 403) == [(0, 0)]
    assert host_copy.chunk_bounds(16, 7) == [(0, 7), (7, 16)] and host_copy.chunk_bounds(21, 7) == [(0, 7), (7, 14), (14, 21)]


def test_logits_chunk_rows_follow_the_budget():
    assert host_copy.logits_chunk_rows(166144) == 256 * 2**20 // (4 * 166144) == 403
    assert host_copy.logits_chunk_rows(10**12) == 1
    assert host_copy.logits_chunk_rows(261, budget_bytes=261 * 4 * 7) == 7


@pytest.mark.parametrize("wrapped_module, consumer_name, layer_name", [
    ("model.layers.2.input_layernorm", "model.layers.2.input_layernorm", "model.layers.1"),
    ("model.norm", "model.norm", f"model.layers.{LAYERS - 1}"),
])
def test_a_consumer_receiving_another_stream_refuses_the_capture(tmp_path, wrapped_module, consumer_name, layer_name):
    model = Model()
    norm = model.get_submodule(wrapped_module)
    original = norm.forward

    def shifted(x, residual=None):  # what the next module receives differs from the layer's out[0] + out[1]
        return original(x, None if residual is None else residual + 1)

    norm.forward = shifted
    worker = Worker(model)
    worker.precision_install_hooks()
    result = capture(worker, tmp_path / "x.safetensors")
    assert result["path"] is None and len(result["errors"]) == 1
    message = result["errors"][0]
    assert "residual-stream check failed" in message and f"{layer_name}'s out[0] + out[1]" in message and consumer_name in message
    assert f"of {len(IDS) * HIDDEN} elements differ" in message


def test_check_covers_the_selected_layers_and_rows(tmp_path):
    worker = Worker(Model())
    worker.precision_install_hooks()
    result = capture(worker, tmp_path / "s.safetensors", positions=[0, 4, 10], layers=[1])
    assert result["errors"] == [] and result["residual_checked"] == ["layer.1"]
    assert sorted(load_file(result["path"])) == ["embed", "final_norm", "layer.1", "logits", "positions"]


class NotALayerOutput(torch.nn.Module):
    pass


@pytest.mark.parametrize("output, message", [
    (torch.zeros(4, 8), "NotALayerOutput returned a tensor of shape [4, 8]"),
    ((torch.zeros(4, 8), None), "residual None"),
    ((torch.zeros(4, 8), torch.zeros(4, 7)), "shape [4, 8] and a residual of shape [4, 7]"),
    ((torch.zeros(4, 8),), "NotALayerOutput returned a tuple of 1"),
])
def test_layer_output_is_validated_naming_the_module(output, message):
    with pytest.raises(BackendError, match="decoder layers returning \\(hidden_states, residual\\)") as excinfo:
        vllm_compat.layer_residual_stream(output, NotALayerOutput())
    assert message in str(excinfo.value)


def test_layer_output_with_a_third_element_is_accepted():
    hidden, residual = torch.ones(2, 3), torch.full((2, 3), 2.0)
    assert torch.equal(vllm_compat.layer_residual_stream((hidden, residual, 0), NotALayerOutput()), torch.full((2, 3), 3.0))


def test_a_bad_layer_inside_the_forward_becomes_an_error_not_a_crash(tmp_path):
    model = Model()
    layer = model.model.layers[1]
    original = layer.forward
    layer.forward = lambda hidden, residual: (original(hidden, residual)[0], torch.zeros(1, HIDDEN))
    worker = Worker(model)
    worker.precision_install_hooks()
    worker.precision_arm(list(range(4)), None, str(tmp_path / "bad.safetensors"))
    with torch.inference_mode():
        try:
            model(IDS[:4])
        except RuntimeError:
            pass  # broadcasting (4, 8) + (1, 8) is fine; anything else is the model's own failure
    result = worker.precision_collect()
    assert result["path"] is None
    assert any("DecoderLayer returned hidden_states of shape [4, 8] and a residual of shape [1, 8]" in e for e in result["errors"])


def test_device_copies_wait_once_per_forward(tmp_path, monkeypatch):
    """The accelerator path (tensors not on the host), run on CPU tensors: copies into host buffers, pinned where
    the platform allows (not this CPU-only torch: pageable), and ONE synchronize per collected forward."""
    synchronized = []
    monkeypatch.setattr(host_copy, "on_host", lambda tensor: False)
    monkeypatch.setattr(host_copy, "device_module", lambda device_type: types.SimpleNamespace(synchronize=synchronized.append))
    worker = Worker(Model())
    worker.precision_install_hooks()
    copied = load_file(capture(worker, tmp_path / "d.safetensors")["path"])
    assert synchronized == [torch.device("cpu")] and worker._precision_copies._pin is False
    monkeypatch.undo()
    plain = Worker(Model())
    plain.precision_install_hooks()
    expected = load_file(capture(plain, tmp_path / "p.safetensors")["path"])
    assert copied.keys() == expected.keys() and all(torch.equal(copied[k], expected[k]) for k in copied)


def test_host_copy_keeps_host_tensors_without_copying():
    copies = host_copy.HostCopies()
    tensor = torch.arange(6.0)
    assert copies.keep(tensor) is tensor and copies.pending_devices == []
    copies.synchronize()
