"""GAD warm-up: the discriminator learns to tell teacher from student while the actor imitates
the teacher.

Per step:

1. the rollout engine samples ``n`` responses per prompt from the student;
2. the discriminator takes one Bradley-Terry step, each prompt's teacher response preferred over
   each of its samples (every step);
3. only once ``step >= trainer.discriminator_warmup``: the actor takes one step on the token-mean
   cross-entropy of the teacher responses, plus ``actor.kl_coef`` x the k3 KL to the frozen
   reference on the samples.
"""

from __future__ import annotations

from gadchat import roles
from gadchat.losses import kl_loss
from gadchat.stages import common
from gadchat.stages.base import Recipe, StageContext, StepResult


class Warmup(Recipe):
    name = "warmup"
    step_folder = "step2_warmup"
    summary = "GAD warm-up: discriminator Bradley-Terry updates, gated actor SFT on the teacher"
    defaults = {"trainer": {"discriminator_warmup": 10}}

    teacher_model = "optional"  # read only, for the diag/ metrics

    def roles(self, cfg) -> dict:
        return {"actor": roles.actor(), "discriminator": roles.discriminator(), **self.frozen_roles(cfg)}

    def step(self, ctx: StageContext, step: int, batch: list) -> StepResult:
        cfg, engine = ctx.cfg, ctx.engine
        teacher_seqs = common.teacher_batch(ctx, batch)
        samples, student = common.rollout(ctx, step, batch)

        # discriminator: every step
        metrics, scores = common.discriminator_update(ctx, teacher_seqs, student)
        metrics.update(common.response_length_stats(samples))
        metrics.update(common.reward_diagnostics(ctx, scores, student, samples, common.teacher_view(ctx, student)))

        # actor: SFT on the teacher (+ KL to the reference on the samples), once past the gate
        if common.actor_gate_open(step, cfg, metrics):
            ref = common.reference_log_probs(ctx, student)  # None without a reference (kl_coef 0)
            sft_parts = common.actor_micro_batches(ctx, teacher_seqs)
            kl_parts = common.actor_micro_batches(ctx, student) if ref is not None else []
            kl_tokens = student.target_mask.sum().clamp(min=1)
            kl_values = []
            with engine.timer("actor_update"), engine.update("actor", len(sft_parts) + len(kl_parts)) as update:
                common.sft_backward(ctx, update, sft_parts, tokens=float(teacher_seqs.target_mask.sum()))
                for rows, part in kl_parts:
                    log_probs, _ = engine.log_probs(engine.actor, part, temperature=common.sample_temperature(cfg))
                    ref_part = ref[rows, : log_probs.shape[1]].to(log_probs.device)
                    kl = kl_loss(log_probs, ref_part, part.target_mask.to(log_probs.device), denominator=kl_tokens)
                    kl_values.append(float(kl.detach()))
                    update.backward(cfg.actor.kl_coef * kl)
            kl = sum(kl_values)
            # the SFT share of the update's loss (kept as a difference: stage parity is bit-exact)
            metrics["actor/sft_loss"] = update.loss - cfg.actor.kl_coef * kl
            if kl_parts:
                metrics["actor/kl"] = kl
        return StepResult(metrics, tokens=float(student.attention_mask.sum() + teacher_seqs.attention_mask.sum()))
