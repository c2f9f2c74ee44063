#!/usr/bin/env bash
# warmup, Qwen2.5-7B-Instruct student with LoRA (rank LORA_RANK, default 16) on one node of NUM_GPUS (default 4)
# GPUs, ZeRO-3: the bases are partitioned over the GPUs, the adapters train; no reference model. LoRA's
# learning rate is 1e-5 here vs the published 1e-6 for full fine-tuning (not tuned by us: ACTOR_LR / DISC_LR).
ROOT=$(cd "$(dirname "$0")/../../../.." && pwd)
export NUM_GPUS=${NUM_GPUS:-4}
exec "$ROOT/training/launch.sh" warmup single_node --config "$ROOT/configs/qwen2.5-7b/warmup.yaml" \
  --model.actor_path "${ACTOR:-Qwen/Qwen2.5-7B-Instruct}" --trainer.output_dir "${OUTPUT:-$ROOT/outputs/qwen2.5-7b-lora/warmup}" \
  --actor.lora_rank "${LORA_RANK:-16}" --actor.lr "${ACTOR_LR:-1e-5}" --discriminator.lora_rank "${LORA_RANK:-16}" --discriminator.lr "${DISC_LR:-1e-5}" "$@"
