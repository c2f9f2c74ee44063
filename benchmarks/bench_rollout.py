"""Measurement 4: rollout backends, vLLM vs transformers generate, on a model big enough for the
engine to matter: ``builtin:small`` (gadchat.models.BUILTIN_SHAPES: Qwen2, hidden 512, 8 layers,
8 heads -> head_dim 64, 4 KV heads, 4k vocab, ~26M parameters), 8 prompts x n=8 = 64 samples x up to
128 new tokens, temperature 0.8, fp32, one thread.

Both backends are the engine's own classes (gadchat.generation.VLLMBackend and HFBackend, the latter
on the plain transformers model), in one process; after one warm-up call each, repetitions
alternate vLLM / HF so both see the same load. The speedup is the ratio of generated tokens/s.

    python benchmarks/bench_rollout.py [--reps 3] [--model builtin:small] [--max-new-tokens 128]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--model", default="builtin:small")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args(argv)
    os.environ.update({k: v for k, v in common.bench_env().items() if k in (
        "OMP_NUM_THREADS", "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE", "DS_ACCELERATOR",
        "VLLM_LOGGING_LEVEL", "TOKENIZERS_PARALLELISM")})
    import torch

    torch.set_num_threads(1)  # before vLLM: it turns set_num_threads into a no-op afterwards
    from gadchat import runtime

    runtime.set_process_defaults()
    from transformers import AutoModelForCausalLM

    from gadchat.config import DataConfig
    from gadchat.data import load_teacher_data
    from gadchat.models import load_tokenizer, resolve_model_path
    from gadchat.generation import HFBackend, VLLMBackend

    path = resolve_model_path(args.model)
    tok = load_tokenizer(path)
    data = DataConfig(max_prompt_tokens=192, max_response_tokens=1024, max_rows=64, shuffle=False)
    examples, _ = load_teacher_data(data, tok)
    prompts = [e.prompt_ids for e in examples[: args.prompts]]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    params = sum(p.numel() for p in model.parameters())

    class Holder:  # HFBackend reads ``engine.module``
        module = model

    eos = {tok.eos_token_id}
    hf = HFBackend(Holder(), tok.pad_token_id, eos, synced_gpus=False, micro_batch_size=args.prompts * args.n)
    vllm = VLLMBackend(path, path, torch.float32, max_model_len=192 + args.max_new_tokens, eos_ids=eos, seed=0)
    backends = {"vllm": vllm, "hf": hf}

    def timed(name, seed):
        started = time.perf_counter()
        out = backends[name].generate(prompts, n=args.n, temperature=0.8, top_p=1.0,
                                      max_new_tokens=args.max_new_tokens, seed=seed)
        elapsed = time.perf_counter() - started
        tokens = sum(len(s) for group in out for s in group)
        return elapsed, tokens

    for name in backends:
        timed(name, 0)  # warm-up
    runs = {name: [] for name in backends}
    for rep in range(args.reps):
        for name in backends:
            elapsed, tokens = timed(name, rep + 1)
            runs[name].append((elapsed, tokens, tokens / elapsed))
            print(f"rep {rep + 1} {name}: {elapsed:.2f}s, {tokens} tokens, {tokens / elapsed:.0f} tok/s", flush=True)
    med = {name: {"seconds": common.median([r[0] for r in rs]), "tokens": common.median([r[1] for r in rs]),
                  "tokens_per_s": common.median([r[2] for r in rs])} for name, rs in runs.items()}
    speedup = common.median([v[2] / h[2] for v, h in zip(runs["vllm"], runs["hf"])])
    print(f"parameters: {params / 1e6:.1f}M; vLLM {med['vllm']['tokens_per_s']:.0f} tok/s, HF "
          f"{med['hf']['tokens_per_s']:.0f} tok/s; speedup {speedup:.2f}x (median of per-rep ratios)")
    common.save_result("4_rollout", {
        "title": "4. Rollout backends: vLLM vs transformers generate",
        "description": (f"`{args.model}` ({params / 1e6:.1f}M parameters, head_dim 64), {args.prompts} prompts x n={args.n} "
                        f"= {args.prompts * args.n} samples x up to {args.max_new_tokens} new tokens, T 0.8, fp32, 1 thread; "
                        f"gadchat.generation.VLLMBackend vs HFBackend in one process, {args.reps} alternating reps "
                        "after one warm-up each. Speedup = median over reps of the per-rep tokens/s ratio."),
        "table": {"columns": ["backend", "seconds per rollout", "tokens generated", "tokens/s"],
                  "rows": [[name, m["seconds"], m["tokens"], m["tokens_per_s"]] for name, m in med.items()]},
        "raw": {"runs": runs, "params": params},
        "targets": {"vllm_speedup": speedup},
        "notes": [f"vLLM / HF generate: {speedup:.2f}x tokens/s (target >= 2x)."],
    }, command="python benchmarks/bench_rollout.py" + (" " + " ".join(argv) if argv else ""))


if __name__ == "__main__":
    main(sys.argv[1:])
