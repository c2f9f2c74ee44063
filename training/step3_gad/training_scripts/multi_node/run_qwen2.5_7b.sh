#!/usr/bin/env bash
# gad, Qwen2.5-7B-Instruct student on several nodes (HOSTFILE, MASTER_ADDR): ZeRO-3, the published recipe;
# output_dir must be on storage every node sees.
ROOT=$(cd "$(dirname "$0")/../../../.." && pwd)
exec "$ROOT/training/launch.sh" gad multi_node --config "$ROOT/configs/qwen2.5-7b/gad.yaml" \
  --model.actor_path "${ACTOR:-Qwen/Qwen2.5-7B-Instruct}" --trainer.output_dir "${OUTPUT:-$ROOT/outputs/qwen2.5-7b/gad}" "$@"
