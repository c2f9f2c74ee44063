#!/usr/bin/env bash
# spin, Qwen2.5-7B-Instruct student on one 80 GB GPU: ZeRO-3 with parameters and optimizer offloaded to CPU.
# Starts from a SeqKD run (INIT_FROM); the reference is its start (or refreshed: --actor.reference_refresh_every K).
ROOT=$(cd "$(dirname "$0")/../../../.." && pwd)
exec "$ROOT/training/launch.sh" spin single_gpu --config "$ROOT/configs/qwen2.5-7b/spin.yaml" \
  --model.actor_path "${ACTOR:-Qwen/Qwen2.5-7B-Instruct}" \
  --trainer.output_dir "${OUTPUT:-$ROOT/outputs/qwen2.5-7b/spin}" \
  --deepspeed.offload_optimizer true --deepspeed.offload_param true --rollout.vllm_gpu_memory_utilization 0.3 "$@"
