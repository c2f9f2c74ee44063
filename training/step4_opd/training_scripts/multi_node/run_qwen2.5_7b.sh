#!/usr/bin/env bash
# opd, Qwen2.5-7B-Instruct student taught by an open teacher TEACHER (required; same tokenizer, e.g.
# Qwen/Qwen2.5-72B-Instruct) on several nodes (HOSTFILE, MASTER_ADDR): ZeRO-3; output_dir must be on storage every node sees.
# Batch geometry and lengths are the GAD recipe's; sampling at T = 1 and no reference (the opd defaults).
ROOT=$(cd "$(dirname "$0")/../../../.." && pwd)
exec "$ROOT/training/launch.sh" opd multi_node --config "$ROOT/configs/qwen2.5-7b/gad.yaml" \
  --model.actor_path "${ACTOR:-Qwen/Qwen2.5-7B-Instruct}" --model.teacher_path "${TEACHER:?set TEACHER to the teacher model}" \
  --trainer.output_dir "${OUTPUT:-$ROOT/outputs/qwen2.5-7b/opd}" --rollout.temperature 1.0 --actor.kl_coef 0 "$@"
