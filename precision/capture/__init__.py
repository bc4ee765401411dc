"""The capture directory format.

    CAPTURE_DIR/
      manifest.json            written last: its presence means the capture is complete
      progress.jsonl           one line per finished prompt (what --resume continues from)
      tensors/NNNN.safetensors one file per prompt, tensors in the backend's dtype

See precision.capture.manifest for the manifest schema and precision.capture.sites for the tensor names.
"""

from precision.capture.manifest import SCHEMA_VERSION
from precision.capture.reader import CaptureReader, PromptRecord
from precision.capture.sites import CaptureSelection

__all__ = ["SCHEMA_VERSION", "CaptureReader", "CaptureSelection", "PromptRecord"]
