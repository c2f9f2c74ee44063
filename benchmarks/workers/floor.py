"""Benchmark worker: the floor. A bare loop in plain PyTorch plus the same vLLM, doing only what an
RL step on work W cannot skip: generate (vLLM), score with a frozen discriminator, GRPO advantages,
policy-gradient + k3 KL loss in one forward/backward, one AdamW step, in-place weight reload into
vLLM (re-tying the LM head as gadchat.rollout does). No DeepSpeed, no discriminator training, no
metrics. Same protocol as ours.py.

    floor.py --model DIR --prompts prompts.jsonl [--n 8 --max-new-tokens 64 ...]
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


def build():
    parser = argparse.ArgumentParser()
    common.add_work_arguments(parser)
    parser.add_argument("--max-model-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=16, help="sequences per forward/backward (as ours)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from vllm import LLM, SamplingParams

    from gadchat.rollout import _refresh_tied_lm_head

    tok = AutoTokenizer.from_pretrained(args.model)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    rows = [json.loads(line)["prompt_ids"] for line in open(args.prompts)]
    actor = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    actor.config.use_cache = False
    ref = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval().requires_grad_(False)
    disc = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=1, pad_token_id=pad,
                                                              dtype=torch.float32).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(actor.parameters(), lr=args.lr, weight_decay=0.01)
    llm = LLM(model=args.model, dtype="float32", max_model_len=args.max_model_len, enforce_eager=True, seed=0,
              enable_prefix_caching=True)
    params = SamplingParams(n=args.n, temperature=args.temperature, max_tokens=args.max_new_tokens,
                            stop_token_ids=[eos], detokenize=False, skip_special_tokens=False)

    def logp(model, ids, attn):
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
        labels = ids[:, 1:]
        return torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)

    step = 0

    def one_step():
        nonlocal step
        times = {}
        step_started = t = time.perf_counter()
        start = (step * args.prompts_per_step) % (len(rows) - args.prompts_per_step + 1)
        prompts = rows[start:start + args.prompts_per_step]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        seqs = [(p, list(c.token_ids)) for p, o in zip(prompts, outs) for c in o.outputs]
        times["generate"] = time.perf_counter() - t

        t = time.perf_counter()
        width = max(len(p) + len(r) for p, r in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        mask = torch.zeros(len(seqs), width)
        for i, (p, r) in enumerate(seqs):
            ids[i, :len(p) + len(r)] = torch.tensor(p + r)
            attn[i, :len(p) + len(r)] = 1
            mask[i, len(p):len(p) + len(r)] = 1
        last = attn.sum(1) - 1
        with torch.no_grad():
            hidden = disc.base_model(input_ids=ids, attention_mask=attn).last_hidden_state
            rewards = disc.score(hidden[torch.arange(len(seqs)), last]).squeeze(-1).view(-1, args.n)
        adv = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-6)).reshape(-1, 1)
        times["score"] = time.perf_counter() - t

        mb = args.micro_batch
        chunks = []  # micro-batches trimmed to their own longest sequence
        for s in range(0, len(seqs), mb):
            w = int(last[s:s + mb].max()) + 1
            chunks.append((ids[s:s + mb, :w], attn[s:s + mb, :w], mask[s:s + mb, 1:w], adv[s:s + mb]))
        t = time.perf_counter()
        with torch.no_grad():
            ref_lps = [logp(ref, c[0], c[1]) for c in chunks]
        times["reference_log_probs"] = time.perf_counter() - t

        t = time.perf_counter()
        total = mask.sum()
        for (c_ids, c_attn, m, a), ref_lp in zip(chunks, ref_lps):
            lp = logp(actor, c_ids, c_attn)
            pg = -a * torch.exp(lp - lp.detach())
            kl = torch.clamp(torch.exp(ref_lp - lp) - (ref_lp - lp) - 1, -10, 10)
            loss = ((pg + args.kl_coef * kl) * m).sum() / total
            loss.backward()
        torch.nn.utils.clip_grad_norm_(actor.parameters(), 0.2)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times["actor_update"] = time.perf_counter() - t

        t = time.perf_counter()
        weights = ((name, p.detach()) for name, p in actor.named_parameters())
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        llm.collective_rpc(_refresh_tied_lm_head)
        llm.reset_prefix_cache()
        times["weight_sync"] = time.perf_counter() - t
        step += 1
        return {"step_s": time.perf_counter() - step_started, "phases": times,
                "response_length": sum(len(r) for _, r in seqs) / len(seqs)}

    return one_step


if __name__ == "__main__":
    common.serve_worker(build)
