#!/usr/bin/env bash
# seqkd, Qwen2.5-7B-Instruct student with LoRA (rank LORA_RANK, default 16) on ONE 80 GB GPU, no offload:
# the frozen bf16 base weights plus adapters and their Adam states; the reference is the actor with its
# adapter off (README "LoRA" has the memory arithmetic). LoRA takes a larger learning rate than full
# fine-tuning (1e-5 here vs the published 1e-6; not tuned by us: set ACTOR_LR / DISC_LR).
ROOT=$(cd "$(dirname "$0")/../../../.." && pwd)
exec "$ROOT/training/launch.sh" seqkd single_gpu --config "$ROOT/configs/qwen2.5-7b/seqkd.yaml" \
  --model.actor_path "${ACTOR:-Qwen/Qwen2.5-7B-Instruct}" --trainer.output_dir "${OUTPUT:-$ROOT/outputs/qwen2.5-7b-lora/seqkd}" \
  --actor.lora_rank "${LORA_RANK:-16}" --actor.lr "${ACTOR_LR:-1e-5}" --rollout.vllm_gpu_memory_utilization 0.3 "$@"
