#!/usr/bin/env bash
# The known-teacher quality benchmark from the start (issues 9 and 17): the untrained student, then at
# equal actor steps SeqKD, warm-up, warm-up + GAD, GAD with a frozen discriminator, white-box opd and the
# black-box gad_lr and spin, 3 seeds, on the shipped teacher (builtin:kt-teacher), with the
# teacher-likelihood metrics, the goal checks and the plots; stored as a section of RESULTS.md.
# Extra arguments go to applications/known_teacher.py (flags after `--` to every stage).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_cpu.sh
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
exec python -m applications.known_teacher --protocol start --seeds 42 43 44 --output-dir outputs/kt_start \
  --record main --title "every arm from the start student at equal actor steps, 3 seeds" "$@"
