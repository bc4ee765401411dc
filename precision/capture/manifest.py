"""manifest.json of a capture directory (schema_version 1).

    {
      "schema_version": 1,
      "format": "precision-check-capture",
      "created_at": ISO-8601 UTC,
      "backend": {"name", "spec", "engine", "dtype", "device", "settings", ...},   # what ran
      "model": ModelInfo (path, architecture, num_layers, hidden_size, vocab_size, max_position_embeddings,
                          stop_token_ids, config_sha256, weights_sha256),
      "tokenizer": {"class", "vocab_size", "bos_token_id", "eos_token_id", "chat_template_sha256",
                    "tokenizer_json_sha256", "plain_chat_rendering"},
      "environment": {"versions", "python", "platform", "host", "env", ...},
      "selection": {"positions": "all" | "last" | "every:K", "layers": "all" | [int]},
      "teacher_forcing": {"source": "self" | "reference", "reference_capture": path | null,
                          "reference_manifest_sha256": hex | null},
      "prompts": [PromptRecord ...],   # see precision.capture.reader.PromptRecord
      "skipped": [{"id", "reason"}],
      "runtime_seconds": float,
      "repeats": int,                  # runs per prompt (>1: the determinism record of each prompt)
      "identity": {...}                # precision.capture.writer.capture_identity: what --resume must match
    }
Beside it: ".precision-check" (the marker of a directory precision-check created; precision.outputs) and
".precision-check.lock" (the advisory lock a writer holds).
"""

SCHEMA_VERSION = 1
FORMAT_NAME = "precision-check-capture"
MANIFEST = "manifest.json"
PROGRESS = "progress.jsonl"
TENSOR_DIR = "tensors"
REQUIRED_KEYS = ("schema_version", "format", "backend", "model", "tokenizer", "selection", "teacher_forcing", "prompts")
PROMPT_KEYS = ("index", "id", "category", "rendering", "prompt_ids", "continuation_ids", "generated_ids", "file", "sha256", "bytes", "tensors")


def tensor_file_name(index: int) -> str:
    return f"{TENSOR_DIR}/{index:04d}.safetensors"

SAFETENSORS_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
"""The safetensors dtype a backend's dtype (manifest backend.dtype) writes its float sites in."""
