"""File names and constants of a capture directory.

The manifest's schema is the typed document precision.contract.capture.CaptureManifest (published as
docs/schema/precision-check-capture.schema.json); progress.jsonl is a ProgressHeader line followed by one
PromptEntry line per finished prompt. Beside them: ".precision-check" (the marker of a directory precision-check
created; precision.outputs) and ".precision-check.lock" (the advisory lock a writer holds).
"""

from precision.contract.capture import CAPTURE_FORMAT as FORMAT_NAME, CAPTURE_VERSION as SCHEMA_VERSION  # noqa: F401

MANIFEST = "manifest.json"
PROGRESS = "progress.jsonl"
TENSOR_DIR = "tensors"
REQUIRED_KEYS = ("schema_version", "format", "backend", "model", "tokenizer", "selection", "teacher_forcing", "prompts")
PROMPT_KEYS = ("index", "id", "category", "rendering", "prompt_ids", "continuation_ids", "generated_ids", "file", "sha256", "bytes", "tensors")


def tensor_file_name(index: int) -> str:
    return f"{TENSOR_DIR}/{index:04d}.safetensors"

SAFETENSORS_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
"""The safetensors dtype a backend's dtype (manifest backend.dtype) writes its float sites in."""
