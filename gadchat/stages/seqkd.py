"""SeqKD, the baseline: supervised fine-tuning of the student on the teacher's responses.

Per step: the token-mean cross-entropy of the teacher responses under the actor (each response's
EOS included), one optimizer step. Optional progress signals, every ``trainer.eval_every`` steps:
the forward NLL of held-out teacher answers (SFT overfits past a point: the step where it is lowest
is SFT's best checkpoint, ``inference.export --best-by eval/forward_nll``) and ROUGE-L of greedy
rollouts against them.
"""

from __future__ import annotations

from gadchat import roles
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
        teacher_seqs = common.teacher_batch(ctx, batch)

        parts = common.actor_micro_batches(ctx, teacher_seqs)
        with engine.timer("actor_update"), engine.update("actor", len(parts)) as update:
            common.sft_backward(ctx, update, parts, tokens=float(teacher_seqs.target_mask.sum()))

        metrics = {"actor/sft_loss": update.loss}
        if cfg.trainer.eval_every and (step + 1) % cfg.trainer.eval_every == 0:
            metrics.update(common.held_out_eval(ctx))
        return StepResult(metrics, tokens=float(teacher_seqs.attention_mask.sum()))
