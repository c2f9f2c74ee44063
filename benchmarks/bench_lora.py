"""LoRA vs full fine-tuning on the same GAD work (issue 19): trainable parameters and optimizer state,
peak memory of the whole stage process (actor + discriminator + reference, the rollout on the actor
itself), and seconds per GAD step, one run each inside one invocation; then the same arithmetic for
Qwen2.5-7B.

Model: the Qwen2.5-shaped random model of ``bench_logprob_memory.py`` (vocab 151,936, hidden 896,
intermediate 4864, 14 heads, 2 KV heads, 2 layers, tied embeddings, fp32: 166M parameters) saved
with the tiny tokenizer (the samples use its first ids). Each variant runs ``training/step3_gad``
in its own process (1 rank, ZeRO-3, ``rollout.backend hf``, n 4, 4 prompts x 32 new tokens per
step, k3 KL on, 6 steps); the process's peak RSS (``VmHWM``) is read at exit. Seconds per step
are the median of steps 2..6. Trainable parameters are counted on the built models; the optimizer
state is 3 fp32 numbers per trainable parameter (ZeRO's fp32 master copy and Adam's two moments)
and 16 bytes per trainable parameter with bf16 weights and gradients on a GPU.

Usage: python benchmarks/bench_lora.py [--rank 16] [--steps 6] [--no-save]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402
from benchmarks.bench_logprob_memory import QWEN25_SHAPE  # noqa: E402

# Qwen2.5-7B-Instruct's config.json (the published shape)
QWEN25_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_numel(shape: dict, rank: int) -> int:
    """r x (in + out) summed over the attention and MLP projections of every layer."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    kv = shape["num_key_value_heads"] * (h // shape["num_attention_heads"])
    return rank * shape["num_hidden_layers"] * ((h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h))


def model_numel(shape: dict) -> int:
    h, i, v, n = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"], shape["num_hidden_layers"]
    kv = shape["num_key_value_heads"] * (h // shape["num_attention_heads"])
    per_layer = h * h + h + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h  # q(+b), k, v(+b), o, mlp, 2 norms
    return v * h * (1 if shape["tie_word_embeddings"] else 2) + n * per_layer + h


def build_model(folder: Path) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from gadchat.models import resolve_model_path

    tiny = Path(resolve_model_path("builtin:tiny"))
    torch.manual_seed(0)
    config = Qwen2Config(**QWEN25_SHAPE, max_position_embeddings=4096, use_cache=False)
    Qwen2ForCausalLM(config).float().save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (tiny / name).exists():
            shutil.copy(tiny / name, folder / name)
    gen = json.loads((folder / "generation_config.json").read_text())
    config_json = json.loads((folder / "config.json").read_text())
    config_json.update(eos_token_id=gen.get("eos_token_id"), pad_token_id=gen.get("pad_token_id"))
    (folder / "config.json").write_text(json.dumps(config_json, indent=2))


def run_stage(model: Path, out: Path, rank: int, steps: int) -> dict:
    flags = ["--config", "configs/cpu_tiny.yaml", "--model.actor_path", str(model), "--trainer.output_dir", str(out),
             "--trainer.progress_bar", "false", "--trainer.tensorboard", "false", "--trainer.max_steps", str(steps),
             "--trainer.export_hf", "false", "--rollout.backend", "hf", "--rollout.n", "4", "--rollout.max_new_tokens", "32",
             "--trainer.prompts_per_step", "4", "--actor.kl_coef", "0.001", "--model.dtype", "float32",
             "--data.max_prompt_tokens", "96", "--actor.micro_batch_size", "8", "--discriminator.micro_batch_prompts", "2",
             "--actor.lora_rank", str(rank), "--discriminator.lora_rank", str(rank)]
    peak_file = out.with_suffix(".peak")
    command = [common.MAIN_PYTHON, str(Path(__file__).resolve().parent / "workers" / "peak_rss.py"), str(peak_file),
               str(common.ROOT / "training" / "step3_gad" / "main.py"), *flags]
    result = subprocess.run(command, env=common.bench_env(GADCHAT_OWN_PORT="1"), capture_output=True, text=True,
                            cwd=common.ROOT)
    if result.returncode != 0:
        raise SystemExit(f"the rank-{rank} run failed:\n{result.stderr[-4000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps_rows = [r for r in rows if r.get("step", 0) >= 2 and "time/step" in r]
    return {"peak_rss_mib": json.loads(peak_file.read_text())["peak_rss_mib"],
            "seconds_per_step": statistics.median(r["time/step"] for r in steps_rows),
            "response_length": statistics.median(r["response_length/mean"] for r in steps_rows),
            "steps": len(steps_rows)}


def gib(numel: float, bytes_each: float) -> float:
    return numel * bytes_each / 2**30


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--no-save", dest="save", action="store_false")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_lora_"))
    try:
        build_model(work / "model")
        total = model_numel(QWEN25_SHAPE)
        trainable = {"full": total, "lora": lora_numel(QWEN25_SHAPE, args.rank)}
        measured = {}
        for name, rank in (("full", 0), ("lora", args.rank)):
            measured[name] = run_stage(work / "model", work / name, rank, args.steps)
            print(name, json.dumps(measured[name]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    full, lo = measured["full"], measured["lora"]
    state_ratio = trainable["full"] / trainable["lora"]
    memory_ratio = full["peak_rss_mib"] / lo["peak_rss_mib"]
    speed_ratio = full["seconds_per_step"] / lo["seconds_per_step"]
    table_rows = [
        ["full fine-tuning", total / 1e6, trainable["full"] / 1e6, gib(trainable["full"], 12), full["peak_rss_mib"],
         full["seconds_per_step"]],
        [f"LoRA r={args.rank} (actor and discriminator)", total / 1e6, trainable["lora"] / 1e6,
         gib(trainable["lora"], 12), lo["peak_rss_mib"], lo["seconds_per_step"]],
    ]
    # Qwen2.5-7B arithmetic (bf16 weights and gradients, fp32 master + Adam: 16 bytes per trained
    # parameter; 2 bytes per frozen one)
    b7, l7 = model_numel(QWEN25_7B), lora_numel(QWEN25_7B, args.rank)
    full_7b = 2 * gib(b7, 16) + gib(b7, 2)  # actor + discriminator trained, reference frozen
    lora_7b = 2 * (gib(b7, 2) + gib(l7, 16))  # two frozen bases with adapters, no reference model
    notes = [
        f"trainable parameters and optimizer state {state_ratio:.0f}x smaller with r={args.rank} (target >= 20x); "
        f"peak RSS of the GAD stage process {memory_ratio:.2f}x lower (target >= 2x); seconds per GAD step "
        f"full / LoRA = {speed_ratio:.2f} (target >= 1: LoRA no slower).",
        "Peak RSS includes the Python process, the tokenizer and DeepSpeed's buffers, and the rollout's KV cache "
        "(HF generate on the actor); the trainable count is per trained model (actor and discriminator alike).",
        f"Qwen2.5-7B ({b7 / 1e9:.2f}B parameters), r={args.rank} on q,k,v,o,gate,up,down: {l7 / 1e6:.1f}M trainable "
        f"per model ({b7 / l7:.0f}x fewer). Model states of a GAD stage, before activations and the vLLM copy "
        f"({gib(b7, 2):.1f} GiB in bf16): full fine-tuning {full_7b:.0f} GiB (actor and discriminator at 16 B/param, "
        f"reference 2 B/param: ZeRO-3 over 8 GPUs, {full_7b / 8:.0f} GiB each); LoRA {lora_7b:.1f} GiB (two bf16 "
        "bases, adapters at 16 B/param, the reference is the actor with its adapter off): one 80 GB GPU holds it, "
        "with room for the vLLM copy and activations; ZeRO-3 over 2 GPUs halves the model states.",
    ]
    result = {"title": f"LoRA vs full fine-tuning: memory and speed of a GAD step (issue 19, r={args.rank})",
              "description": __doc__.split("\n\n")[1].replace("\n", " "),
              "table": {"columns": ["variant", "parameters (M)", "trainable per model (M)",
                                    "optimizer state per model (GiB, fp32 master + Adam)", "peak RSS (MiB)",
                                    "s / GAD step"], "rows": table_rows},
              "targets": {"lora_state_ratio": state_ratio, "lora_memory_ratio": memory_ratio,
                          "lora_speed_ratio": speed_ratio},
              "measured": measured, "notes": notes}
    for note in notes:
        print("-", note)
    if args.save:
        common.save_result("lora_memory_speed", result, common.command_line("benchmarks/bench_lora.py", argv))


if __name__ == "__main__":
    main()
