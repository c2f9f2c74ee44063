#!/usr/bin/env bash
# spin on this CPU: tiny student built on the spot (or ACTOR=path, or INIT_FROM=a finished SeqKD run's output
# folder), shipped teacher data, NUM_PROCS ranks (default 2).
ROOT=$(cd "$(dirname "$0")/../../../.." && pwd)
exec "$ROOT/training/launch.sh" spin cpu --config "$ROOT/configs/cpu_tiny.yaml" \
  --model.actor_path "${ACTOR:-builtin:tiny}" \
  --trainer.output_dir "${OUTPUT:-$ROOT/outputs/cpu_tiny/spin}" "$@"
