"""SeqKD, the baseline: supervised fine-tuning of the student on the teacher's responses.

Per step: the token-mean cross-entropy of the teacher responses under the actor (each response's
EOS included), one optimizer step. Optional progress signal: every ``trainer.eval_every`` steps,
ROUGE-L of greedy rollouts against held-out teacher answers.
"""

from __future__ import annotations

from gadchat import roles
from gadchat.losses import sft_loss
from gadchat.stages import common
from gadchat.stages.base import Recipe, StageContext, StepResult


class SeqKD(Recipe):
    name = "seqkd"
    step_folder = "step1_seqkd"
    summary = "SeqKD baseline: SFT on the teacher responses"
    defaults = {"actor": {"lr": 5e-6, "kl_coef": 0.0}, "trainer": {"epochs": 3.0, "discriminator_warmup": 0}}

    def roles(self, cfg) -> dict:
        return {"actor": roles.actor()}

    def uses_rollout(self, cfg) -> bool:
        return cfg.trainer.eval_every > 0  # only the ROUGE-L evaluation samples

    def step(self, ctx: StageContext, step: int, batch: list) -> StepResult:
        cfg, engine = ctx.cfg, ctx.engine
        teacher = common.teacher_batch(ctx, batch)
        tokens = float(teacher.target_mask.sum())
        temperature = common.sft_temperature(cfg)

        parts = teacher.micro_batches(cfg.actor.micro_batch_size, tokens=cfg.actor.micro_batch_tokens)
        with engine.timer("actor_update"), engine.update("actor", len(parts)) as update:
            for _, part in parts:
                log_probs, _ = engine.log_probs(engine.actor, part, temperature=temperature)
                update.backward(sft_loss(log_probs, part.target_mask.to(log_probs.device), denominator=tokens))

        metrics = {"actor/sft_loss": update.loss}
        if cfg.trainer.eval_every and (step + 1) % cfg.trainer.eval_every == 0:
            metrics.update(common.rouge_eval(ctx))
        return StepResult(metrics, tokens=float(teacher.attention_mask.sum()))
