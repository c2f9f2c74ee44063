"""White-box on-policy distillation (OPD), for users whose teacher is an open model they can ctx.

The student samples; the teacher model (a frozen ``teacher`` role, ZeRO-3 like the reference)
scores every sampled token; the actor minimises the per-token reverse KL to the teacher on its own
samples (the on-policy distillation of GKD, Agarwal et al. 2024, and MiniLLM, Gu et al. 2024, in
the sampled per-token form of Thinking Machines' "On-Policy Distillation" post, 2025). It is also
the white-box upper bound of the known-teacher benchmark: how much of what a teacher's
likelihoods buy does black-box GAD recover.

Per step:

1. the rollout engine samples ``n`` responses per prompt from the student (at
   ``rollout.temperature``, default 1 here: the student's own distribution);
2. the teacher gives ``log p_T(y_t | x, y_<t)`` of every sampled token, the actor
   ``log p_old(y_t | x, y_<t)`` before its update;
3. per-token advantages ``A_t = log p_T(y_t) - log p_old(y_t)`` (:func:`reverse_kl_advantages`);
4. the actor takes ``ppo_epochs x mini_batches`` PPO-clip steps on them (plus ``actor.kl_coef``
   x the k3 KL to a frozen reference, off by default).

The teacher's answers in the data are not used: only the prompts.
"""

from __future__ import annotations

import torch

from gadchat import roles
from gadchat.stages import common
from gadchat.stages.base import Recipe, StageContext, StepResult
from gadchat.teacher_metrics import reverse_kl_per_token, teacher_nll_per_token


def reverse_kl_advantages(teacher_log_probs: torch.Tensor, old_log_probs: torch.Tensor,
                          mask: torch.Tensor) -> torch.Tensor:
    """Per-token advantages of on-policy distillation, ``[B, T-1]``:

    ``A_t = m_t * (log p_T(y_t | x, y_<t) - log p_old(y_t | x, y_<t))``

    With the policy gradient of :func:`gadchat.losses.ppo_clip_loss` (ratio 1 on a single step)
    the actor's gradient is ``-(1/N) sum_t A_t grad log p(y_t)``, whose expectation over the
    student's own samples is the gradient of the reverse KL ``KL(p_S || p_T) = E_{y ~ p_S}
    sum_t [log p_S(y_t) - log p_T(y_t)]`` with each token credited with its own log-ratio only
    (discount 0; ``E[grad log p] = 0`` removes the constant). For one token it is the exact
    gradient of ``KL(p_S || p_T)``."""
    return (teacher_log_probs - old_log_probs) * mask


class OPD(Recipe):
    name = "opd"
    step_folder = "step4_opd"
    summary = "white-box on-policy distillation: per-token reverse KL to a teacher model we run"
    defaults = {"rollout": {"temperature": 1.0}, "actor": {"kl_coef": 0.0}, "trainer": {"epochs": 2.0}}

    teacher_model = "required"

    def roles(self, cfg) -> dict:
        return {"actor": roles.actor(), **self.frozen_roles(cfg)}

    def config_problems(self, cfg) -> list:
        if not str(cfg.model.teacher_path).strip():
            return ["--model.teacher_path must name the teacher model (a folder, hub id or builtin: name sharing "
                    "the student's tokenizer) in the opd stage, got ''"]
        return []

    def step(self, ctx: StageContext, step: int, batch: list) -> StepResult:
        cfg, engine = ctx.cfg, ctx.engine
        samples, student = common.rollout(ctx, step, batch)
        mask = student.target_mask

        teacher_lp = common.teacher_log_probs(ctx, student)
        with engine.timer("old_log_probs"):
            old = engine.log_probs_no_grad(engine.actor, student, cfg.actor.micro_batch_size,
                                           common.sample_temperature(cfg))
        advantages = reverse_kl_advantages(teacher_lp, old, mask)

        metrics = common.response_length_stats(samples)
        metrics["opd/reverse_kl"] = reverse_kl_per_token(old, teacher_lp, mask)  # sampled, per token
        metrics["opd/teacher_nll"] = teacher_nll_per_token(teacher_lp, mask)
        ref = common.reference_log_probs(ctx, student)
        metrics.update(common.policy_update(ctx, student, advantages, ref, old=old))
        return StepResult(metrics, tokens=float(student.attention_mask.sum()))
