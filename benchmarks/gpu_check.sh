#!/usr/bin/env bash
# GPU check (issue 11 item 6). UNRUN so far: written on a machine without a GPU; run it as is on one:
#
#   pip install -r requirements-gpu.txt            # CUDA vLLM + its torch; optional: pip install flash-attn --no-build-isolation
#   bash benchmarks/gpu_check.sh                   # ~10-20 min on one H100; WORK=dir to choose the scratch folder
#
# On one GPU, bf16, ZeRO-3, with a random Qwen2.5-0.5B-shaped student (151,936 vocab, built on the
# spot, no hub): a warm-up step, then GAD steps with flash-attention on and off, vLLM on CUDA with and
# without sleep mode, the HF rollout backend, gradient checkpointing off, and the plain full-logits
# log-probs. Every run checks the weight push (--trainer.verify_rollout_sync) and logs the time and
# the peak GPU memory of each phase (mem/<phase>_peak_gib); the summary is section 10 of
# benchmarks/RESULTS.md. A run that fails is recorded with its exit code and the script goes on.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python}
WORK=${WORK:-$ROOT/outputs/gpu_check}
MODEL=$WORK/model
mkdir -p "$WORK"
export TOKENIZERS_PARALLELISM=false PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

$PY benchmarks/gpu_check.py env | tee "$WORK/env.json" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$WORK/nvidia-smi.txt"
$PY benchmarks/gpu_check.py build "$MODEL" || exit 1
FLASH=$($PY -c 'import importlib.util; print("flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa")')

COMMON=(--model.actor_path "$MODEL" --model.dtype bfloat16 --model.gradient_checkpointing true
        --deepspeed.zero_stage 3 --data.max_prompt_tokens 1024 --data.max_response_tokens 1024
        --trainer.prompts_per_step 16 --rollout.n 8 --rollout.max_new_tokens 512 --rollout.temperature 0.8
        --actor.micro_batch_size 8 --discriminator.micro_batch_prompts 2 --actor.lr 1e-6 --discriminator.lr 1e-6
        --rollout.vllm_gpu_memory_utilization 0.3 --trainer.verify_rollout_sync true
        --trainer.progress_bar false --trainer.tensorboard false --trainer.export_hf false)
RUNS=()

run() {  # run NAME STAGE [flags...]: one stage, 1 GPU, exit code recorded, output in $WORK/NAME
  local name=$1 stage=$2; shift 2
  rm -rf "${WORK:?}/$name"
  echo "=== $name ($stage) $*"
  deepspeed --num_gpus 1 --master_port "$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')" \
    "training/step$([ "$stage" = warmup ] && echo 2_warmup || echo 3_gad)/main.py" \
    "${COMMON[@]}" --trainer.output_dir "$WORK/$name" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  echo "    rc=$rc (log: $WORK/$name.log)"
  tail -n 3 "$WORK/$name/metrics.jsonl" 2>/dev/null | cut -c1-400
  RUNS+=("$name=$rc")
}

# The warm-up exports its final actor and discriminator for the GAD runs (export on for it alone).
run warmup_flash warmup --model.attn_implementation "$FLASH" --trainer.max_steps 2 --trainer.discriminator_warmup 0 \
    --trainer.export_hf true
INIT=(--trainer.init_from "$WORK/warmup_flash" --trainer.max_steps 3)
run gad_flash_vllm gad --model.attn_implementation "$FLASH" "${INIT[@]}"
run gad_sdpa_vllm gad --model.attn_implementation sdpa "${INIT[@]}"
run gad_flash_vllm_sleep gad --model.attn_implementation "$FLASH" --rollout.vllm_sleep true "${INIT[@]}"
run gad_flash_hf gad --model.attn_implementation "$FLASH" --rollout.backend hf "${INIT[@]}"
run gad_flash_vllm_nockpt gad --model.attn_implementation "$FLASH" --model.gradient_checkpointing false "${INIT[@]}"
run gad_flash_vllm_plainlp gad --model.attn_implementation "$FLASH" --actor.logprob_chunk_tokens 0 "${INIT[@]}"

$PY benchmarks/gpu_check.py report "$WORK" "${RUNS[@]}"
echo "summary: section 10 of benchmarks/RESULTS.md; per-run logs and metrics under $WORK"
