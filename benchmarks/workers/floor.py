"""Benchmark worker: the floor. A bare loop in plain PyTorch plus the same vLLM, doing only what a
GAD step on work W cannot skip: generate (vLLM); the discriminator's Bradley-Terry update as our
GAD step does it (teacher response preferred over each of its prompt's samples; forward with grad
over the teacher and the student sequences, micro-batched by prompt, backward, grad clip, one
AdamW step), the rewards being the student scores of that forward, before the update; GRPO
advantages; policy-gradient + k3 KL loss in one forward/backward, one AdamW step; in-place weight
reload into vLLM (re-tying the LM head as gadchat.generation.vllm_backend does). No DeepSpeed, none of our engine
(only the pure Bradley-Terry loss and the sample-row indexing, sample_rows), no metrics. Same
protocol and same rows as ours.py.

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
    parser.add_argument("--disc-lr", type=float, default=2e-4, help="discriminator AdamW lr (as ours' config)")
    parser.add_argument("--disc-micro-prompts", type=int, default=4,
                        help="prompts per discriminator forward/backward, each with its teacher and n samples (as ours)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from vllm import LLM, SamplingParams

    from gadchat.losses import bradley_terry_loss
    from gadchat.stages.common import sample_rows
    from gadchat.generation.vllm_backend import _refresh_tied_lm_head

    tok = AutoTokenizer.from_pretrained(args.model)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    rows = [json.loads(line) for line in open(args.prompts)]  # prompt_ids, response_ids (the teacher's)
    actor = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    actor.config.use_cache = False
    ref = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval().requires_grad_(False)
    disc = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=1, pad_token_id=pad,
                                                              dtype=torch.float32)  # trained; no dropout in it
    optimizer = torch.optim.AdamW(actor.parameters(), lr=args.lr, weight_decay=0.01)
    disc_optimizer = torch.optim.AdamW(disc.parameters(), lr=args.disc_lr, weight_decay=0.01)
    llm = LLM(model=args.model, dtype="float32", max_model_len=args.max_model_len, enforce_eager=True, seed=0,
              enable_prefix_caching=True)
    params = SamplingParams(n=args.n, temperature=args.temperature, max_tokens=args.max_new_tokens,
                            stop_token_ids=[eos], detokenize=False, skip_special_tokens=False)

    def padded(seqs):
        """Right-padded ids, attention mask, response mask and last index of (prompt, response) pairs."""
        width = max(len(p) + len(r) for p, r in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        mask = torch.zeros(len(seqs), width)
        for i, (p, r) in enumerate(seqs):
            ids[i, :len(p) + len(r)] = torch.tensor(p + r)
            attn[i, :len(p) + len(r)] = 1
            mask[i, len(p):len(p) + len(r)] = 1
        return ids, attn, mask, attn.sum(1) - 1

    def scores(ids, attn, last, picked):
        """Discriminator score at the last valid token of the rows ``picked``, trimmed to their longest."""
        w = int(last[picked].max()) + 1
        hidden = disc.base_model(input_ids=ids[picked, :w], attention_mask=attn[picked, :w]).last_hidden_state
        return disc.score(hidden[torch.arange(len(picked)), last[picked]]).squeeze(-1)

    def logp(model, ids, attn):
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
        labels = ids[:, 1:]
        return torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)

    step = 0

    def one_step():
        nonlocal step
        times = {}
        step_started = t = time.perf_counter()
        per_epoch = len(rows) // args.prompts_per_step  # ours' unshuffled schedule: consecutive rows
        start = (step % per_epoch) * args.prompts_per_step
        batch = rows[start:start + args.prompts_per_step]
        prompts = [r["prompt_ids"] for r in batch]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        seqs = [(p, list(c.token_ids)) for p, o in zip(prompts, outs) for c in o.outputs]
        times["generate"] = time.perf_counter() - t

        # discriminator: one Bradley-Terry step (teacher over each sample); rewards = the student
        # scores of its forward, before the update (as ours' discriminator_update)
        t = time.perf_counter()
        ids, attn, mask, last = padded(seqs)
        t_ids, t_attn, _, t_last = padded([(r["prompt_ids"], r["response_ids"]) for r in batch])
        rewards = torch.zeros(len(batch), args.n)
        for s in range(0, len(batch), args.disc_micro_prompts):
            group = torch.arange(s, min(s + args.disc_micro_prompts, len(batch)))
            t_scores = scores(t_ids, t_attn, t_last, group)
            s_scores = scores(ids, attn, last, sample_rows(group, args.n))
            s_scores = s_scores.view(len(group), args.n)
            rewards[group] = s_scores.detach()
            (bradley_terry_loss(t_scores, s_scores) * (len(group) / len(batch))).backward()
        torch.nn.utils.clip_grad_norm_(disc.parameters(), 0.2)
        disc_optimizer.step()
        disc_optimizer.zero_grad(set_to_none=True)
        adv = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-6)).reshape(-1, 1)
        times["discriminator_update"] = time.perf_counter() - t

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
