"""Measurement 8: the GPU rows. On a machine with a GPU this runs the GPU measurements below and
records them; without one it records the section as not measured, with the exact commands.

    python benchmarks/gpu_rows.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

COMMANDS = [
    ("phase breakdown, tiny default on one GPU (bf16, vLLM on GPU)", "python benchmarks/bench_phases.py"),
    ("rollout backends, ~26M model, vLLM vs HF generate", "python benchmarks/bench_rollout.py --reps 5"),
    ("rollout backends at real size (needs the hub)", "python benchmarks/bench_rollout.py --model Qwen/Qwen2.5-0.5B-Instruct --max-new-tokens 512"),
    ("teacher dedup", "python benchmarks/bench_teacher_dedup.py"),
    ("GAD step, 1 GPU, ZeRO-3, Qwen2.5-0.5B (weight sync share: time/weight_sync / time/step in metrics.jsonl)",
     "deepspeed --num_gpus 1 training/step3_gad/main.py --config configs/cpu_tiny.yaml --model.actor_path "
     "Qwen/Qwen2.5-0.5B-Instruct --rollout.max_new_tokens 512 --trainer.max_steps 6 --trainer.output_dir outputs/bench_gpu"),
    ("vs TRL on GPU: TRL venv with a CUDA torch and vllm (not setup_trl_env.sh, which is CPU-only)",
     "TRL_VENV=/path/to/cuda-trl-venv python benchmarks/compare_trl.py"),
    ("GPU check (issue 11): flash-attn on/off, bf16, vLLM on CUDA, sleep mode, HF backend, GAD steps on a random "
     "Qwen2.5-0.5B shape, time and peak GPU memory per phase (its own section 12)", "bash benchmarks/gpu_check.sh"),
]


def main():
    rows = [[what, f"`{cmd}`", "not measured: no GPU lent to this task"] for what, cmd in COMMANDS]
    if common.has_gpu():
        for row, (_, cmd) in zip(rows, COMMANDS[:4]):
            rc = subprocess.run(cmd, shell=True, cwd=common.ROOT).returncode
            row[2] = f"ran (rc={rc}); its figures are in its own section"
    common.save_result("8_gpu", {
        "title": "8. GPU rows",
        "description": "GPU measurements: run these on a machine with a GPU. The scripts pick the GPU by themselves "
                       "(bf16, vLLM on the GPU, DeepSpeed's CUDA accelerator).",
        "table": {"columns": ["measurement", "command", "status"], "rows": rows},
    }, command="python benchmarks/gpu_rows.py")
    for row in rows:
        print(" | ".join(row))


if __name__ == "__main__":
    main()
