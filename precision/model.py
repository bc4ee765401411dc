"""Facts about a model directory, read from its files without importing torch: shape, limits, hashes."""

from __future__ import annotations

import hashlib
import json
import logging
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path

from precision.errors import ModelError
from precision.model_families import check_family, check_family_tensors
from precision.safetensors_io import SafetensorsFile

log = logging.getLogger(__name__)

_HASH_CHUNK = 8 * 1024 * 1024


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def weights_sha256(path: Path) -> str:
    """sha256 of a weight file, remembered by the file's identity (device, inode, size, modification and status-change
    times in ns) in $PRECISION_CHECK_HOME/weights-sha256.json: any write to the file, or replacing it, changes that
    identity (the status-change time cannot be set back), so a changed file is hashed again. A 7.9 GB checkpoint
    takes ~10 s to hash on the CI machine, at the start of every run of it."""
    from precision.default_model import cache_root
    from precision.io import write_json_atomic

    info = path.stat()
    key = f"{info.st_dev}:{info.st_ino}:{info.st_size}:{info.st_mtime_ns}:{info.st_ctime_ns}:{path.resolve()}"
    store = cache_root() / "weights-sha256.json"
    try:
        known = json.loads(store.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    if isinstance(known.get(key), str):
        return known[key]
    digest = sha256_file(path)
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(store, {**{k: v for k, v in known.items() if not k.endswith(f":{path.resolve()}")}, key: digest})
    except OSError as exc:
        log.info("the weight hash of %s is not remembered (%s)", path, exc)
    return digest


@dataclass(frozen=True)
class ModelInfo:
    path: str
    architecture: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    stop_token_ids: tuple[int, ...]
    config_sha256: str
    weights_sha256: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        data = asdict(self)
        data["stop_token_ids"] = list(self.stop_token_ids)
        return data


def _read_json(path: Path) -> dict:
    if not path.is_file() or not stat.S_ISREG(path.stat().st_mode):
        raise ModelError(f"{path} is not a regular file; the model directory needs a valid config.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ModelError(f"cannot read {path}: {exc}; the model directory needs a valid config.json") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{path} is not a JSON object; the model directory needs a valid config.json")
    return data


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _tensor_shapes(weights: list[Path]) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from the safetensors headers (no tensor data is read)."""
    shapes = {}
    for weight in weights:
        shapes.update(weight_file(weight).shapes())
    return shapes


def weight_file(path: Path) -> SafetensorsFile:
    """One checked safetensors file of a model directory; damage is a ModelError."""
    return SafetensorsFile(path, error=ModelError, fix="replace it with an intact copy of the checkpoint")


def _check_weights_match_config(shapes: dict[str, tuple[int, ...]], config: dict, num_layers: int, hidden: int, vocab: int) -> None:
    """config.json must describe the weights beside it: a mismatch would make transformers allocate what the
    config says (once 131 GB for a 260K-parameter checkpoint) before failing."""
    expected = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden)}
    intermediate = config.get("intermediate_size")
    if isinstance(intermediate, int):
        expected["model.layers.0.mlp.down_proj.weight"] = (hidden, intermediate)
    for name, shape in expected.items():
        if name in shapes and shapes[name] != shape:
            raise ModelError(f"config.json does not match the weights: {name} is {list(shapes[name])}, the config implies {list(shape)}; "
                             "use the config.json that came with these weights")
    layers = {int(name.split(".")[2]) for name in shapes if name.startswith("model.layers.") and name.split(".")[2].isdigit()}
    if layers and layers != set(range(num_layers)):
        raise ModelError(f"config.json says num_hidden_layers={num_layers}, the weights hold decoder layers {min(layers)}..{max(layers)} "
                         f"({len(layers)} of them); use the config.json that came with these weights")


def inspect_model(path: str | Path, *, hash_weights: bool = True) -> ModelInfo:
    """Read config.json (and generation_config.json) of a Hugging Face model directory.

    Only safetensors weights are accepted: *.bin / *.pt checkpoints are pickles, which this tool never loads.
    """
    model_dir = Path(path)
    if not model_dir.is_dir():
        raise ModelError(f"model directory {model_dir} does not exist or is not a directory; pass --model DIR with config.json and *.safetensors")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ModelError(f"{model_dir} has no config.json; pass a Hugging Face model directory")
    config = _read_json(config_path)
    architectures = config.get("architectures") or []
    architectures = [str(a) for a in architectures] if isinstance(architectures, list) else [str(architectures)]
    weights = sorted(model_dir.glob("*.safetensors"))
    for weight in weights:
        if not weight.is_file() or not stat.S_ISREG(weight.stat().st_mode):
            raise ModelError(f"{weight} is not a regular file (a directory, device or dangling link); a model directory holds *.safetensors files")
    if not weights:
        pickled = sorted(p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        hint = f" (found {pickled}: pickle checkpoints are never loaded; convert them to safetensors)" if pickled else ""
        raise ModelError(f"{model_dir} has no *.safetensors weights{hint}")
    text_config = config.get("text_config", config)
    if not isinstance(text_config, dict):
        raise ModelError(f"{config_path}: text_config is not a JSON object; the model directory needs a valid config.json")
    shapes = _tensor_shapes(weights)
    family = check_family(architectures, text_config, set(shapes), str(config_path))
    try:
        num_layers = int(text_config["num_hidden_layers"])
        hidden = int(text_config["hidden_size"])
        vocab = int(text_config["vocab_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{config_path}: missing or invalid {exc}; need num_hidden_layers, hidden_size, vocab_size") from exc
    if min(num_layers, hidden, vocab) <= 0:
        raise ModelError(f"{config_path}: num_hidden_layers, hidden_size and vocab_size must be positive")
    _check_weights_match_config(shapes, text_config, num_layers, hidden, vocab)
    check_family_tensors(family, num_layers, set(shapes), bool(text_config.get("tie_word_embeddings", False)), str(config_path))
    max_positions = int(text_config.get("max_position_embeddings") or 0)
    if max_positions <= 0:
        raise ModelError(f"{config_path}: max_position_embeddings is missing; precision-check needs the model's context length")
    stop_ids = _as_id_list(config.get("eos_token_id"))
    generation_config = model_dir / "generation_config.json"
    if generation_config.is_file():
        stop_ids = _as_id_list(_read_json(generation_config).get("eos_token_id")) or stop_ids
    return ModelInfo(
        path=str(model_dir.resolve()),
        architecture=str(architectures[0]),
        num_layers=num_layers,
        hidden_size=hidden,
        vocab_size=vocab,
        max_position_embeddings=max_positions,
        stop_token_ids=tuple(dict.fromkeys(stop_ids)),
        config_sha256=sha256_file(config_path),
        weights_sha256={p.name: weights_sha256(p) for p in weights} if hash_weights else {},
    )
