#!/usr/bin/env bash
# seqkd, Qwen2.5-7B-Instruct student on one node of NUM_GPUS (default 8) GPUs: ZeRO-3, the published recipe.
ROOT=$(cd "$(dirname "$0")/../../../.." && pwd)
exec "$ROOT/training/launch.sh" seqkd single_node --config "$ROOT/configs/qwen2.5-7b/seqkd.yaml" \
  --model.actor_path "${ACTOR:-Qwen/Qwen2.5-7B-Instruct}" --trainer.output_dir "${OUTPUT:-$ROOT/outputs/qwen2.5-7b/seqkd}" "$@"
