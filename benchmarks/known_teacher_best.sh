#!/usr/bin/env bash
# The known-teacher main comparison (issue 17): from SeqKD's best checkpoint per seed (validation forward
# NLL), 60 more actor steps of SFT (seqkd_more), published GAD, the black-box per-token stages (gad_lr,
# spin) and white-box opd, 3 seeds; the table (with each arm's actor and total model updates), the goal
# checks and the plots are stored as a section of RESULTS.md. Extra arguments go to
# applications/known_teacher.py (flags after `--` to every stage).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_cpu.sh
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
exec python -m applications.known_teacher --protocol best --seeds 42 43 44 --output-dir outputs/kt_best \
  --record best --title "the main comparison from SeqKD's best checkpoint, 3 seeds" "$@"
