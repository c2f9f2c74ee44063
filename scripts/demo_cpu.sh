#!/usr/bin/env bash
# Set up the CPU environment if needed, then run the main job on its embedded CPU default: distil a
# known teacher (builtin:kt-teacher, a small model shipped with the package) into a tiny student
# through the real stages (SeqKD baseline, GAD warm-up, GAD, and SPIN, the best black-box arm from
# the start; DeepSpeed ZeRO-3 on 2 ranks, vLLM rollouts), training on the teacher's sampled text
# only, then print per stage the metrics that read the teacher's exact likelihoods beside ROUGE-L,
# and write the plots.
# Extra arguments go to applications/known_teacher.py. For a real student and the shipped GPT-4o
# data use applications/run_pipeline.py (README).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_cpu.sh
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
exec python -m applications.known_teacher --seeds 42 --arms start,seqkd,warmup,gad,spin --output-dir outputs/demo "$@"
