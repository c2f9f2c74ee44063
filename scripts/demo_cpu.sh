#!/usr/bin/env bash
# Set up the CPU environment if needed, then run the main job on its embedded CPU default: warm-up
# then GAD (and the SeqKD baseline) on a tiny student built on the spot and the shipped GPT-4o
# teacher data, ending with a table per stage. Extra arguments go to applications/run_pipeline.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_cpu.sh
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
exec python -m applications.run_pipeline --with-seqkd "$@"
