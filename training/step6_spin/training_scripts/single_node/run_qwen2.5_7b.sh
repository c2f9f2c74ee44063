#!/usr/bin/env bash
# spin, Qwen2.5-7B-Instruct student on one node of NUM_GPUS (default 8) GPUs: ZeRO-3.
# Starts from a SeqKD run (INIT_FROM); the reference is its start (or refreshed: --actor.reference_refresh_every K).
ROOT=$(cd "$(dirname "$0")/../../../.." && pwd)
exec "$ROOT/training/launch.sh" spin single_node --config "$ROOT/configs/qwen2.5-7b/spin.yaml" \
  --model.actor_path "${ACTOR:-Qwen/Qwen2.5-7B-Instruct}" \
  --trainer.output_dir "${OUTPUT:-$ROOT/outputs/qwen2.5-7b/spin}" "$@"
