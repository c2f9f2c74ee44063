#!/usr/bin/env bash
# opd, Qwen2.5-7B-Instruct student taught by an open teacher TEACHER (required; same tokenizer, e.g.
# Qwen/Qwen2.5-72B-Instruct) on one 80 GB GPU: ZeRO-3 with parameters and optimizer offloaded to CPU.
# Batch geometry and lengths are the GAD recipe's; sampling at T = 1 and no reference (the opd defaults).
ROOT=$(cd "$(dirname "$0")/../../../.." && pwd)
exec "$ROOT/training/launch.sh" opd single_gpu --config "$ROOT/configs/qwen2.5-7b/gad.yaml" \
  --model.actor_path "${ACTOR:-Qwen/Qwen2.5-7B-Instruct}" --model.teacher_path "${TEACHER:?set TEACHER to the teacher model}" \
  --trainer.output_dir "${OUTPUT:-$ROOT/outputs/qwen2.5-7b/opd}" --rollout.temperature 1.0 --actor.kl_coef 0 \
  --deepspeed.offload_optimizer true --deepspeed.offload_param true --rollout.vllm_gpu_memory_utilization 0.3 "$@"
