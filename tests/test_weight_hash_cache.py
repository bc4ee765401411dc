"""The weight hashes a run records are remembered per file identity, and a changed file is hashed again."""

from __future__ import annotations

import hashlib
import os

from precision.model import weights_sha256


def test_a_remembered_hash_is_reused_and_a_rewritten_file_is_hashed_again(tmp_path, monkeypatch):
    monkeypatch.setenv("PRECISION_CHECK_HOME", str(tmp_path / "home"))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 1000)
    first = weights_sha256(weights)
    assert first == hashlib.sha256(b"a" * 1000).hexdigest()
    assert (tmp_path / "home" / "weights-sha256.json").is_file()

    calls = []
    monkeypatch.setattr("precision.model.sha256_file", lambda path: calls.append(path) or "recomputed")
    assert weights_sha256(weights) == first and calls == [], "the same file is not read again"

    stat = weights.stat()
    with open(weights, "r+b") as handle:  # same size, modification time put back: the status-change time still moves
        handle.write(b"b")
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights_sha256(weights) == "recomputed" and calls == [weights]


def test_an_unreadable_memory_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("PRECISION_CHECK_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "weights-sha256.json").write_text("{not json")
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")
    assert weights_sha256(weights) == hashlib.sha256(b"x").hexdigest()
