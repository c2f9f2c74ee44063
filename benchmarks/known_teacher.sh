#!/usr/bin/env bash
# The known-teacher quality benchmark (issue 9): untrained student, SeqKD, warm-up, warm-up + GAD and
# GAD with a frozen discriminator, 3 seeds, on the teacher built here (builtin:kt-teacher), with the
# teacher-likelihood metrics, the goal checks and the plots; stored as a section of RESULTS.md.
# Extra arguments go to applications/known_teacher.py (flags after `--` to every stage).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_cpu.sh
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
exec python -m applications.known_teacher --seeds 42 43 44 --output-dir outputs/known_teacher \
  --record main --title "the published method on the CPU recipe, 3 seeds" "$@"
