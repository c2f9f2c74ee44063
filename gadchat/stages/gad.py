"""GAD: the student learns by policy gradient on the discriminator's scores, while the
discriminator keeps learning to tell teacher from student on fresh samples.

Per step:

1. the rollout engine samples ``n`` responses per prompt from the student;
2. the discriminator scores the samples (the rewards, taken before its own update) and takes one
   Bradley-Terry step, teacher preferred over student (frozen with ``discriminator.freeze``: the
   reward-hackable ablation);
3. GRPO advantages: each reward minus its prompt group's mean, over the group's std;
4. once ``step >= trainer.discriminator_warmup`` (default 0 here): the actor takes
   ``ppo_epochs x mini_batches`` PPO-clip steps on the advantages, plus ``actor.kl_coef`` x the k3
   KL to the frozen reference (and an optional entropy bonus).
"""

from __future__ import annotations

from gadchat import roles, runtime
from gadchat.losses import grpo_advantages
from gadchat.stages import common
from gadchat.stages.base import Recipe, StageContext, StepResult
from gadchat.teacher_metrics import sequence_sums


class GAD(Recipe):
    name = "gad"
    step_folder = "step3_gad"
    summary = "GAD: GRPO policy gradient on the discriminator's scores, discriminator keeps training"
    defaults = {"trainer": {"discriminator_warmup": 0, "epochs": 2.0}}
    init_from_stage = "warmup"
    teacher_model = "optional"  # read only: the diag/ metrics and --trainer.oracle_reward

    def roles(self, cfg) -> dict:
        return {"actor": roles.actor(), "discriminator": roles.discriminator(trains=not cfg.discriminator.freeze),
                **self.frozen_roles(cfg)}

    def config_problems(self, cfg) -> list:
        n = cfg.rollout.n
        if not (isinstance(n, int) and n >= 2):
            return [f"--rollout.n must be >= 2 in the GAD stage (GRPO advantages of a single sample are 0), got {n!r}"]
        return []

    def step(self, ctx: StageContext, step: int, batch: list) -> StepResult:
        cfg, engine = ctx.cfg, ctx.engine
        teacher_seqs = common.teacher_batch(ctx, batch)
        samples, student = common.rollout(ctx, step, batch)

        # rewards: the discriminator's scores of the samples, before its own update
        if engine.trains("discriminator"):
            metrics, rewards = common.discriminator_update(ctx, teacher_seqs, student)
        else:
            metrics, rewards = common.discriminator_scores(ctx, teacher_seqs, student)
        metrics.update(common.response_length_stats(samples))
        view = common.teacher_view(ctx, student)
        metrics.update(common.reward_diagnostics(ctx, rewards, student, samples, view))
        if cfg.trainer.oracle_reward:  # white-box upper bound (not GAD): the Bayes-optimal reward
            teacher_lp, actor_lp = view  # log p_T(y|x) - log p_S(y|x) per sample
            rewards = sequence_sums(teacher_lp - actor_lp, student.target_mask).view(rewards.shape)

        advantages = grpo_advantages(rewards).reshape(-1)
        reward, advantage = runtime.global_stats(rewards), runtime.global_stats(advantages)  # pooled over ranks
        metrics.update({"reward/mean": reward["mean"], "reward/std": reward["std"],
                        "advantage/mean": advantage["mean"], "advantage/std": advantage["std"],
                        "advantage/max": advantage["max"], "advantage/min": advantage["min"]})

        # actor: policy gradient, once past the gate (verl applies it here too)
        if common.actor_gate_open(step, cfg, metrics):
            ref = common.reference_log_probs(ctx, student)
            metrics.update(common.policy_update(ctx, student, advantages, ref))
        return StepResult(metrics, tokens=float(student.attention_mask.sum() + teacher_seqs.attention_mask.sum()))
