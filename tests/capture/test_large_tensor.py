"""A valid tensor over 2 GiB reads back whole: Linux returns at most 2,147,479,552 bytes from one read(), so a
reader that trusts a single read calls a valid capture "cut short". The file is sparse (made on disk without
writing its zeros); only a few marked rows hold data, placed around the 2 GiB boundary."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest

from precision.capture import manifest as schema
from precision.capture.reader import CaptureReader

ROWS, WIDTH = 20_480, 32_768  # float32: 2.5 GiB
MARKED_ROWS = (0, 16_383, 16_384, ROWS - 1)  # 16_384 rows of 128 KiB = exactly 2 GiB: the first row past one read()


def _write_sparse_capture(path):
    tensors = path / "tensors"
    tensors.mkdir(parents=True)
    header = {
        "positions": {"dtype": "I64", "shape": [ROWS], "data_offsets": [0, ROWS * 8]},
        "logits": {"dtype": "F32", "shape": [ROWS, WIDTH], "data_offsets": [ROWS * 8, ROWS * 8 + ROWS * WIDTH * 4]},
    }
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    base = 8 + len(blob)
    file = tensors / "0000.safetensors"
    with open(file, "wb") as handle:
        handle.write(struct.pack("<Q", len(blob)) + blob)
        handle.write(np.arange(ROWS, dtype=np.int64).tobytes())
        for row in MARKED_ROWS:
            handle.seek(base + ROWS * 8 + row * WIDTH * 4)
            handle.write(np.full(WIDTH, row + 0.5, dtype=np.float32).tobytes())
        handle.truncate(base + ROWS * 8 + ROWS * WIDTH * 4)
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        while chunk := handle.read(64 << 20):
            digest.update(chunk)
    record = {"index": 0, "id": "long", "category": "synthetic", "rendering": "raw-text", "prompt_ids": [1] * ROWS,
              "continuation_ids": [], "generated_ids": [], "file": schema.tensor_file_name(0), "sha256": digest.hexdigest(),
              "bytes": file.stat().st_size, "tensors": {"positions": {"shape": [ROWS], "dtype": "I64"}, "logits": {"shape": [ROWS, WIDTH], "dtype": "F32"}},
              "determinism": None}
    manifest = {"schema_version": schema.SCHEMA_VERSION, "format": schema.FORMAT_NAME, "created_at": "2026-11-30T00:00:00+00:00",
                "backend": {"name": "hf", "spec": "hf:cpu:fp32", "engine": "transformers", "dtype": "float32"},
                "model": {"path": str(path), "architecture": "LlamaForCausalLM", "num_layers": 0, "hidden_size": 8, "vocab_size": WIDTH,
                          "max_position_embeddings": None, "stop_token_ids": [], "config_sha256": "", "weights_sha256": {}},
                "tokenizer": {}, "environment": {}, "selection": {"positions": "all", "layers": []},
                "teacher_forcing": {"source": "self", "reference_capture": None, "reference_manifest_sha256": None},
                "prompts": [record], "skipped": [], "runtime_seconds": 0.0}
    (path / schema.MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.slow
def test_a_25_gib_tensor_reads_back(tmp_path):
    _write_sparse_capture(tmp_path / "cap")
    reader = CaptureReader(tmp_path / "cap")
    handle = reader.arrays(reader.prompts[0])
    assert handle.shape("logits") == (ROWS, WIDTH) and ROWS * WIDTH * 4 == 5 * 2**29
    logits = handle.array("logits")
    for row in MARKED_ROWS:
        assert (logits[row] == row + 0.5).all()
    assert not logits[1].any() and not logits[ROWS - 2].any()
    del logits
    tail = handle.rows("logits", 16_380, 16_390)
    assert (tail[3] == 16_383.5).all() and (tail[4] == 16_384.5).all() and not tail[0].any()
