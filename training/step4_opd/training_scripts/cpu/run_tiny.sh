#!/usr/bin/env bash
# opd on this CPU: the known-teacher pair (student builtin:kt-student, teacher builtin:kt-teacher, built and
# cached on first use; or ACTOR=path TEACHER=path sharing a tokenizer), shipped prompts, NUM_PROCS ranks (default 2).
ROOT=$(cd "$(dirname "$0")/../../../.." && pwd)
exec "$ROOT/training/launch.sh" opd cpu --config "$ROOT/configs/cpu_tiny.yaml" \
  --model.actor_path "${ACTOR:-builtin:kt-student}" --model.teacher_path "${TEACHER:-builtin:kt-teacher}" \
  --trainer.output_dir "${OUTPUT:-$ROOT/outputs/cpu_tiny/opd}" --rollout.temperature 1.0 "$@"
