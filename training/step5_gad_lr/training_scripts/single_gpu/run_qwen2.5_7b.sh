#!/usr/bin/env bash
# gad_lr, Qwen2.5-7B-Instruct student on one 80 GB GPU: ZeRO-3 with parameters and optimizer offloaded to CPU.
# Starts from a SeqKD (or warm-up) run (INIT_FROM); the discriminator q is a second 7B causal LM.
ROOT=$(cd "$(dirname "$0")/../../../.." && pwd)
exec "$ROOT/training/launch.sh" gad_lr single_gpu --config "$ROOT/configs/qwen2.5-7b/gad_lr.yaml" \
  --model.actor_path "${ACTOR:-Qwen/Qwen2.5-7B-Instruct}" \
  --trainer.output_dir "${OUTPUT:-$ROOT/outputs/qwen2.5-7b/gad_lr}" \
  --deepspeed.offload_optimizer true --deepspeed.offload_param true --rollout.vllm_gpu_memory_utilization 0.3 "$@"
