"""Helpers of ``benchmarks/gpu_check.sh`` (issue 11 item 6): build the ~0.5B Qwen2.5-shaped random
student, check the GPU environment, and turn the runs' ``metrics.jsonl`` into section 12 of
RESULTS.md (time and peak GPU memory per phase, the weight-push check, exit codes).

With ``GPU_CHECK_CPU=1`` (a dry run of the script on a machine without a GPU) the model is a tiny
one of the same family and no GPU is required; nothing is recorded in RESULTS.md then.

    python benchmarks/gpu_check.py env
    python benchmarks/gpu_check.py build OUT_DIR
    python benchmarks/gpu_check.py report WORK_DIR NAME=RC [NAME=RC ...]
"""

from __future__ import annotations

import json
import os
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
TINY = dict(QWEN25_05B, vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)
CPU_DRY_RUN = bool(os.environ.get("GPU_CHECK_CPU"))


def env() -> None:
    import importlib.util

    import torch

    facts = {"cuda": torch.cuda.is_available(), "torch": torch.__version__,
             "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
             "bf16": bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()),
             "flash_attn": importlib.util.find_spec("flash_attn") is not None,
             "vllm": importlib.util.find_spec("vllm") is not None}
    # Read here, on the GPU machine, so that a report made elsewhere from the logs names it.
    facts["machine"] = common.machine_info()
    facts["versions"] = common.package_versions(sys.executable)
    facts["date"] = common.now_iso()
    print(json.dumps(facts))
    if not facts["cuda"] and not CPU_DRY_RUN:
        sys.exit("gpu_check: no CUDA device visible to torch; run this on a GPU machine with requirements-gpu.txt")


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
    config = Qwen2Config(**(TINY if CPU_DRY_RUN else QWEN25_05B), eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None, torch_dtype="bfloat16")
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
        if not rc.lstrip("-").isdigit():  # "skipped: why"
            notes.append(f"{name}: {rc}.")
            continue
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
        row.append(last.get("throughput/tokens_per_s"))
        row.append(last.get("debug/rollout_greedy_match"))
        row.append(last.get("debug/rollout_greedy_logprob_gap"))
        rows.append(row)
    notes.insert(0, "Model: random Qwen2.5-0.5B shape (494M parameters, vocab 151,936, tied, 24 layers), bf16, "
                 "gadchat's tiny tokenizer; shipped GPT-4o teacher data; 1 GPU, ZeRO-3; 8 prompts x n = 8 per step, "
                 "256 new tokens, teacher answers up to 1024 tokens; HF generate unless the run says vllm. "
                 "Times in s, memory in GiB and tokens/s are the last logged step's (the first step of a run "
                 "includes CUDA and allocator warm-up).")
    notes.insert(1, "Runs: gad = training mode + gradient checkpointing + chunked log-probs + SDPA attention; "
                 "pergather = --rollout.hf_gather_weights false; "
                 "nockpt = gradient checkpointing off; plainlp = --actor.logprob_chunk_tokens 0 (full-vocabulary "
                 "log-probs); eager = eager attention; tokens = --actor.micro_batch_tokens 16384 "
                 "--discriminator.micro_batch_tokens 32768; flash = flash_attention_2; vllm = vLLM on CUDA with "
                 "the weight-push check (--trainer.verify_rollout_sync); sleep = --rollout.vllm_sleep true.")
    env_file = work / "env.json"
    measured_on = {}
    if env_file.exists():
        facts = json.loads(env_file.read_text())
        measured_on = {key: facts.pop(key) for key in ("machine", "versions", "date") if key in facts}
        notes.append("Environment: " + json.dumps(facts))
    extra_notes = work / "notes.txt"  # what the person who ran it adds (a cut-short run, say)
    if extra_notes.exists():
        notes.extend(line.strip() for line in extra_notes.read_text().splitlines() if line.strip())
    columns = ["run", "rc", *[f"{p} s" for p in phases],
               "gen peak GiB", "discriminator peak GiB", "ref peak GiB", "actor peak GiB", "device max GiB",
               "tokens/s", "greedy match", "greedy gap"]
    if CPU_DRY_RUN:
        print(json.dumps({"columns": columns, "rows": rows, "notes": notes}, indent=1))
        return
    common.save_result("12_gpu_check", {
        "title": "12. GPU check: bf16 ZeRO-3 GAD steps at 0.5B on one GPU, memory per phase (issue 11)",
        "description": "`bash benchmarks/gpu_check.sh` on one GPU.",
        "table": {"columns": columns, "rows": rows},
        "notes": notes,
        **measured_on,
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
