#!/usr/bin/env bash
# GPU check (issue 11 item 6): the engine on one CUDA GPU, bf16, ZeRO-3, with a random
# Qwen2.5-0.5B-shaped student (151,936 vocab, built on the spot, no hub).
#
#   pip install -r requirements-gpu.txt            # CUDA vLLM + its torch; optional: pip install flash-attn --no-build-isolation
#   bash benchmarks/gpu_check.sh                   # WORK=dir for the scratch folder; RUN_TIMEOUT=s per run (300)
#
# Runs, in order of importance (each one stage under the deepspeed launcher, 1 GPU, its own
# timeout RUN_TIMEOUT, exit code recorded; a failed run does not stop the others):
#   warmup         one warm-up step (discriminator + gated SFT), exported for the GAD runs
#   gad            GAD steps: training mode + gradient checkpointing + chunked log-probs, SDPA
#   gad_lora       the same with LoRA r=16 on the actor and the discriminator, the reference the actor
#                  with its adapter off, an actor EMA (issue 19: memory and time against gad)
#   gad_lr, spin   the black-box per-token stages (issue 17) from the same warm-up
#   gad_pergather  HF generate with the ZeRO-3 weights gathered per layer at every token (the engine
#                  before rollout.hf_gather_weights; 40 s of a 50 s step on an H200, RESULTS.md 12)
#   gad_nockpt     the same with gradient checkpointing off       (memory share of item 1)
#   gad_plainlp    the same with full-vocabulary log-probs        (memory share of item 2)
#   gad_eager      the same with eager attention instead of SDPA  (fused attention kernels off)
#   gad_tokens     token-budget micro-batches (item 3) instead of fixed rows
#   gad_flash      attn flash_attention_2        (only where the flash-attn package is installed)
#   gad_vllm, gad_vllm_sleep, gad_vllm_lora   vLLM on CUDA with the weight-push check (LoRA: the
#                  merged push; only where vLLM is installed)
# Every run logs the time and the peak GPU memory of each phase (mem/<phase>_peak_gib); the summary
# is section 12 of benchmarks/RESULTS.md. Runs whose package is missing are listed as skipped.
# CPU dry run of the script itself (tiny model, no GPU): GPU_CHECK_CPU=1 bash benchmarks/gpu_check.sh
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
WORK=${WORK:-$ROOT/outputs/gpu_check}
MODEL=$WORK/model
RUN_TIMEOUT=${RUN_TIMEOUT:-300}
GAD_STEPS=${GAD_STEPS:-2}
mkdir -p "$WORK"
export TOKENIZERS_PARALLELISM=false PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

$PY benchmarks/gpu_check.py env > "$WORK/env.out" || { cat "$WORK/env.out"; exit 1; }
grep '^{' "$WORK/env.out" | tee "$WORK/env.json"
if [ -z "${GPU_CHECK_CPU:-}" ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$WORK/nvidia-smi.txt"
fi
$PY benchmarks/gpu_check.py build "$MODEL" || exit 1
has() { $PY -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"; }

COMMON=(--model.actor_path "$MODEL" --model.dtype bfloat16 --model.gradient_checkpointing true
        --model.attn_implementation sdpa --deepspeed.zero_stage 3
        --data.max_prompt_tokens 512 --data.max_response_tokens 1024
        --trainer.prompts_per_step "${PROMPTS:-8}" --rollout.n 8 --rollout.max_new_tokens "${NEW_TOKENS:-256}"
        --rollout.temperature 0.8 --rollout.backend hf
        --actor.micro_batch_size 8 --discriminator.micro_batch_prompts 2 --actor.lr 1e-6 --discriminator.lr 1e-6
        --rollout.vllm_gpu_memory_utilization 0.3
        --trainer.progress_bar false --trainer.tensorboard false --trainer.export_hf false)
RUNS=()

run() {  # run NAME STAGE [flags...]: one stage, 1 GPU, exit code recorded, output in $WORK/NAME
  local name=$1 stage=$2 main; shift 2
  rm -rf "${WORK:?}/$name"
  main=$($PY -m gadchat.stages "$stage") || exit 2
  echo "=== $name ($stage) $*  [$(date +%T)]"
  timeout -k 10 "$RUN_TIMEOUT" deepspeed --num_gpus 1 --master_port "$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')" \
    "$main" "${COMMON[@]}" --trainer.output_dir "$WORK/$name" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  echo "    rc=$rc (log: $WORK/$name.log)"
  [ "$rc" = 0 ] || grep -E "Error|error:|Traceback" "$WORK/$name.log" | tail -n 5
  RUNS+=("$name=$rc")
  return "$rc"
}
skip() { echo "=== $1 skipped: $2"; RUNS+=("$1=skipped: $2"); }

# The warm-up exports its final actor and discriminator for the GAD runs (export on for it alone).
if run warmup warmup --trainer.max_steps 1 --trainer.discriminator_warmup 0 --trainer.export_hf true; then
  INIT=(--trainer.init_from "$WORK/warmup" --trainer.max_steps "$GAD_STEPS")
  run gad gad "${INIT[@]}"
  LORA=(--actor.lora_rank 16 --discriminator.lora_rank 16 --actor.lr 1e-5 --discriminator.lr 1e-5 --actor.ema_decay 0.992)
  run gad_lora gad "${LORA[@]}" "${INIT[@]}"
  run gad_lr gad_lr "${INIT[@]}"
  run spin spin "${INIT[@]}"
  run gad_pergather gad --rollout.hf_gather_weights false "${INIT[@]}"
  run gad_nockpt gad --model.gradient_checkpointing false "${INIT[@]}"
  run gad_plainlp gad --actor.logprob_chunk_tokens 0 "${INIT[@]}"
  run gad_eager gad --model.attn_implementation eager "${INIT[@]}"
  run gad_tokens gad --actor.micro_batch_tokens 16384 --discriminator.micro_batch_tokens 32768 "${INIT[@]}"
  if has flash_attn; then run gad_flash gad --model.attn_implementation flash_attention_2 "${INIT[@]}"
  else skip gad_flash "flash-attn not installed"; fi
  if has vllm; then
    VLLM=(--rollout.backend vllm --trainer.verify_rollout_sync true)
    run gad_vllm gad "${VLLM[@]}" "${INIT[@]}"
    run gad_vllm_sleep gad "${VLLM[@]}" --rollout.vllm_sleep true "${INIT[@]}"
    run gad_vllm_lora gad "${VLLM[@]}" "${LORA[@]}" "${INIT[@]}"
  else for name in gad_vllm gad_vllm_sleep gad_vllm_lora; do skip "$name" "vllm not installed"; done; fi
fi

$PY benchmarks/gpu_check.py report "$WORK" "${RUNS[@]}"
echo "summary: section 12 of benchmarks/RESULTS.md; per-run logs and metrics under $WORK"
