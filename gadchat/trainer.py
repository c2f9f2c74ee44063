"""The three stage loops (SeqKD, GAD warm-up, GAD) over the hybrid engine.

Each step, read top to bottom:

- ``seqkd``:  actor SFT on the teacher responses.
- ``warmup``: rollout ``n`` samples per prompt -> discriminator Bradley-Terry update (every step)
  -> actor SFT on the teacher responses (+ k3 KL to the reference on the samples) only once
  ``step >= discriminator_warmup``.
- ``gad``:    rollout -> discriminator scores of the samples (pre-update) -> GRPO advantages ->
  discriminator update -> actor PPO-clip policy-gradient update + k3 KL to the reference.

Token-means are taken over the rank's whole batch (each micro-batch contributes its share), and
DeepSpeed averages the gradients over the ranks.
"""

from __future__ import annotations

import logging
import math
import re
import time
from pathlib import Path

import torch

from gadchat import checkpoint, runtime
from gadchat.config import GADConfig, save_config
from gadchat.data import PromptSchedule, eval_data_config, load_teacher_data
from gadchat.engine import HybridEngine, SequenceBatch
from gadchat.losses import (bradley_terry_loss, discriminator_metrics, grpo_advantages, kl_loss, masked_mean,
                            ppo_clip_loss, sft_loss)
from gadchat.metrics_log import MetricsLogger, nonfinite_metrics
from gadchat.teacher_metrics import sequence_sums

logger = logging.getLogger("gadchat")


class NonFiniteError(RuntimeError):
    """A NaN/Inf loss or gradient norm; the message names the step, the model and the quantity."""


def _response_length_stats(samples: list) -> dict:
    """Mean and max response length over every rank's samples (a global max, not a mean of maxima)."""
    stats = runtime.global_stats([len(s) for group in samples for s in group])
    return {"response_length/mean": stats["mean"], "response_length/max": stats["max"]}


def stage_seed(seed: int, stage: str) -> int:
    """Seed of a stage's prompt order and rollout sampling, derived from ``(seed, stage)``: each
    stage counts its steps from 0, and with the bare seed the GAD stage would replay the warm-up's
    prompt order and sampling seeds step for step."""
    import zlib

    return zlib.crc32(f"{stage}:{int(seed)}".encode())


def rollout_seed(seed: int, stage: str, step: int, rank: int) -> int:
    """The sampling seed of one rank's rollout at ``step`` (a pure function: exact resume)."""
    return stage_seed(seed, stage) * 1_000_003 + step * 1009 + rank


class StageTrainer:
    """Runs one stage: builds the engine, data and logger, resumes, loops, checkpoints, exports."""

    def __init__(self, cfg: GADConfig):
        self.cfg = cfg
        self.rank, self.world_size, _ = runtime.init_distributed()
        logging.basicConfig(level=logging.INFO if self.rank == 0 else logging.WARNING,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        runtime.seed_everything(cfg.trainer.seed)
        self.output_dir = Path(cfg.trainer.output_dir)
        # Before anything is built or written: refuse to start over a run unless --trainer.overwrite.
        self.clear_output_dir = checkpoint.check_output_dir(cfg)
        stage = cfg.trainer.stage
        actor_path, discriminator_path = checkpoint.handoff_paths(cfg)
        if self.rank == 0:
            actor_from = actor_path or cfg.model.actor_path
            discriminator_from = discriminator_path or cfg.model.discriminator_path or f"{actor_from} (backbone) with a new score head"
            logger.info("stage %s starts from actor %s%s", stage, actor_from,
                        "" if stage == "seqkd" else f" and discriminator {discriminator_from}")
        self.engine = HybridEngine(cfg, self.rank, self.world_size, need_discriminator=stage != "seqkd",
                                   actor_path=actor_path, discriminator_path=discriminator_path)
        self.tokenizer = self.engine.tokenizer
        self.examples, report = load_teacher_data(cfg.data, self.tokenizer)
        if self.rank == 0:
            logger.info("teacher data %s: %s", cfg.data.train_files, report.summary())
            for text in report.examples_of_skips:
                logger.warning("skipped: %s", text)
        self.schedule = PromptSchedule(len(self.examples), cfg.trainer.prompts_per_step, self.world_size, self.rank,
                                       stage_seed(cfg.trainer.seed, stage), cfg.data.shuffle)
        self.total_steps = self.schedule.total_steps(cfg.trainer.epochs, cfg.trainer.max_steps)
        self.step_fn = {"seqkd": self.seqkd_step, "warmup": self.warmup_step, "gad": self.gad_step}[stage]
        self.checkpoints = checkpoint.CheckpointManager(self)
        self.teacher_probe = None
        if cfg.trainer.diagnostics_teacher and stage != "seqkd":
            from gadchat.diagnostics import TeacherProbe
            from gadchat.models import resolve_model_path

            self.teacher_probe = TeacherProbe(resolve_model_path(cfg.trainer.diagnostics_teacher), self.engine.device,
                                              cfg.actor.micro_batch_size)
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
            if self.clear_output_dir:
                logger.warning("--trainer.overwrite: removing the previous run in %s", self.output_dir)
                checkpoint.clear_previous_run(self.output_dir)
            self.output_dir.mkdir(parents=True, exist_ok=True)
        runtime.barrier()
        self.start_step = self.checkpoints.maybe_resume()
        if self.rank == 0:  # only once the resume was accepted: a refused one leaves config.json alone
            save_config(cfg, self.output_dir / "config.json")
        self.metrics = MetricsLogger(self.output_dir, enabled=self.rank == 0, tensorboard=t.tensorboard,
                                     progress=t.progress_bar, total=self.total_steps, start=self.start_step,
                                     stage=t.stage)
        if self.start_step >= self.total_steps:
            if self.rank == 0:
                logger.info("stage %s already finished at step %d/%d in %s; nothing to do (use a new "
                            "--trainer.output_dir or raise --trainer.max_steps to train further)",
                            t.stage, self.start_step, self.total_steps, self.output_dir)
            if t.export_hf and not checkpoint.export_complete(self.output_dir):
                self.checkpoints.export_final()  # the run died between its last checkpoint and the export's end
            self.metrics.close()
            return {"finished": True, "step": self.start_step}
        if t.log_param_digest and self.start_step == 0:
            self.metrics.log(0, self.param_digests(), advance=False)
        last = {}
        for step in range(self.start_step, self.total_steps):
            started = time.perf_counter()
            indices = self.schedule.rank_indices(step)
            batch = [self.examples[i] for i in indices]
            counters = self.optimizer_counters()
            try:
                local = self.step_fn(step, batch)
            except RuntimeError as exc:  # e.g. transformers' sampler on NaN/Inf probabilities
                if not re.search(r"\b(nan|inf)\b", str(exc), re.IGNORECASE):
                    raise
                last_good = checkpoint.latest_checkpoint(self.output_dir)
                raise NonFiniteError(
                    f"step {step + 1}: non-finite values in the actor or discriminator outputs "
                    f"({str(exc).splitlines()[0][:200]}); stopping without saving; the last good checkpoint is "
                    f"{last_good if last_good is not None else 'none'}. Lower --actor.lr / --discriminator.lr or the grad "
                    "clip") from exc
            if t.log_param_digest:
                local.update(self.param_digests())
            if t.verify_rollout_sync:
                local.update(self.engine.rollout_sync_check([e.prompt_ids for e in batch],
                                                            self.cfg.rollout.max_new_tokens))
            local.update(self.engine.timer.timings())
            local["time/step"] = time.perf_counter() - started
            digests = {k: local.pop(k) for k in list(local) if k.startswith("digest/")}
            metrics = runtime.all_reduce_mean(local)
            metrics.update(digests)  # already global sums
            metrics["epoch"] = self.schedule.epoch_of(step + 1)
            tokens = metrics.pop("tokens", 0.0) * self.world_size
            metrics["throughput/tokens_per_s"] = tokens / max(metrics["time/step"], 1e-9)
            self.check_finite(step + 1, metrics, counters)
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
    # non-finite guard

    def optimizer_counters(self) -> dict:
        """``{model: (optimizer steps, steps DeepSpeed skipped)}`` of the trained engines."""
        engines = {"actor": self.engine.actor}
        if self.engine.discriminator is not None and self.engine.discriminator_trainable:
            engines["discriminator"] = self.engine.discriminator
        return {name: (int(e.global_steps), int(getattr(e, "skipped_steps", 0))) for name, e in engines.items()}

    def check_finite(self, step: int, metrics: dict, before: dict) -> None:
        """Add each stepped engine's gradient norm to ``metrics``, then check every value: a NaN/Inf
        loss or gradient norm stops the run (``NonFiniteError``: nothing is saved, the last good
        checkpoint stays) or, with ``--trainer.on_nonfinite skip``, is counted in
        ``nonfinite/skipped_step`` when DeepSpeed skipped the update (ZeRO 1-3 skip a step whose
        gradient norm is not finite; ZeRO-0 cannot, so there it still stops)."""
        engines = {"actor": self.engine.actor, "discriminator": self.engine.discriminator}
        applied, skipped_by_deepspeed = set(), set()
        for name, (steps, skipped) in before.items():
            engine = engines[name]
            if int(engine.global_steps) == steps:
                continue  # no update this step (e.g. the actor before discriminator_warmup)
            norm = engine.get_global_grad_norm()
            if int(getattr(engine, "skipped_steps", 0)) > skipped:
                skipped_by_deepspeed.add(name)
                norm = float("inf") if norm is None else norm
            else:
                applied.add(name)
            if norm is not None:
                metrics[f"{name}/grad_norm"] = float(norm)
        bad = nonfinite_metrics(metrics)
        skip_mode = self.cfg.trainer.on_nonfinite == "skip"
        owners = {"discriminator" if key.startswith(("discriminator/", "reward/", "advantage/")) else key.split("/", 1)[0]
                  for key in bad}
        harmed = sorted(owners & applied)  # models whose non-finite update went through
        if skip_mode:
            metrics["nonfinite/skipped_step"] = float(bool(bad))
        if not bad:
            return
        what = ", ".join(f"{key.replace('/', ' ', 1)} = {value}" for key, value in sorted(bad.items()))
        if skip_mode and skipped_by_deepspeed and not harmed:
            if self.rank == 0:
                logger.warning("step %d: non-finite %s; DeepSpeed skipped the %s update (--trainer.on_nonfinite skip)",
                               step, what, " and ".join(sorted(skipped_by_deepspeed)))
            return
        self.metrics.log(step, metrics)  # the bad row (non-finite values written as null), for the record
        last = checkpoint.latest_checkpoint(self.output_dir)
        reason = ""
        if skip_mode:
            reason = (f"the {' and '.join(harmed)} update was applied and cannot be undone, " if harmed
                      else "no update was skipped, ")
        raise NonFiniteError(
            f"step {step}: non-finite {what}; {reason}stopping without saving; the last good checkpoint is "
            f"{last if last is not None else 'none'}. Lower --actor.lr / --discriminator.lr or the grad clip"
            + ("" if skip_mode else ", or pass --trainer.on_nonfinite skip to skip such steps"))

    # ------------------------------------------------------------------------------------------
    # shared pieces

    def param_digests(self) -> dict:
        out = {"digest/actor": self.engine.param_digest(self.engine.actor)}
        if self.engine.discriminator is not None:
            out["digest/discriminator"] = self.engine.param_digest(self.engine.discriminator)
        if self.engine.ref is not None:
            out["digest/ref"] = self.engine.param_digest(self.engine.ref)
        return out

    def teacher_view(self, student: SequenceBatch):
        """``(teacher, actor)`` log-probs ``[B, T-1]`` of the rollouts under
        ``--trainer.diagnostics_teacher`` and under the distribution they were drawn from (the
        actor's logits over the rollout temperature, whatever ``actor.temperature_scaled_logprobs``
        says); ``None`` when no teacher is named. Computed once per step for the diagnostics and
        the oracle reward."""
        if self.teacher_probe is None:
            return None
        t = self.cfg.rollout.temperature
        with self.engine.timer("diagnostics"):
            actor = self.engine.log_probs_no_grad(self.engine.actor, student, self.cfg.actor.micro_batch_size,
                                                  temperature=t if t > 0 else 1.0)
            teacher = self.teacher_probe.log_probs(student)
        return teacher, actor[:, : teacher.shape[1]]

    def reward_diagnostics(self, rewards: torch.Tensor, student: SequenceBatch, samples: list, view) -> dict:
        """``diag/...`` metrics from :meth:`teacher_view`'s ``view`` (empty when it is ``None``)."""
        if view is None:
            return {}
        return self.teacher_probe.step_metrics(rewards, student.target_mask, *view, samples, self.engine.eos_ids)

    def rollout_seed(self, step: int) -> int:
        return rollout_seed(self.cfg.trainer.seed, self.cfg.trainer.stage, step, self.rank)

    def sample_temperature(self) -> float:
        """Temperature of the log-probs of student samples (actor, old, reference): the rollout's
        when ``actor.temperature_scaled_logprobs`` (verl), else 1 (raw logits)."""
        t = self.cfg.rollout.temperature
        return t if self.cfg.actor.temperature_scaled_logprobs and t > 0 else 1.0

    def sft_temperature(self) -> float:
        """Temperature of the SFT log-probs on teacher text: 1 unless ``actor.sft_temperature_scaled``."""
        t = self.cfg.rollout.temperature
        return t if self.cfg.actor.sft_temperature_scaled and t > 0 else 1.0

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
        per_micro = max(1, self.cfg.discriminator.micro_batch_prompts)
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

        with self.engine.timer("discriminator_update"):
            d_loss = self.engine.accumulate(self.engine.discriminator, [micro_step(s) for s in range(0, prompts, per_micro)])
        t_all, s_all = torch.cat(teacher_scores), torch.cat(student_scores)
        metrics = {"discriminator/d_loss": d_loss}
        metrics.update({f"discriminator/{k}": v for k, v in discriminator_metrics(t_all, s_all).items()})
        return metrics, s_all

    def score_students(self, teacher: SequenceBatch, student: SequenceBatch):
        """Scores without an update (frozen-discriminator ablation)."""
        mb = max(1, self.cfg.discriminator.micro_batch_prompts) * self.cfg.rollout.n
        with self.engine.timer("score"):
            t_all = self.engine.scores_no_grad(teacher, mb)
            s_all = self.engine.scores_no_grad(student, mb).view(len(teacher), -1)
        metrics = {f"discriminator/{k}": v for k, v in discriminator_metrics(t_all, s_all).items()}
        with torch.no_grad():
            metrics["discriminator/d_loss"] = float(bradley_terry_loss(t_all, s_all))
        return metrics, s_all

    def sft_micro_steps(self, teacher: SequenceBatch) -> list:
        """Closures for the token-mean SFT loss over the teacher batch."""
        mb = self.cfg.actor.micro_batch_size
        total_tokens = float(teacher.target_mask.sum())
        temperature = self.sft_temperature()

        def micro_step(start):
            def forward():
                part = teacher.slice(start, start + mb)
                log_probs, _ = self.engine.log_probs(self.engine.actor, part, temperature=temperature)
                mask = part.target_mask.to(log_probs.device)
                return sft_loss(log_probs, mask, denominator=total_tokens)
            return forward

        return [micro_step(s) for s in range(0, len(teacher), mb)]

    def kl_micro_steps(self, student: SequenceBatch, ref_log_probs: torch.Tensor, coef: float, collected: list):
        """Closures for ``coef * token-mean k3 KL(actor || ref)`` over the student samples."""
        mb = self.cfg.actor.micro_batch_size
        total_tokens = student.target_mask.sum().clamp(min=1)
        temperature = self.sample_temperature()

        def micro_step(start):
            def forward():
                part = student.slice(start, start + mb)
                log_probs, _ = self.engine.log_probs(self.engine.actor, part, temperature=temperature)
                mask = part.target_mask.to(log_probs.device)
                ref = ref_log_probs[start : start + len(part), : log_probs.shape[1]].to(log_probs.device)
                kl = kl_loss(log_probs, ref, mask, denominator=total_tokens)
                collected.append(float(kl.detach()))
                return coef * kl
            return forward

        return [micro_step(s) for s in range(0, len(student), mb)]

    def ref_log_probs(self, student: SequenceBatch) -> torch.Tensor:
        with self.engine.timer("ref_log_probs"):
            return self.engine.log_probs_no_grad(self.engine.ref, student, self.cfg.actor.micro_batch_size,
                                                 temperature=self.sample_temperature())

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
        metrics, scores = self.update_discriminator(teacher, student)
        metrics.update(_response_length_stats(samples))
        metrics.update(self.reward_diagnostics(scores, student, samples, self.teacher_view(student)))
        metrics["actor/updated"] = float(step >= self.cfg.trainer.discriminator_warmup)
        if step >= self.cfg.trainer.discriminator_warmup:
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
        if self.engine.discriminator_trainable:
            # The update's forward pass runs on the pre-update discriminator: its student scores
            # are this step's rewards (one pass instead of a separate scoring pass).
            metrics, rewards = self.update_discriminator(teacher, student)
        else:
            metrics, rewards = self.score_students(teacher, student)
        metrics.update(_response_length_stats(samples))
        view = self.teacher_view(student)
        metrics.update(self.reward_diagnostics(rewards, student, samples, view))
        if self.cfg.trainer.oracle_reward:  # white-box upper bound (not GAD): the Bayes-optimal reward
            teacher_lp, actor_lp = view  # log p_T(y|x) - log p_S(y|x) per sample
            rewards = sequence_sums(teacher_lp - actor_lp, student.target_mask).view(rewards.shape)
        advantages = grpo_advantages(rewards).reshape(-1)
        reward, advantage = runtime.global_stats(rewards), runtime.global_stats(advantages)  # pooled over ranks
        metrics.update({"reward/mean": reward["mean"], "reward/std": reward["std"],
                        "advantage/mean": advantage["mean"], "advantage/std": advantage["std"],
                        "advantage/max": advantage["max"], "advantage/min": advantage["min"]})
        # The gate applies here too (verl): the actor waits while step < discriminator_warmup (GAD default 0).
        metrics["actor/updated"] = float(step >= self.cfg.trainer.discriminator_warmup)
        if step >= self.cfg.trainer.discriminator_warmup:
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
        temperature = self.sample_temperature()
        old = None
        if not single_step:
            with self.engine.timer("old_log_probs"):
                old = self.engine.log_probs_no_grad(self.engine.actor, student, a.micro_batch_size, temperature)
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
                                                                        with_entropy=a.entropy_coef > 0,
                                                                        temperature=temperature)
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
            held_out = self.cfg.data.eval_split > 0  # the held-out part of train_files, else eval_files
            self._eval_examples, _ = load_teacher_data(eval_data_config(self.cfg.data), self.tokenizer,
                                                       spec=None if held_out else self.cfg.data.eval_files,
                                                       max_rows=self.cfg.trainer.eval_prompts, part="eval")
        usable = len(self._eval_examples) - len(self._eval_examples) % self.world_size  # equal share per rank:
        mine = self._eval_examples[:usable][self.rank :: self.world_size]  # ZeRO-3 generate runs in lock-step
        samples = self.engine.generate([e.prompt_ids for e in mine], seed=0, greedy=True, n=1)
        texts = [self.tokenizer.decode(g[0], skip_special_tokens=True) for g in samples]
        scores = [rouge_l_f1(text, e.response) for text, e in zip(texts, mine)]
        return {"eval/rouge_l": sum(scores) / max(1, len(scores))}
