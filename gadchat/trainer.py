"""The three stage loops (SeqKD, GAD warm-up, GAD) over the hybrid engine.

Each step, read top to bottom:

- ``seqkd``:  actor SFT on the teacher responses.
- ``warmup``: rollout ``n`` samples per prompt -> discriminator Bradley-Terry update (every step)
  -> actor SFT on the teacher responses (+ k3 KL to the reference on the samples) only once
  ``step >= critic_warmup``.
- ``gad``:    rollout -> discriminator scores of the samples (pre-update) -> GRPO advantages ->
  discriminator update -> actor PPO-clip policy-gradient update + k3 KL to the reference.

Token-means are taken over the rank's whole batch (each micro-batch contributes its share), and
DeepSpeed averages the gradients over the ranks.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch

from gadchat import checkpoint, runtime
from gadchat.config import GADConfig, save_config
from gadchat.data import PromptSchedule, load_teacher_data
from gadchat.engine import HybridEngine, SequenceBatch
from gadchat.losses import (bradley_terry_loss, discriminator_metrics, grpo_advantages, kl_loss, masked_mean,
                            ppo_clip_loss, sft_loss)
from gadchat.metrics_log import MetricsLogger

logger = logging.getLogger("gadchat")


def _response_length_stats(samples: list) -> dict:
    lengths = [len(s) for group in samples for s in group]
    return {"response_length/mean": sum(lengths) / len(lengths), "response_length/max": float(max(lengths))}


class StageTrainer:
    """Runs one stage: builds the engine, data and logger, resumes, loops, checkpoints, exports."""

    def __init__(self, cfg: GADConfig):
        self.cfg = cfg
        self.rank, self.world_size, _ = runtime.init_distributed()
        logging.basicConfig(level=logging.INFO if self.rank == 0 else logging.WARNING,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        runtime.seed_everything(cfg.trainer.seed)
        self.output_dir = Path(cfg.trainer.output_dir)
        stage = cfg.trainer.stage
        actor_path, critic_path = checkpoint.handoff_paths(cfg)
        self.engine = HybridEngine(cfg, self.rank, self.world_size, need_critic=stage != "seqkd",
                                   actor_path=actor_path, critic_path=critic_path)
        self.tokenizer = self.engine.tokenizer
        self.examples, report = load_teacher_data(cfg.data, self.tokenizer)
        if self.rank == 0:
            logger.info("teacher data %s: %s", cfg.data.train_files, report.summary())
            for text in report.examples_of_skips:
                logger.warning("skipped: %s", text)
        self.schedule = PromptSchedule(len(self.examples), cfg.trainer.prompts_per_step, self.world_size, self.rank,
                                       cfg.trainer.seed, cfg.data.shuffle)
        self.total_steps = self.schedule.total_steps(cfg.trainer.epochs, cfg.trainer.max_steps)
        self.step_fn = {"seqkd": self.seqkd_step, "warmup": self.warmup_step, "gad": self.gad_step}[stage]
        self.checkpoints = checkpoint.CheckpointManager(self)
        self.start_step = 0
        if stage != "seqkd" or cfg.trainer.eval_every:
            self.engine.build_rollout()
        init_times = self.engine.timer.timings()  # every rank: the step metrics must share their keys
        ds = cfg.deepspeed
        if self.world_size == 1 and ds.zero_stage == 3 and not (ds.offload_param or ds.offload_optimizer):
            logger.warning("ZeRO-3 on a single rank without offload partitions nothing and costs about 20%% "
                           "per step (benchmarks/RESULTS.md); --deepspeed.zero_stage 0 is the faster choice here")
        if self.rank == 0:
            logger.info("engine ready: rollout=%s, ZeRO stage %d, %d rank(s), dtype %s; %s",
                        self.engine.backend, cfg.deepspeed.zero_stage, self.world_size, self.engine.dtype,
                        ", ".join(f"{k}={v:.1f}s" for k, v in init_times.items()))

    # ------------------------------------------------------------------------------------------

    def run(self) -> dict:
        cfg, t = self.cfg, self.cfg.trainer
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.output_dir / "config.json")
        self.start_step = self.checkpoints.maybe_resume()
        self.metrics = MetricsLogger(self.output_dir, enabled=self.rank == 0, tensorboard=t.tensorboard,
                                     progress=t.progress_bar, total=self.total_steps, start=self.start_step,
                                     stage=t.stage)
        if self.start_step >= self.total_steps:
            if self.rank == 0:
                logger.info("stage %s already finished at step %d/%d in %s; nothing to do (use a new "
                            "--trainer.output_dir or raise --trainer.max_steps to train further)",
                            t.stage, self.start_step, self.total_steps, self.output_dir)
            if t.export_hf and not (checkpoint.final_dir(self.output_dir) / "actor" / "config.json").exists():
                self.checkpoints.export_final()  # the run died between its last checkpoint and the export
            self.metrics.close()
            return {"finished": True, "step": self.start_step}
        if t.log_param_digest and self.start_step == 0:
            self.metrics.log(0, self.param_digests(), advance=False)
        last = {}
        for step in range(self.start_step, self.total_steps):
            started = time.perf_counter()
            indices = self.schedule.rank_indices(step)
            batch = [self.examples[i] for i in indices]
            local = self.step_fn(step, batch)
            if t.log_param_digest:
                local.update(self.param_digests())
            if t.verify_rollout_sync:
                local["debug/rollout_greedy_match"] = self.engine.rollout_matches_actor(
                    [e.prompt_ids for e in batch], self.cfg.rollout.max_new_tokens)
            local.update(self.engine.timer.timings())
            local["time/step"] = time.perf_counter() - started
            digests = {k: local.pop(k) for k in list(local) if k.startswith("digest/")}
            metrics = runtime.all_reduce_mean(local)
            metrics.update(digests)  # already global sums
            metrics["epoch"] = self.schedule.epoch_of(step + 1)
            tokens = metrics.pop("tokens", 0.0) * self.world_size
            metrics["throughput/tokens_per_s"] = tokens / max(metrics["time/step"], 1e-9)
            last = metrics
            if (step + 1) % t.log_every == 0 or step + 1 == self.total_steps:
                self.metrics.log(step + 1, metrics)
            else:
                self.metrics.advance()
            if t.save_every and (step + 1) % t.save_every == 0 and step + 1 < self.total_steps:
                self.checkpoints.save(step + 1)
        self.checkpoints.save(self.total_steps)
        if t.export_hf:
            self.checkpoints.export_final()
        self.metrics.close()
        return last

    # ------------------------------------------------------------------------------------------
    # shared pieces

    def param_digests(self) -> dict:
        out = {"digest/actor": self.engine.param_digest(self.engine.actor)}
        if self.engine.critic is not None:
            out["digest/critic"] = self.engine.param_digest(self.engine.critic)
        if self.engine.ref is not None:
            out["digest/ref"] = self.engine.param_digest(self.engine.ref)
        return out

    def rollout_seed(self, step: int) -> int:
        return self.cfg.trainer.seed * 1_000_003 + step * 1009 + self.rank

    def teacher_batch(self, batch) -> SequenceBatch:
        return SequenceBatch.build([e.prompt_ids for e in batch], [e.response_ids for e in batch], self.engine.pad_token_id)

    def rollout(self, step: int, batch):
        """Sample ``n`` responses per prompt; returns them and their prompt-major ``SequenceBatch``."""
        n = self.cfg.rollout.n
        samples = self.engine.generate([e.prompt_ids for e in batch], seed=self.rollout_seed(step))
        prompts = [e.prompt_ids for e in batch for _ in range(n)]
        responses = [s for group in samples for s in group]
        return samples, SequenceBatch.build(prompts, responses, self.engine.pad_token_id)

    def update_discriminator(self, teacher: SequenceBatch, student: SequenceBatch):
        """Bradley-Terry update, micro-batched by prompt; returns metrics and the student scores
        of the forward pass (taken before this step's update: the GAD rewards)."""
        n, prompts = self.cfg.rollout.n, len(teacher)
        per_micro = max(1, self.cfg.critic.micro_batch_prompts)
        teacher_scores, student_scores = [], []

        def micro_step(start):
            def forward():
                end = min(start + per_micro, prompts)
                t_scores = self.engine.scores(teacher.slice(start, end))
                s_scores = self.engine.scores(student.slice(start * n, end * n)).view(end - start, n)
                teacher_scores.append(t_scores.detach().cpu())
                student_scores.append(s_scores.detach().cpu())
                return bradley_terry_loss(t_scores, s_scores) * ((end - start) / prompts)
            return forward

        with self.engine.timer("critic_update"):
            d_loss = self.engine.accumulate(self.engine.critic, [micro_step(s) for s in range(0, prompts, per_micro)])
        t_all, s_all = torch.cat(teacher_scores), torch.cat(student_scores)
        metrics = {"critic/d_loss": d_loss}
        metrics.update({f"critic/{k}": v for k, v in discriminator_metrics(t_all, s_all).items()})
        return metrics, s_all

    def score_students(self, teacher: SequenceBatch, student: SequenceBatch):
        """Scores without an update (frozen-discriminator ablation)."""
        mb = max(1, self.cfg.critic.micro_batch_prompts) * self.cfg.rollout.n
        with self.engine.timer("score"):
            t_all = self.engine.scores_no_grad(teacher, mb)
            s_all = self.engine.scores_no_grad(student, mb).view(len(teacher), -1)
        metrics = {f"critic/{k}": v for k, v in discriminator_metrics(t_all, s_all).items()}
        with torch.no_grad():
            metrics["critic/d_loss"] = float(bradley_terry_loss(t_all, s_all))
        return metrics, s_all

    def sft_micro_steps(self, teacher: SequenceBatch) -> list:
        """Closures for the token-mean SFT loss over the teacher batch."""
        mb = self.cfg.actor.micro_batch_size
        total_tokens = float(teacher.target_mask.sum())

        def micro_step(start):
            def forward():
                part = teacher.slice(start, start + mb)
                log_probs, _ = self.engine.log_probs(self.engine.actor, part)
                mask = part.target_mask.to(log_probs.device)
                return sft_loss(log_probs, mask, denominator=total_tokens)
            return forward

        return [micro_step(s) for s in range(0, len(teacher), mb)]

    def kl_micro_steps(self, student: SequenceBatch, ref_log_probs: torch.Tensor, coef: float, collected: list):
        """Closures for ``coef * token-mean k3 KL(actor || ref)`` over the student samples."""
        mb = self.cfg.actor.micro_batch_size
        total_tokens = student.target_mask.sum().clamp(min=1)

        def micro_step(start):
            def forward():
                part = student.slice(start, start + mb)
                log_probs, _ = self.engine.log_probs(self.engine.actor, part)
                mask = part.target_mask.to(log_probs.device)
                ref = ref_log_probs[start : start + len(part), : log_probs.shape[1]].to(log_probs.device)
                kl = kl_loss(log_probs, ref, mask, denominator=total_tokens)
                collected.append(float(kl.detach()))
                return coef * kl
            return forward

        return [micro_step(s) for s in range(0, len(student), mb)]

    def ref_log_probs(self, student: SequenceBatch) -> torch.Tensor:
        with self.engine.timer("ref_log_probs"):
            return self.engine.log_probs_no_grad(self.engine.ref, student, self.cfg.actor.micro_batch_size)

    # ------------------------------------------------------------------------------------------
    # stages

    def seqkd_step(self, step: int, batch) -> dict:
        teacher = self.teacher_batch(batch)
        steps = self.sft_micro_steps(teacher)
        with self.engine.timer("actor_update"):
            loss = self.engine.accumulate(self.engine.actor, steps)
        self.engine.mark_actor_updated()
        metrics = {"actor/sft_loss": loss, "tokens": float(teacher.attention_mask.sum())}
        if self.cfg.trainer.eval_every and (step + 1) % self.cfg.trainer.eval_every == 0:
            metrics.update(self.rouge_eval(step))
        return metrics

    def warmup_step(self, step: int, batch) -> dict:
        teacher = self.teacher_batch(batch)
        samples, student = self.rollout(step, batch)
        metrics, _ = self.update_discriminator(teacher, student)
        metrics.update(_response_length_stats(samples))
        metrics["actor/updated"] = float(step >= self.cfg.trainer.critic_warmup)
        if step >= self.cfg.trainer.critic_warmup:
            sft_steps = self.sft_micro_steps(teacher)
            kl_values: list = []
            kl_steps = []
            if self.engine.ref is not None and self.cfg.actor.kl_coef > 0:
                ref = self.ref_log_probs(student)
                kl_steps = self.kl_micro_steps(student, ref, self.cfg.actor.kl_coef, kl_values)
            with self.engine.timer("actor_update"):
                total = self.engine.accumulate(self.engine.actor, sft_steps + kl_steps)
            self.engine.mark_actor_updated()
            kl = sum(kl_values)
            metrics["actor/sft_loss"] = total - self.cfg.actor.kl_coef * kl
            if kl_steps:
                metrics["actor/kl"] = kl
        metrics["tokens"] = float(student.attention_mask.sum() + teacher.attention_mask.sum())
        return metrics

    def gad_step(self, step: int, batch) -> dict:
        teacher = self.teacher_batch(batch)
        samples, student = self.rollout(step, batch)
        if self.engine.critic_trainable:
            # The update's forward pass runs on the pre-update discriminator: its student scores
            # are this step's rewards (one pass instead of a separate scoring pass).
            metrics, rewards = self.update_discriminator(teacher, student)
        else:
            metrics, rewards = self.score_students(teacher, student)
        advantages = grpo_advantages(rewards).reshape(-1)
        metrics.update(_response_length_stats(samples))
        metrics.update({"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()),
                        "advantage/mean": float(advantages.mean()), "advantage/std": float(advantages.std()),
                        "advantage/max": float(advantages.max()), "advantage/min": float(advantages.min())})
        ref = self.ref_log_probs(student) if self.engine.ref is not None else None
        metrics.update(self.policy_update(student, advantages, ref))
        metrics["tokens"] = float(student.attention_mask.sum() + teacher.attention_mask.sum())
        return metrics

    def policy_update(self, student: SequenceBatch, advantages: torch.Tensor, ref: torch.Tensor | None) -> dict:
        """PPO-clip + k3 KL (+ entropy bonus) over ``actor.ppo_epochs`` x ``actor.mini_batches``
        optimizer steps. With a single step per batch the ratio is exactly 1 and ``logp_old`` is
        the detached current log-prob; otherwise it is computed once before the first update."""
        a = self.cfg.actor
        rows = len(student)
        single_step = a.ppo_epochs == 1 and a.mini_batches == 1
        old = None
        if not single_step:
            with self.engine.timer("old_log_probs"):
                old = self.engine.log_probs_no_grad(self.engine.actor, student, a.micro_batch_size)
        sums = {"pg_loss": 0.0, "kl": 0.0, "entropy": 0.0, "clip_fraction": 0.0}
        updates = 0
        mini_size = math.ceil(rows / a.mini_batches)
        with self.engine.timer("actor_update"):
            for _epoch in range(a.ppo_epochs):
                for mini_start in range(0, rows, mini_size):
                    mini_end = min(rows, mini_start + mini_size)
                    denominator = student.target_mask[mini_start:mini_end].sum().clamp(min=1)

                    def micro_step(start, end=None, denominator=denominator):
                        def forward():
                            part = student.slice(start, end)
                            log_probs, entropy = self.engine.log_probs(self.engine.actor, part,
                                                                        with_entropy=a.entropy_coef > 0)
                            mask = part.target_mask.to(log_probs.device)
                            width = log_probs.shape[1]
                            old_lp = log_probs.detach() if old is None else old[start:end, :width].to(log_probs.device)
                            adv = advantages[start:end].to(log_probs.device)
                            pg, clip_fraction = ppo_clip_loss(log_probs, old_lp, adv, mask, a.clip_eps, denominator)
                            loss = pg
                            sums["pg_loss"] += float(pg.detach())
                            sums["clip_fraction"] += float(clip_fraction) * float(mask.sum() / denominator)
                            if ref is not None and a.kl_coef > 0:
                                kl = kl_loss(log_probs, ref[start:end, :width].to(log_probs.device), mask, denominator)
                                loss = loss + a.kl_coef * kl
                                sums["kl"] += float(kl.detach())
                            if entropy is not None:
                                ent = masked_mean(entropy, mask, denominator)
                                loss = loss - a.entropy_coef * ent
                                sums["entropy"] += float(ent.detach())
                            return loss
                        return forward

                    steps = [micro_step(s, min(s + a.micro_batch_size, mini_end))
                             for s in range(mini_start, mini_end, a.micro_batch_size)]
                    self.engine.accumulate(self.engine.actor, steps)
                    updates += 1
        self.engine.mark_actor_updated()
        out = {f"actor/{k}": v / updates for k, v in sums.items()}
        if a.entropy_coef == 0:
            out.pop("actor/entropy")
        return out

    # ------------------------------------------------------------------------------------------

    def rouge_eval(self, step: int) -> dict:
        """Greedy rollouts on the first ``trainer.eval_prompts`` held-out prompts, ROUGE-L F1 against
        the teacher (SeqKD's optional progress signal)."""
        from gadchat.rouge import rouge_l_f1

        if not hasattr(self, "_eval_examples"):
            self._eval_examples, _ = load_teacher_data(self.cfg.data, self.tokenizer, spec=self.cfg.data.eval_files,
                                                       max_rows=self.cfg.trainer.eval_prompts)
        usable = len(self._eval_examples) - len(self._eval_examples) % self.world_size  # equal share per rank:
        mine = self._eval_examples[:usable][self.rank :: self.world_size]  # ZeRO-3 generate runs in lock-step
        samples = self.engine.generate([e.prompt_ids for e in mine], seed=0, greedy=True, n=1)
        texts = [self.tokenizer.decode(g[0], skip_special_tokens=True) for g in samples]
        scores = [rouge_l_f1(text, e.response) for text, e in zip(texts, mine)]
        return {"eval/rouge_l": sum(scores) / max(1, len(scores))}
