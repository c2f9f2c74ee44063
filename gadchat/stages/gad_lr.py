"""GAD with a likelihood-ratio discriminator (``gad_lr``, black-box, beside the published GAD stage).

The discriminator is a causal language model ``q`` (started from the student) whose score of an
answer is its log-likelihood ratio to a frozen baseline ``b``:

    ``D(x, y) = sum_t log q(y_t | x, y_<t) - sum_t log b(y_t | x, y_<t)``

trained, as GAD's discriminator, by Bradley-Terry with each teacher answer preferred over its
prompt's samples (optionally plus a cross-entropy term of ``q`` on the teacher answers). With ``b``
the policy that drew the samples (``--discriminator.baseline pi_old``, default) the Bradley-Terry
optimum is ``q = p_T`` (logistic regression between teacher and student samples learns their
log density ratio ``log p_T - log pi``), so ``q`` is trained toward the teacher itself. The actor's
reward is then per token, ``r_t = log q(y_t) - log pi_old(y_t)`` (the advantages of ``opd`` with
``q`` in the teacher's place), or its sum GRPO-normalised (``--actor.reward_form sequence``). The
teacher gives only text: the stage is black-box.

Per step:

1. the rollout engine samples ``n`` responses per prompt from the student;
2. ``pi_old`` (the actor before its update) scores the samples, and the baseline ``b`` scores the
   teacher answers and the samples;
3. ``q`` takes ``discriminator.updates_per_step`` steps of ``bradley_terry_coef x`` Bradley-Terry
   on ``D`` (+ ``discriminator.sft_coef x`` its cross-entropy on the teacher answers); with
   ``discriminator.replay_steps`` N the Bradley-Terry loss is the mean over this step's pairs and
   those of the last N steps (each with the baselines scored at its own step), and with
   ``discriminator.length_normalised`` ``D`` is the token-mean of the log-ratio, not its sum;
4. the updated ``q`` scores the samples: rewards ``r_t = log q(y_t) - log pi_old(y_t)``;
5. once ``step >= trainer.discriminator_warmup``: the actor takes PPO-clip steps on the per-token
   advantages ``r_t`` (+ ``actor.kl_coef`` x k3 KL to the reference, + ``actor.sft_coef`` x SFT
   on the teacher answers).
"""

from __future__ import annotations

from gadchat import roles, runtime
from gadchat.losses import grpo_advantages, token_log_ratio_rewards
from gadchat.stages import blackbox, common
from gadchat.stages.base import Recipe, StageContext, StepResult
from gadchat.teacher_metrics import sequence_sums


class GADLikelihoodRatio(Recipe):
    name = "gad_lr"
    step_folder = "step5_gad_lr"
    summary = ("GAD with a likelihood-ratio discriminator: q (a causal LM) vs a baseline, per-token "
               "rewards log q - log pi_old (black-box)")
    defaults = {"actor": {"kl_coef": 0.0}, "trainer": {"discriminator_warmup": 0, "epochs": 2.0}}
    init_from_stage = "seqkd"
    teacher_model = "optional"  # read only: the diag/ metrics

    def roles(self, cfg) -> dict:
        out = {"actor": roles.actor(), "discriminator": roles.discriminator(kind=roles.CAUSAL_LM),
               **self.frozen_roles(cfg)}
        if cfg.discriminator.baseline == "reference":
            out["reference"] = roles.reference()
        return out

    def config_problems(self, cfg) -> list:
        n, d = cfg.rollout.n, cfg.discriminator
        problems = []
        if cfg.actor.reward_form == "sequence" and not (isinstance(n, int) and n >= 2):
            problems.append(f"--rollout.n must be >= 2 with --actor.reward_form sequence (GRPO advantages of a "
                            f"single sample are 0), got {n!r}")
        if d.replay_steps > 0 and d.bradley_terry_coef == 0:
            problems.append(f"--discriminator.replay_steps must be 0 when --discriminator.bradley_terry_coef is 0 (the "
                            f"history feeds the Bradley-Terry loss only), got {d.replay_steps!r}")
        return problems

    def step(self, ctx: StageContext, step: int, batch: list) -> StepResult:
        cfg, engine = ctx.cfg, ctx.engine
        a, d = cfg.actor, cfg.discriminator
        answers = common.teacher_batch(ctx, batch)
        samples, student = common.rollout(ctx, step, batch)
        mask = student.target_mask
        temperature = common.sample_temperature(cfg)

        # the baseline b of D, on both sides; pi_old is also the actor's PPO anchor
        baseline_model = engine.actor if d.baseline == "pi_old" else engine.reference
        answer_baseline, sample_baseline = blackbox.pair_log_probs(ctx, baseline_model, answers, student,
                                                                   "baseline_log_probs")
        if d.baseline == "pi_old":
            old = sample_baseline
        else:
            with engine.timer("old_log_probs"):
                old = engine.log_probs_no_grad(engine.actor, student, a.micro_batch_size, temperature)

        # the discriminator q: Bradley-Terry on D over this step's pairs and the replayed ones, each pair
        # set as (its micro-batch parts, the answers' baselines, the samples' baselines); + cross-entropy
        # on the teacher answers
        pair_sets = []
        if d.bradley_terry_coef > 0:  # (replay_steps is 0 otherwise: config_problems)
            pairs = [(answers, student, answer_baseline, sample_baseline)]
            pairs += [blackbox.replayed_pairs(record) for record in ctx.carried.get("replay", [])]
            pair_sets = [(blackbox.pair_parts(t, s, cfg.rollout.n, d.micro_batch_prompts, d.micro_batch_tokens),
                          t_base, s_base) for t, s, t_base, s_base in pairs]
        ce_parts = answers.micro_batches(max(1, d.micro_batch_prompts), tokens=d.micro_batch_tokens)
        metrics = {}
        count = sum(blackbox.pair_backward_passes(parts) for parts, _, _ in pair_sets) + len(ce_parts) * (d.sft_coef > 0)
        with engine.timer("discriminator_update"):
            for repeat in range(d.updates_per_step):
                with engine.update("discriminator", count) as update:
                    for index, (parts, t_base, s_base) in enumerate(pair_sets):
                        t_all, s_all = blackbox.log_ratio_pair_update(
                            ctx, update, engine.discriminator, parts, t_base, s_base, 1.0, temperature,
                            d.bradley_terry_coef / len(pair_sets), d.length_normalised)
                        if repeat == 0 and index == 0:
                            metrics.update(blackbox.pair_metrics("discriminator", t_all, s_all, "d_loss"))
                    if d.sft_coef > 0:
                        ce = common.sft_backward(ctx, update, ce_parts, float(answers.target_mask.sum()),
                                                 model=engine.discriminator, coefficient=d.sft_coef)
                        if repeat == 0:
                            metrics["discriminator/sft_loss"] = ce

        if d.replay_steps > 0:
            ctx.carried["replay"] = blackbox.remember(
                ctx.carried.get("replay", []),
                blackbox.replay_record(answers, student, answer_baseline, sample_baseline), d.replay_steps)

        # per-token rewards from the updated q
        with engine.timer("score"):
            q = engine.log_probs_no_grad(engine.discriminator, student, a.micro_batch_size, temperature)
        token_rewards = token_log_ratio_rewards(q, old, mask)
        sequence_rewards = sequence_sums(token_rewards, mask).view(len(batch), -1)
        if a.reward_form == "token":
            advantages = token_rewards
        else:
            advantages = grpo_advantages(sequence_rewards).reshape(-1)
        reward = runtime.global_stats(sequence_rewards)
        per_token = runtime.global_stats([float(token_rewards.sum() / mask.sum().clamp(min=1))])
        metrics.update({"reward/mean": reward["mean"], "reward/std": reward["std"],
                        "reward/per_token_mean": per_token["mean"]})
        metrics.update(common.response_length_stats(samples))
        view = common.teacher_view(ctx, student, old if temperature == common.rollout_temperature(cfg) else None)
        metrics.update(common.reward_diagnostics(ctx, sequence_rewards, student, samples, view))
        metrics.update(blackbox.token_reward_diagnostics(token_rewards, view, mask))

        if common.actor_gate_open(step, cfg, metrics):
            ref = None if a.kl_coef == 0 else sample_baseline if d.baseline == "reference" else \
                common.reference_log_probs(ctx, student)
            metrics.update(common.policy_update(ctx, student, advantages, ref, old=old, answers=answers))
        return StepResult(metrics, tokens=float(student.attention_mask.sum() + answers.attention_mask.sum()))
