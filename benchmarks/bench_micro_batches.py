"""Fixed-size vs token-budget micro-batches on the real teacher length distribution (issue 11 goal):
padding share and update time of the actor's policy-gradient pass and the discriminator's
Bradley-Terry pass, 8 prompts x n = 8 samples plus the 8 teacher answers.

Lengths are real: prompts and GPT-4o answers of the shipped data, tokenized with the built-in tiny
tokenizer (a small BPE: more tokens per word than Qwen's) and capped at the published 2048 / 1536.
Student samples take the answer lengths of other rows (a proxy for a student that has learned the
teacher's length distribution). The models are random Qwen2s (hidden 256, 4 layers, 8 heads,
vocab 1024; a causal LM for the actor and the engine's discriminator on the same backbone), in one
process on the CPU, forward + loss + backward through the engine's own pieces
(:meth:`SequenceBatch.micro_batches`, :func:`gadchat.logprobs.sequence_log_probs`,
:func:`gadchat.losses.ppo_clip_loss` / :func:`bradley_terry_loss`, and the row-level
:func:`gadchat.stages.common.bradley_terry_by_rows`); the grouping code is the
engine's, the DeepSpeed engine itself is left out (it adds the same per-micro-batch hooks to both).

Usage: python benchmarks/bench_micro_batches.py [--repeats 3] [--save]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402


def real_lengths(prompts: int, n: int, seed: int = 0):
    from gadchat.models import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path("builtin:tiny"))
    rows = [json.loads(line) for line in (common.ROOT / "data" / "alpaca_eval_gpt4o" / "train.jsonl").read_text().splitlines()]
    rng = random.Random(seed)
    picked = rng.sample(rows, prompts * (n + 1))

    def count(text, cap):
        return max(1, min(cap, len(tokenizer(text)["input_ids"])))

    def prompt_text(row):
        content = row["content"]
        return content if isinstance(content, str) else " ".join(m["content"] for m in content)

    prompt_len = [count(prompt_text(r), 2048) for r in picked[:prompts]]
    teacher_len = [count(r["teacher_response"], 1536) for r in picked[:prompts]]
    sample_len = [count(r["teacher_response"], 1536) for r in picked[prompts:]][: prompts * n]
    return prompt_len, teacher_len, sample_len


def build(prompt_len, response_len, vocab):
    from gadchat.batch import SequenceBatch

    gen = random.Random(1)
    prompts = [[gen.randrange(3, vocab) for _ in range(p)] for p in prompt_len]
    responses = [[gen.randrange(3, vocab) for _ in range(r)] for r in response_len]
    return SequenceBatch.build(prompts, responses, 0)


def main(argv=None) -> int:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from gadchat.logprobs import sequence_log_probs
    from gadchat.losses import bradley_terry_loss, ppo_clip_loss
    from gadchat.models import Discriminator
    from gadchat.stages.common import bradley_terry_by_rows, sample_rows

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--rows", type=int, default=4, help="fixed actor micro-batch (the 7B recipe's 4)")
    parser.add_argument("--actor-tokens", type=int, default=4096, help="actor token budget")
    parser.add_argument("--d-prompts", type=int, default=1, help="fixed discriminator prompts per micro-batch (recipe: 1)")
    parser.add_argument("--d-tokens", type=int, default=4096, help="discriminator token budget (as the actor's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    prompt_len, teacher_len, sample_len = real_lengths(args.prompts, args.n)
    vocab = 1024
    config = Qwen2Config(vocab_size=vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, attn_implementation="sdpa")
    actor = Qwen2ForCausalLM(config).train()
    teacher = build(prompt_len, teacher_len, vocab)
    student = build([p for p in prompt_len for _ in range(args.n)], sample_len, vocab)

    from transformers import Qwen2ForSequenceClassification

    seqcls = Qwen2ForSequenceClassification(Qwen2Config(**{**config.to_dict(), "num_labels": 1, "pad_token_id": 0}))
    discriminator = Discriminator(seqcls).train()

    def actor_pass(parts):
        denominator = student.target_mask.sum()
        advantages = torch.randn(len(student))
        for rows, part in parts:
            log_probs, _ = sequence_log_probs(actor, actor, part, 512)
            loss, _ = ppo_clip_loss(log_probs, log_probs.detach(), advantages[rows], part.target_mask, 0.2, denominator)
            loss.backward()

    def score(part):
        return discriminator(part.input_ids, part.attention_mask, part.last_index, part.response_mask)

    def discriminator_pass(plan):
        if plan[0] == "rows":  # the engine's row-level update under --discriminator.micro_batch_tokens
            bradley_terry_by_rows(lambda _rows, part: score(part), lambda _rows, part: score(part), lambda loss: loss.backward(), plan[1], plan[2], args.n)
            return
        for rows in plan[1]:  # prompt groups, as the engine with --discriminator.micro_batch_prompts
            t = score(teacher.select(rows))
            s = score(student.select(sample_rows(rows, args.n))).view(len(rows), args.n)
            (bradley_terry_loss(t, s) * (len(rows) / len(teacher))).backward()

    def d_forwards(plan):
        """Every forward's batch: the row-level update runs the teacher parts twice."""
        if plan[0] == "rows":
            return [part for _, part in plan[1] + plan[2] + plan[1]]
        return [part for rows in plan[1] for part in (teacher.select(rows), student.select(sample_rows(rows, args.n)))]

    def d_padding(plan):
        forwards = d_forwards(plan)
        return 1 - sum(int(part.attention_mask.sum()) for part in forwards) / sum(part.input_ids.numel() for part in forwards)

    prompt_groups = [torch.arange(start, min(start + args.d_prompts, len(teacher)))
                     for start in range(0, len(teacher), args.d_prompts)]
    cases = {
        "actor, fixed": lambda: student.micro_batches(args.rows),
        "actor, token budget": lambda: student.micro_batches(args.rows, tokens=args.actor_tokens),
    }
    d_cases = {
        "discriminator, fixed": lambda: ("prompts", prompt_groups),
        "discriminator, token budget": lambda: ("rows", teacher.micro_batches(0, tokens=args.d_tokens),
                                                student.micro_batches(0, tokens=args.d_tokens)),
    }
    rows, times = [], {}
    for name, make in {**cases, **d_cases}.items():
        plan = make()
        run = actor_pass if name.startswith("actor") else discriminator_pass
        model = actor if name.startswith("actor") else discriminator
        run(plan)  # warm-up
        model.zero_grad(set_to_none=True)
        spent = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            run(plan)
            spent.append(time.perf_counter() - started)
            model.zero_grad(set_to_none=True)
        times[name] = common.median(spent)
        if name.startswith("actor"):
            padding = student.padding_fraction(plan)
            largest = max(part.input_ids.numel() for _, part in plan)
        else:
            padding = d_padding(plan)
            largest = None
        forwards = len(plan) if name.startswith("actor") else len(d_forwards(plan))
        rows.append([name, forwards, f"{padding:.1%}", largest, f"{times[name]:.2f}"])
        print(rows[-1], flush=True)
    speedups = {"actor": times["actor, fixed"] / times["actor, token budget"],
                "discriminator": times["discriminator, fixed"] / times["discriminator, token budget"]}
    notes = [f"update time fixed / token budget: actor {speedups['actor']:.2f}x, discriminator {speedups['discriminator']:.2f}x",
             f"lengths (tiny tokenizer): prompts {min(prompt_len)}-{max(prompt_len)}, teacher answers "
             f"{min(teacher_len)}-{max(teacher_len)}, samples {min(sample_len)}-{max(sample_len)} tokens",
             f"actor: fixed {args.rows} rows vs --actor.micro_batch_tokens {args.actor_tokens}; discriminator: fixed "
             f"{args.d_prompts} prompt(s) vs --discriminator.micro_batch_tokens {args.d_tokens}; median of {args.repeats}"]
    for line in notes:
        print(line)
    result = {
        "title": "10. Fixed vs token-budget micro-batches on the real teacher lengths (issue 11)",
        "description": ("One actor policy-gradient pass over 8 prompts x 8 samples and one discriminator Bradley-Terry "
                        "pass (8 teacher answers + 64 samples), forward + loss + backward on random Qwen2 models "
                        "(h256, 4 layers), 2 threads; padding = share of padded positions over every forward. The "
                        "discriminator's token budget groups rows across prompts (teacher and samples each sorted "
                        "by length) and runs the teacher rows twice (a scoring pass for the exact Bradley-Terry "
                        "gradient, then with gradient)."),
        "table": {"columns": ["pass", "forward passes", "padding", "largest micro-batch (tokens)", "time s"], "rows": rows},
        "notes": notes,
    }
    if args.save:
        print(f"saved {common.save_result('10_micro_batches', result, common.command_line(__file__, argv))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
