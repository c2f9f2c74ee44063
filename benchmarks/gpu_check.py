"""Helpers of ``benchmarks/gpu_check.sh`` (issue 11 item 6): build the ~0.5B Qwen2.5-shaped random
student, check the GPU environment, and turn the runs' ``metrics.jsonl`` into section 10 of
RESULTS.md (time and peak GPU memory per phase, the weight-push check, exit codes).

    python benchmarks/gpu_check.py env
    python benchmarks/gpu_check.py build OUT_DIR
    python benchmarks/gpu_check.py report WORK_DIR NAME=RC [NAME=RC ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# Qwen2.5-0.5B's shape (tied embeddings, 24 layers, head size 64), random weights; the tokenizer is
# gadchat's tiny BPE (no hub on the GPU machine), so only its ids occur in prompts, but the LM head
# and the log-probs span the real 151,936-token vocabulary.
QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                  max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6)


def env() -> None:
    import importlib.util

    import torch

    facts = {"cuda": torch.cuda.is_available(), "torch": torch.__version__,
             "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
             "bf16": bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()),
             "flash_attn": importlib.util.find_spec("flash_attn") is not None,
             "vllm": importlib.util.find_spec("vllm") is not None}
    print(json.dumps(facts))
    if not facts["cuda"]:
        sys.exit("gpu_check: no CUDA device visible to torch; run this on a GPU machine with requirements-gpu.txt")
    if not facts["vllm"]:
        sys.exit("gpu_check: vLLM is not installed (pip install -r requirements-gpu.txt)")


def build(out_dir: str) -> None:
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from gadchat.tiny import build_tokenizer

    out = Path(out_dir)
    if (out / "model.safetensors").exists():
        print(f"model already built in {out}")
        return
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out, vocab_size=4096)
    tokenizer = AutoTokenizer.from_pretrained(out)
    config = Qwen2Config(**QWEN25_05B, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None, torch_dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    # Random weights at transformers' init std give near-uniform logits; fine for memory and speed.
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id, do_sample=False)
    model.save_pretrained(out, safe_serialization=True)
    print(f"built {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M-parameter model in {out}")


def report(work_dir: str, runs: list) -> None:
    work = Path(work_dir)
    rows, notes = [], []
    phases = ("generate", "weight_sync", "discriminator_update", "reference_log_probs", "actor_update", "step")
    for item in runs:
        name, rc = item.split("=", 1)
        metrics_path = work / name / "metrics.jsonl"
        last = {}
        if metrics_path.exists():
            lines = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
            steps = [x for x in lines if "time/step" in x]
            last = steps[-1] if steps else {}
        row = [name, int(rc)]
        for phase in phases:
            row.append(last.get(f"time/{phase}"))
        for phase in ("generate", "discriminator_update", "reference_log_probs", "actor_update"):
            row.append(last.get(f"mem/{phase}_peak_gib"))
        row.append(max([v for k, v in last.items() if k.endswith("_device_gib")], default=None))
        row.append(last.get("debug/rollout_greedy_match"))
        row.append(last.get("debug/rollout_greedy_logprob_gap"))
        rows.append(row)
    notes.append("Model: random Qwen2.5-0.5B shape (494M parameters, vocab 151,936, tied, 24 layers), bf16, "
                 "gadchat's tiny tokenizer; shipped GPT-4o teacher data; 1 GPU, ZeRO-3, vLLM colocated unless the "
                 "run says otherwise. Times in s and memory in GiB are the last logged step's.")
    notes.append("Runs: flash = attn flash_attention_2 (sdpa when flash-attn is missing: see the env line), sdpa = "
                 "flash off; sleep = --rollout.vllm_sleep true; hf = transformers generate; nockpt = gradient "
                 "checkpointing off; plainlp = --actor.logprob_chunk_tokens 0.")
    env_file = work / "env.json"
    if env_file.exists():
        notes.append("Environment: " + env_file.read_text().strip())
    columns = ["run", "rc", *[f"{p} s" for p in phases],
               "gen peak GiB", "discriminator peak GiB", "ref peak GiB", "actor peak GiB", "device max GiB",
               "greedy match", "greedy gap"]
    common.save_result("10_gpu_check", {
        "title": "10. GPU check: flash-attn on/off, bf16, vLLM on CUDA, sleep mode, GAD step at 0.5B (issue 11)",
        "description": "`bash benchmarks/gpu_check.sh` on one GPU.",
        "table": {"columns": columns, "rows": rows},
        "notes": notes,
    }, command="bash benchmarks/gpu_check.sh")


def main(argv) -> None:
    command = argv[0] if argv else ""
    if command == "env":
        env()
    elif command == "build":
        build(argv[1])
    elif command == "report":
        report(argv[1], argv[2:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
