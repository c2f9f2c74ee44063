"""SPIN (Self-Play Fine-Tuning, Chen et al., ICML 2024), black-box: the actor is its own
discriminator.

SPIN trains on SFT data with DPO's loss, the human (here: teacher) answer chosen and the model's own
sample rejected; its implicit reward ``beta (log pi(y|x) - log ref(y|x))`` plays the discriminator,
and its iterations refresh the reference (the opponent) to the latest model. Chen et al. report it
beating SFT on the same SFT data at 7B. Here the samples are drawn fresh every step (on-policy), the
reference is the stage's start model or, with ``--actor.reference_refresh_every K``, a copy of the
actor refreshed every ``K`` steps (SPIN's iterations).

Per step:

1. the rollout engine samples ``n`` responses per prompt from the student;
2. the reference scores each prompt's teacher answer and its samples;
3. the actor takes one step on ``L = mean_{p,i} -logsigmoid(beta (h(y_T,p) - h(y_p,i)))`` with
   ``h = log pi - log ref`` summed over each answer (:func:`gadchat.losses.dpo_loss`), plus
   ``actor.sft_coef`` x its cross-entropy on the teacher answers.

Log-probs of both sides are taken at the rollout's sampling temperature (one distribution on both
sides of each pair). The implicit per-token reward ``beta (log pi(y_t) - log ref(y_t))`` is
compared with the teacher's per-token log-ratio in ``diag/token_reward_pearson`` when a teacher
model is named.
"""

from __future__ import annotations

from gadchat import roles
from gadchat.stages import blackbox, common
from gadchat.stages.base import Recipe, StageContext, StepResult


class SPIN(Recipe):
    name = "spin"
    step_folder = "step6_spin"
    summary = "SPIN: DPO with the teacher's answer chosen and the student's own samples rejected (black-box)"
    defaults = {"actor": {"kl_coef": 0.0}, "trainer": {"discriminator_warmup": 0, "epochs": 2.0}}
    init_from_stage = "seqkd"
    teacher_model = "optional"  # read only: the diag/ metrics

    def roles(self, cfg) -> dict:
        return {"actor": roles.actor(), **self.frozen_roles(cfg), "reference": roles.reference()}

    def config_problems(self, cfg) -> list:
        every, save = cfg.actor.reference_refresh_every, cfg.trainer.save_every
        refreshed = isinstance(every, int) and every > 0
        problems = []
        if refreshed and isinstance(save, int) and save % every:
            problems.append(f"--trainer.save_every must be a multiple of --actor.reference_refresh_every ({every}) in "
                            f"the spin stage, so that a resumed run restores the same reference, got {save!r}")
        if refreshed and cfg.actor.lora_rank > 0:
            problems.append(f"--actor.reference_refresh_every must be 0 with --actor.lora_rank {cfg.actor.lora_rank}: "
                            "the LoRA actor's reference is the actor with its adapter off (the start model), which "
                            f"cannot be refreshed, got {every}")
        return problems

    def step(self, ctx: StageContext, step: int, batch: list) -> StepResult:
        cfg, engine, a = ctx.cfg, ctx.engine, ctx.cfg.actor
        every = a.reference_refresh_every
        if every and step % every == 0 and step > 0:  # SPIN's next iteration: the opponent is the current model
            engine.refresh_reference_from_actor()
        answers = common.teacher_batch(ctx, batch)
        samples, student = common.rollout(ctx, step, batch)
        mask = student.target_mask
        temperature = common.sample_temperature(cfg)

        answer_ref, sample_ref = blackbox.pair_log_probs(ctx, engine.reference, answers, student, "reference_log_probs")
        view = common.teacher_view(ctx, student)  # before the update: the actor that drew the samples
        parts = blackbox.pair_parts(answers, student, cfg.rollout.n, max(1, a.micro_batch_size // cfg.rollout.n),
                                    a.micro_batch_tokens)
        ptx = common.actor_micro_batches(ctx, answers) if a.sft_coef > 0 else []
        with engine.timer("actor_update"), \
                engine.update("actor", blackbox.pair_backward_passes(parts) + len(ptx)) as update:
            chosen, rejected = blackbox.log_ratio_pair_update(ctx, update, engine.actor, parts, answer_ref, sample_ref,
                                                              a.dpo_beta, temperature)
            sft = common.sft_backward(ctx, update, ptx, float(answers.target_mask.sum()),
                                      coefficient=a.sft_coef) if ptx else None

        metrics = blackbox.pair_metrics("spin", chosen, rejected)  # implicit rewards beta * h, before the update
        if sft is not None:
            metrics["actor/sft_loss"] = sft
        metrics.update(common.response_length_stats(samples))
        metrics.update(common.reward_diagnostics(ctx, rejected, student, samples, view))
        if view is not None:
            _, actor_lp = view  # the implicit per-token reward of the samples, beta (log pi - log ref)
            metrics.update(blackbox.token_reward_diagnostics(a.dpo_beta * (actor_lp - sample_ref) * mask, view, mask))
        return StepResult(metrics, tokens=float(student.attention_mask.sum() + answers.attention_mask.sum()))
