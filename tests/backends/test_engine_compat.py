"""The engine-compatibility modules: version ranges, missing APIs, the installed engines, and the rule that no
other module of the package reaches a private or version-dependent engine API.

Fakes stand in for other engine versions (a version string, a module in sys.modules, an object lacking an
attribute); the real installed transformers and vLLM must pass every check.
"""

from __future__ import annotations

import ast
import dataclasses
import logging
import sys
import types
from pathlib import Path

import pytest
import torch

from precision import names
from precision.backends import compat, transformers_compat, vllm_compat
from precision.errors import BackendError
from tests.conftest import REPO, requires_vllm

PACKAGE = REPO / "precision"


@pytest.fixture
def fake_vllm_version(monkeypatch):
    def set_version(version: str | None) -> None:
        monkeypatch.setattr(vllm_compat, "distribution_version", lambda *_: version)
        if version is None:
            monkeypatch.delitem(sys.modules, "vllm", raising=False)

    return set_version


@pytest.fixture
def fake_transformers_version(monkeypatch):
    def set_version(version: str) -> None:
        monkeypatch.setattr(transformers_compat, "distribution_version", lambda *_: version)

    return set_version


def fake_modules(monkeypatch, **modules: dict) -> None:
    """Put modules named like vllm.platforms (keyword: the dotted name with __ for .) into sys.modules."""
    for dotted, attributes in modules.items():
        name = dotted.replace("__", ".")
        module = types.ModuleType(name)
        for key, value in attributes.items():
            setattr(module, key, value)
        monkeypatch.setitem(sys.modules, name, module)


# -- versions ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version, inside", [("0.32.0", True), ("0.32.0+cpu", True), ("0.32.3", True), ("0.32.1rc1", True),
                                             ("0.31.2", False), ("0.33.0", False), ("1.0.0", False), ("not-a-version", False)])
def test_vllm_version_outside_the_tested_range_warns(fake_vllm_version, caplog, version, inside):
    fake_vllm_version(version)
    with caplog.at_level(logging.WARNING, logger=compat.__name__):
        assert vllm_compat.check_version() is inside
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if inside:
        assert not warned
    else:
        assert len(warned) == 1 and f"vLLM {version} is outside" in warned[0] and vllm_compat.TESTED_VERSIONS in warned[0]


@pytest.mark.parametrize("version, inside", [("5.19.0", True), ("5.30.1", True), ("4.50.0", False), ("5.18.0", False), ("6.0.0", False)])
def test_transformers_version_outside_the_tested_range_warns(fake_transformers_version, caplog, version, inside):
    fake_transformers_version(version)
    with caplog.at_level(logging.WARNING, logger=compat.__name__):
        assert transformers_compat.check_version() is inside
    assert bool([r for r in caplog.records if f"transformers {version} is outside" in r.getMessage()]) is not inside


def test_vllm_not_installed_names_the_install(fake_vllm_version):
    fake_vllm_version(None)
    with pytest.raises(BackendError, match="needs vLLM.*scripts/install.sh"):
        vllm_compat.check_version()
    with pytest.raises(BackendError, match="needs vLLM"):
        vllm_compat.llm_class()
    assert vllm_compat.engine_arg_names() is None  # nothing to check engine settings against: activation says why


def test_installed_versions_are_inside_the_tested_ranges(caplog):
    with caplog.at_level(logging.WARNING, logger=compat.__name__):
        assert transformers_compat.check_version()
        if vllm_compat.installed_version() is not None:
            assert vllm_compat.check_version()
    assert not caplog.records


# -- missing APIs raise, naming the version and the API -------------------------------------------------------------
def assert_names_version_and_api(excinfo, engine: str, version: str, api: str) -> None:
    message = str(excinfo.value)
    assert f"{engine} {version} has no {api}" in message, message
    assert "install a tested version" in message


def test_require_returns_the_attribute_or_names_version_and_api(fake_vllm_version):
    fake_vllm_version("0.40.0")
    assert vllm_compat.require("Thing.present", types.SimpleNamespace(present=3), "present") == 3
    with pytest.raises(BackendError) as excinfo:
        vllm_compat.require("Thing.absent", types.SimpleNamespace(present=3), "absent")
    assert_names_version_and_api(excinfo, "vLLM", "0.40.0", "Thing.absent")


def test_private_platform_modules_missing_raise_instead_of_falling_back(fake_vllm_version, monkeypatch):
    fake_vllm_version("0.40.0")
    fake_modules(monkeypatch, vllm={}, vllm__platforms={"current_platform": types.SimpleNamespace()},
                 vllm__v1__attention__backends__cpu_attn={})
    with pytest.raises(BackendError) as excinfo:
        vllm_compat.device_type()
    assert_names_version_and_api(excinfo, "vLLM", "0.40.0", "vllm.platforms.current_platform.device_type")
    with pytest.raises(BackendError) as excinfo:
        vllm_compat.cpu_head_sizes()
    assert_names_version_and_api(excinfo, "vLLM", "0.40.0", "vllm.v1.attention.backends.cpu_attn.CPUAttentionBackend")


def test_private_module_that_cannot_be_imported_names_it(fake_vllm_version, monkeypatch):
    fake_vllm_version("0.40.0")
    monkeypatch.setitem(sys.modules, "vllm.v1.attention.backends.cpu_attn", None)  # import raises ImportError
    with pytest.raises(BackendError) as excinfo:
        vllm_compat.cpu_head_sizes()
    assert_names_version_and_api(excinfo, "vLLM", "0.40.0", "vllm.v1.attention.backends.cpu_attn.CPUAttentionBackend")


def test_fake_platform_with_the_apis_answers(fake_vllm_version, monkeypatch):
    fake_vllm_version("0.32.0")
    backend = type("CPUAttentionBackend", (), {"get_supported_head_sizes": staticmethod(lambda: [32, 64])})
    fake_modules(monkeypatch, vllm={}, vllm__platforms={"current_platform": types.SimpleNamespace(device_type="cpu")},
                 vllm__v1__attention__backends__cpu_attn={"CPUAttentionBackend": backend})
    assert vllm_compat.device_type() == "cpu"
    assert vllm_compat.cpu_head_sizes() == (32, 64)


def test_engine_args_must_be_a_dataclass(fake_vllm_version, monkeypatch):
    fake_vllm_version("0.40.0")

    @dataclasses.dataclass
    class EngineArgs:
        model: str = ""
        max_model_len: int = 0

    fake_modules(monkeypatch, vllm={}, vllm__engine={}, vllm__engine__arg_utils={"EngineArgs": EngineArgs})
    assert vllm_compat.engine_arg_names() == {"model", "max_model_len"}
    fake_modules(monkeypatch, vllm__engine__arg_utils={"EngineArgs": type("EngineArgs", (), {})})
    with pytest.raises(BackendError) as excinfo:
        vllm_compat.engine_arg_names()
    assert_names_version_and_api(excinfo, "vLLM", "0.40.0", "vllm.engine.arg_utils.EngineArgs as a dataclass")


def test_running_engine_without_shutdown_fails_at_start(fake_vllm_version):
    fake_vllm_version("0.40.0")
    core = types.SimpleNamespace(shutdown=lambda: None)
    vllm_compat.check_engine(types.SimpleNamespace(collective_rpc=None, llm_engine=types.SimpleNamespace(engine_core=core)))
    with pytest.raises(BackendError) as excinfo:
        vllm_compat.check_engine(types.SimpleNamespace(collective_rpc=None, llm_engine=types.SimpleNamespace()))
    assert_names_version_and_api(excinfo, "vLLM", "0.40.0", "LLM.llm_engine.engine_core")
    with pytest.raises(BackendError, match="LLM.collective_rpc"):
        vllm_compat.check_engine(types.SimpleNamespace(llm_engine=types.SimpleNamespace(engine_core=core)))


class _Model:
    def compute_logits(self, hidden_states):
        return hidden_states * 2


class _OldModel:
    def compute_logits(self, hidden_states, sampling_metadata):
        return hidden_states


def test_compute_logits_signature_is_checked(fake_vllm_version):
    fake_vllm_version("0.10.0")
    assert vllm_compat.compute_logits(_Model(), 3) == 6
    with pytest.raises(BackendError) as excinfo:
        vllm_compat.compute_logits(_OldModel(), 3)
    assert_names_version_and_api(excinfo, "vLLM", "0.10.0", "_OldModel.compute_logits(hidden_states)")
    assert "sampling_metadata" in str(excinfo.value)


def test_worker_model_prefers_get_model_and_reads_model_explicitly_otherwise(fake_vllm_version):
    fake_vllm_version("0.40.0")
    model, other = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    with_getter = types.SimpleNamespace(model_runner=types.SimpleNamespace(get_model=lambda: model, model=other))
    assert vllm_compat.worker_model(with_getter) is model
    # vllm-ascend's V0-era NPUModelRunner: no get_model(), the model held as .model.
    assert vllm_compat.worker_model(types.SimpleNamespace(model_runner=types.SimpleNamespace(model=other))) is other
    with pytest.raises(BackendError) as excinfo:
        vllm_compat.worker_model(types.SimpleNamespace(model_runner=types.SimpleNamespace()))
    assert_names_version_and_api(excinfo, "vLLM", "0.40.0", "SimpleNamespace.get_model() (nor a .model attribute)")
    with pytest.raises(BackendError, match="Worker.model_runner"):
        vllm_compat.worker_model(types.SimpleNamespace())
    with pytest.raises(BackendError, match="Worker.rank"):
        vllm_compat.worker_rank(types.SimpleNamespace())


def test_vllm_layer_convention_is_checked(fake_vllm_version):
    fake_vllm_version("0.40.0")
    hidden, residual = torch.tensor([1.0, 2.0]), torch.tensor([10.0, 20.0])
    stream = vllm_compat.layer_residual_stream((hidden, residual))
    assert stream.tolist() == [11.0, 22.0] and stream.data_ptr() not in (hidden.data_ptr(), residual.data_ptr())
    with pytest.raises(BackendError) as excinfo:
        vllm_compat.layer_residual_stream(hidden)
    assert_names_version_and_api(excinfo, "vLLM", "0.40.0", "decoder layers returning (hidden_states, residual)")
    assert vllm_compat.final_norm_output((hidden, residual)) is hidden
    assert vllm_compat.final_norm_output(hidden) is hidden
    modules = types.SimpleNamespace(embed_tokens=1, layers=[2], norm=3)
    assert vllm_compat.decoder_modules(types.SimpleNamespace(model=modules)) == (1, [2], 3)
    with pytest.raises(BackendError, match="SimpleNamespace.model.norm"):
        vllm_compat.decoder_modules(types.SimpleNamespace(model=types.SimpleNamespace(embed_tokens=1, layers=[])))


# -- llvmlite's private function table ------------------------------------------------------------------------------
class _Wrapper:
    def get(self):  # not a mapping, whatever it offers
        raise AssertionError


class _Lib:
    """llvmlite 0.47's binding.ffi._lib_wrapper, in small: __getattr__ wraps any name and caches it in _fntab."""

    __slots__ = ["_fntab"]

    def __init__(self):
        self._fntab = {}

    def __getattr__(self, name):
        return self._fntab.setdefault(name, _Wrapper())


class _LibWithoutTable:
    __slots__ = []

    def __getattr__(self, name):
        return _Wrapper()


def test_llvmlite_shield_makes_vars_of_the_library_a_mapping(monkeypatch):
    lib = _Lib()
    monkeypatch.setitem(sys.modules, "llvmlite.binding.ffi", types.SimpleNamespace(lib=lib))
    assert not isinstance(vars(_Lib()), dict)  # the crash the shield prevents: vars() gives a wrapper
    vllm_compat.shield_llvmlite_from_kernel_scan()
    assert vars(lib) == {}
    vllm_compat.shield_llvmlite_from_kernel_scan()  # idempotent
    assert vars(lib) == {}


def test_llvmlite_without_the_table_that_needs_it_raises(monkeypatch):
    monkeypatch.setitem(sys.modules, "llvmlite", types.SimpleNamespace(__version__="0.99.0"))
    monkeypatch.setitem(sys.modules, "llvmlite.binding.ffi", types.SimpleNamespace(lib=_LibWithoutTable()))
    with pytest.raises(BackendError, match=r"llvmlite 0\.99\.0 has no private function table ffi\.lib\._fntab"):
        vllm_compat.shield_llvmlite_from_kernel_scan()


def test_llvmlite_not_loaded_needs_no_shield(monkeypatch):
    monkeypatch.delitem(sys.modules, "llvmlite.binding.ffi", raising=False)
    vllm_compat.shield_llvmlite_from_kernel_scan()


def test_llvmlite_shield_on_the_installed_llvmlite():
    pytest.importorskip("numba")
    from precision.metrics import fused

    fused.available()  # loads numba, hence llvmlite's binding
    ffi = sys.modules.get("llvmlite.binding.ffi")
    if ffi is None:
        pytest.skip("numba did not load llvmlite's binding")
    vllm_compat.shield_llvmlite_from_kernel_scan()
    assert isinstance(vars(ffi.lib), dict)


# -- transformers ------------------------------------------------------------------------------------------------
def test_decoder_layer_return_convention(fake_transformers_version):
    fake_transformers_version("5.19.0")
    hidden = torch.zeros(2)
    assert transformers_compat.layer_hidden_states(hidden) is hidden  # transformers 5
    assert transformers_compat.layer_hidden_states((hidden, None)) is hidden  # 4.x: a tuple led by the states
    with pytest.raises(BackendError) as excinfo:
        transformers_compat.layer_hidden_states({"hidden_states": hidden})
    assert_names_version_and_api(excinfo, "transformers", "5.19.0", "decoder layers returning hidden states")


@pytest.mark.parametrize("version, keyword", [("4.46.0", "torch_dtype"), ("4.57.1", "torch_dtype"), ("5.0.0", "dtype"), ("5.19.0", "dtype")])
def test_from_pretrained_dtype_keyword_by_major_version(fake_transformers_version, version, keyword):
    fake_transformers_version(version)
    assert transformers_compat.dtype_keyword() == keyword


def test_transformers_missing_apis_name_version_and_api(fake_transformers_version):
    fake_transformers_version("6.1.0")
    plain = torch.nn.Linear(2, 2)
    with pytest.raises(BackendError) as excinfo:
        transformers_compat.set_attn_implementation(plain, "eager")
    assert_names_version_and_api(excinfo, "transformers", "6.1.0", "PreTrainedModel.set_attn_implementation")
    with pytest.raises(BackendError) as excinfo:
        transformers_compat.rms_norm_epsilon(plain)
    assert_names_version_and_api(excinfo, "transformers", "6.1.0", "Linear.variance_epsilon")
    with pytest.raises(BackendError) as excinfo:
        transformers_compat.run_decoder_layer(types.SimpleNamespace(model=types.SimpleNamespace(layers=[plain])), 0, torch.zeros(1, 1, 2))
    assert_names_version_and_api(excinfo, "transformers", "6.1.0", "LlamaModel.rotary_emb")


def test_set_attn_implementation_that_does_not_switch_raises(fake_transformers_version):
    fake_transformers_version("6.1.0")
    model = types.SimpleNamespace(config=types.SimpleNamespace(_attn_implementation="sdpa"), set_attn_implementation=lambda _name: None)
    with pytest.raises(BackendError, match="the model still runs 'sdpa'"):
        transformers_compat.set_attn_implementation(model, "eager")


def test_forward_replacement_refuses_modules_that_bypass_forward(fake_transformers_version):
    fake_transformers_version("6.1.0")

    class Bypass(torch.nn.Module):
        def __call__(self, x):
            return x

    with pytest.raises(BackendError, match="Bypass.__call__ dispatching to self.forward"):
        transformers_compat.replace_forward(Bypass(), lambda self, x: x + 1)
    linear = torch.nn.Linear(2, 2)
    transformers_compat.replace_forward(linear, lambda self, x: x + 1)
    assert linear(torch.zeros(2)).tolist() == [1.0, 1.0]


# -- the installed engines pass every check ----------------------------------------------------------------------------
def test_installed_transformers_passes_every_check(caplog):
    with caplog.at_level(logging.WARNING, logger=compat.__name__):
        checked = transformers_compat.check_all()
    assert not caplog.records
    assert "decoder layer return convention" in checked and "instance forward replacement" in checked


@requires_vllm
@pytest.mark.vllm
def test_installed_vllm_passes_every_check(caplog):
    with caplog.at_level(logging.WARNING, logger=compat.__name__):
        checked = vllm_compat.check_all()
    # precision's own warnings only: importing vLLM logs torch's and vLLM's (e.g. "Triton not available" when the
    # test runs alone), which say nothing about the compat checks.
    assert not [r for r in caplog.records if r.name.startswith("precision")]
    assert "LlamaForCausalLM.compute_logits(hidden_states)" in checked
    assert "vllm.v1.attention.backends.cpu_attn.CPUAttentionBackend.get_supported_head_sizes" in checked


# -- nothing else reaches the engines' internals ---------------------------------------------------------------------
VLLM_COMPAT = "precision/backends/vllm_compat.py"
TRANSFORMERS_COMPAT = "precision/backends/transformers_compat.py"
ENGINE_PACKAGES = {"vllm": VLLM_COMPAT, "vllm_ascend": VLLM_COMPAT, "llvmlite": VLLM_COMPAT}
"""Top-level packages only the named module may import at all."""
PUBLIC_SUBMODULES = {"llvmlite.ir": ("precision/metrics/bits.py",)}
"""Public submodules of those packages that other named modules may import: llvmlite's IR builder, in which numba
intrinsics are written (the compiled compare kernels), is public API; llvmlite's binding is what vllm_compat shields."""
COMPAT_OWNED = {**{n: VLLM_COMPAT for n in vllm_compat.VERSION_DEPENDENT_NAMES},
                **{n: TRANSFORMERS_COMPAT for n in transformers_compat.VERSION_DEPENDENT_NAMES}}
MODEL_CALLING = ("precision/backends/", "precision/analysis/")
"""Where transformers may not be imported at all except through transformers_compat; elsewhere (the tokenizer,
the built-in model's builder) only its public top level may be."""


def compat_violations(relative: str, source: str) -> list[str]:
    """Why ``source`` (the module at ``relative``) breaks the rule; empty when it keeps it.

    The rule: vLLM, vllm-ascend and llvmlite are imported only by vllm_compat; transformers' submodules
    (``transformers.x.y``) only by transformers_compat, and in the model-calling packages (backends, analysis)
    transformers itself only by it; the attribute and keyword names of the private or version-dependent APIs
    (each compat module's VERSION_DEPENDENT_NAMES) are spelled only in their compat module, except as
    ``<compat module>.<function>``."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        modules, names = [], []
        if isinstance(node, ast.Import):
            modules = names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules, names = [node.module], [f"{node.module}.{alias.name}" for alias in node.names]
        for module in modules:
            top = module.split(".")[0]
            public = all(relative in PUBLIC_SUBMODULES.get(name, ()) for name in names)
            if top in ENGINE_PACKAGES and relative != ENGINE_PACKAGES[top] and not public:
                problems.append(f"line {node.lineno}: imports {module} (only {ENGINE_PACKAGES[top]} may)")
            if top == "transformers" and relative != TRANSFORMERS_COMPAT and ("." in module or relative.startswith(MODEL_CALLING)):
                problems.append(f"line {node.lineno}: imports {module} (only {TRANSFORMERS_COMPAT} may)")
        if isinstance(node, ast.Attribute) and COMPAT_OWNED.get(node.attr, relative) != relative:
            owner = node.value.id if isinstance(node.value, ast.Name) else None
            if owner not in ("vllm_compat", "transformers_compat"):
                problems.append(f"line {node.lineno}: uses .{node.attr} (only {COMPAT_OWNED[node.attr]} may)")
        if isinstance(node, ast.keyword) and node.arg and COMPAT_OWNED.get(node.arg, relative) != relative:
            problems.append(f"keyword {node.arg}= (only {COMPAT_OWNED[node.arg]} may)")
    return problems


def package_modules() -> list[tuple[str, str]]:
    return [(path.relative_to(REPO).as_posix(), path.read_text(encoding="utf-8")) for path in sorted(PACKAGE.rglob("*.py"))]


def test_only_the_compat_modules_reach_engine_internals():
    found = {relative: problems for relative, source in package_modules() if (problems := compat_violations(relative, source))}
    assert not found, found


@pytest.mark.parametrize("relative, source, expected", [
    ("precision/pipeline.py", "import vllm\n", "imports vllm"),
    ("precision/backends/vllm.py", "from vllm.platforms import current_platform\n", "imports vllm.platforms"),
    ("precision/backends/vllm_worker.py", "import llvmlite.binding\n", "imports llvmlite.binding"),
    ("precision/backends/hf.py", "from transformers import GenerationConfig\n", "imports transformers"),
    ("precision/tokenizer.py", "from transformers.models.llama import modeling_llama\n", "imports transformers.models.llama"),
    ("precision/backends/vllm_worker.py", "model = self.model_runner.get_model()\n", "uses .get_model"),
    ("precision/analysis/replay.py", "e = decoder.rotary_emb(x, p)\n", "uses .rotary_emb"),
    ("precision/backends/hf.py", "f(path, torch_dtype=d)\n", "keyword torch_dtype="),
    ("precision/backends/variants.py", "model.set_attn_implementation('eager')\n", "uses .set_attn_implementation"),
])
def test_the_rule_catches_each_kind_of_violation(relative, source, expected):
    problems = compat_violations(relative, source)
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize("relative, source", [
    (VLLM_COMPAT, "from vllm.platforms import current_platform\nx = runner.get_model()\n"),
    (TRANSFORMERS_COMPAT, "from transformers.models.llama import modeling_llama\nm.set_attn_implementation('eager')\n"),
    ("precision/tokenizer.py", "from transformers import AutoTokenizer\n"),
    ("precision/backends/vllm_worker.py", "logits = vllm_compat.compute_logits(model, rows)\n"),
])
def test_the_rule_allows_what_it_should(relative, source):
    assert compat_violations(relative, source) == []


# -- site names come from precision.names ------------------------------------------------------------------------------
SPELLED_NAMES = {*names.SITE_NAMES, names.LAYER_PREFIX, *names.METRIC_NAMES}
OWN_FILES = {"precision/backends": SPELLED_NAMES | {names.POSITIONS}, "precision/analysis/replay.py": SPELLED_NAMES}
"""replay.py also reads the manifest's selection key "positions" (spelled by capture.sites.CaptureSelection.to_json),
a document field that shares the tensor name's spelling, so the tensor name is checked in the backends only."""


def literal_names(source: str, spelled: set[str]) -> list[str]:
    return [node.value for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in spelled]


def test_backends_and_replay_spell_site_and_metric_names_through_precision_names():
    found = {}
    for entry, spelled in OWN_FILES.items():
        files = sorted((REPO / entry).rglob("*.py")) if (REPO / entry).is_dir() else [REPO / entry]
        found.update({p.relative_to(REPO).as_posix(): hits for p in files if (hits := literal_names(p.read_text(encoding="utf-8"), spelled))})
    assert not found, found
    assert sorted(literal_names('s = f"layer.{i}"\nt = "logits"\n', SPELLED_NAMES)) == ["layer.", "logits"]  # sees both forms


def test_compat_modules_stay_small():
    for relative in (VLLM_COMPAT, TRANSFORMERS_COMPAT, "precision/backends/compat.py"):
        assert len(Path(REPO / relative).read_text().splitlines()) < 400, relative
