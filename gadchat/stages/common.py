"""Pieces several stage recipes share: batches, rollouts, the discriminator's Bradley-Terry update,
reference and teacher log-probs, the teacher diagnostics, the PPO-clip policy update, and ROUGE-L
evaluation. Each is a plain
function of the running stage's context (``ctx``: :class:`gadchat.stages.base.StageContext`)."""

from __future__ import annotations

import math

import torch

from gadchat import runtime
from gadchat.batch import SequenceBatch
from gadchat.diagnostics import reward_step_metrics
from gadchat.losses import (bradley_terry_loss, bradley_terry_student_terms, bradley_terry_teacher_gradient,
                            discriminator_metrics, kl_loss, masked_mean, ppo_clip_loss, sft_loss)


def rollout_temperature(cfg, scaled: bool = True) -> float:
    """The rollout's temperature when ``scaled`` and it is > 0 (greedy rollouts have none), else 1
    (raw logits): the one rule behind every log-prob temperature."""
    temperature = cfg.rollout.temperature
    return temperature if scaled and temperature > 0 else 1.0


def sample_temperature(cfg) -> float:
    """Temperature of the log-probs of student samples (actor, old, reference): the rollout's
    when ``actor.temperature_scaled_logprobs`` (verl), else 1 (raw logits)."""
    return rollout_temperature(cfg, cfg.actor.temperature_scaled_logprobs)


def sft_temperature(cfg) -> float:
    """Temperature of the SFT log-probs on teacher text: 1 unless ``actor.sft_temperature_scaled``."""
    return rollout_temperature(cfg, cfg.actor.sft_temperature_scaled)


def actor_gate_open(step: int, cfg, metrics: dict) -> bool:
    """Whether the actor updates at ``step``: once ``step >= trainer.discriminator_warmup`` (verl's
    ``critic_warmup``; the discriminator trains from step 0). Logged as ``actor/updated``."""
    opened = step >= cfg.trainer.discriminator_warmup
    metrics["actor/updated"] = float(opened)
    return opened


def actor_micro_batches(ctx, sequences: SequenceBatch) -> list:
    """The actor's micro-batches of ``sequences`` (``actor.micro_batch_size`` rows, or the
    ``actor.micro_batch_tokens`` budget)."""
    return sequences.micro_batches(ctx.cfg.actor.micro_batch_size, tokens=ctx.cfg.actor.micro_batch_tokens)


def sft_backward(ctx, update, parts: list, tokens: float, model=None, coefficient: float = 1.0) -> float:
    """The backward passes of ``coefficient x`` the token-mean cross-entropy of teacher responses
    (each response's EOS included) under ``model`` (default the actor) over ``parts``
    (:func:`actor_micro_batches`), ``tokens`` their response tokens in all; inside ``update``, that
    model's update. Returns the cross-entropy (without the coefficient)."""
    temperature = sft_temperature(ctx.cfg)
    total = 0.0
    for _, part in parts:
        log_probs, _ = ctx.engine.log_probs(ctx.engine.actor if model is None else model, part, temperature=temperature)
        loss = sft_loss(log_probs, part.target_mask.to(log_probs.device), denominator=tokens)
        total += float(loss.detach())
        update.backward(loss if coefficient == 1.0 else coefficient * loss)
    return total


def teacher_batch(ctx, batch) -> SequenceBatch:
    """The teacher responses of ``batch`` as one ``SequenceBatch``."""
    return SequenceBatch.build([e.prompt_ids for e in batch], [e.response_ids for e in batch], ctx.engine.pad_token_id)


def rollout(ctx, step: int, batch):
    """Sample ``n`` responses per prompt; returns them and their prompt-major ``SequenceBatch``."""
    n = ctx.cfg.rollout.n
    samples = ctx.engine.generate([e.prompt_ids for e in batch], seed=ctx.rollout_seed(step))
    prompts = [e.prompt_ids for e in batch for _ in range(n)]
    responses = [s for group in samples for s in group]
    return samples, SequenceBatch.build(prompts, responses, ctx.engine.pad_token_id)


def response_length_stats(samples: list) -> dict:
    """Mean and max response length over every rank's samples (a global max, not a mean of maxima)."""
    stats = runtime.global_stats([len(s) for group in samples for s in group])
    return {"response_length/mean": stats["mean"], "response_length/max": stats["max"]}


def discriminator_update(ctx, teacher_seqs: SequenceBatch, student: SequenceBatch):
    """Bradley-Terry update of the discriminator (teacher response preferred over each of its
    prompt's ``n`` samples). Micro-batched by prompt (``micro_batch_prompts``: a micro-batch holds
    its prompts' teacher sequences and samples), or by rows under ``micro_batch_tokens``
    (:func:`bradley_terry_by_rows`). Returns the metrics and the student scores of the forward
    pass, taken before this step's update (the GAD stage's rewards)."""
    engine, n, prompts = ctx.engine, ctx.cfg.rollout.n, len(teacher_seqs)
    budget = ctx.cfg.discriminator.micro_batch_tokens
    if budget > 0:
        teacher_parts = teacher_seqs.micro_batches(0, tokens=budget)
        student_parts = student.micro_batches(0, tokens=budget)
        with engine.timer("discriminator_update"), \
                engine.update("discriminator", len(teacher_parts) + len(student_parts)) as update:
            score = lambda _rows, part: engine.scores(part)  # noqa: E731
            teacher_scores, student_scores = bradley_terry_by_rows(score, score, update.backward, teacher_parts,
                                                                   student_parts, n)
        with torch.no_grad():
            d_loss = float(bradley_terry_loss(teacher_scores, student_scores))
    else:
        per = max(1, ctx.cfg.discriminator.micro_batch_prompts)
        groups = [list(range(start, min(start + per, prompts))) for start in range(0, prompts, per)]
        teacher_scores, student_scores = torch.zeros(prompts), torch.zeros(prompts, n)
        with engine.timer("discriminator_update"), engine.update("discriminator", len(groups)) as update:
            for group in groups:
                rows = torch.tensor(group, dtype=torch.long)
                teacher_part = engine.scores(teacher_seqs.select(rows))
                student_part = engine.scores(student.select(sample_rows(rows, n))).view(len(group), n)
                teacher_scores[rows] = teacher_part.detach().float().cpu()
                student_scores[rows] = student_part.detach().float().cpu()
                update.backward(bradley_terry_loss(teacher_part, student_part) * (len(group) / prompts))
        d_loss = update.loss
    metrics = {"discriminator/d_loss": d_loss}
    metrics.update({f"discriminator/{k}": v for k, v in discriminator_metrics(teacher_scores, student_scores).items()})
    return metrics, student_scores


def bradley_terry_by_rows(score_teacher, score_student, backward, teacher_parts: list, student_parts: list,
                          n: int):
    """The gradient of one Bradley-Terry loss ``L_D = mean_{p,i} -logsigmoid(t_p - s_{p,i})``
    accumulated over micro-batches of rows in any grouping (by length, across prompts), exactly:

    1. the teacher sequences' scores ``t``, without gradient;
    2. each student micro-batch: forward, then backward of its terms with ``t`` fixed
       (:func:`~gadchat.losses.bradley_terry_student_terms`: their gradient in ``s`` is L_D's);
    3. each teacher micro-batch again: forward, then backward of ``t . dL_D/dt`` computed from all
       the student scores (:func:`~gadchat.losses.bradley_terry_teacher_gradient`).

    Against micro-batches of whole prompts this costs one more forward over the teacher rows,
    and pads only between rows of similar length. ``score_teacher(rows, part)`` and
    ``score_student(rows, part)`` give a teacher / student part's scores with gradient (``rows``: its
    row indices, for scores that read per-row inputs), ``backward(loss)`` back-propagates one micro-batch; the parts are
    ``(row_indices, SequenceBatch)`` of :meth:`SequenceBatch.micro_batches` (teacher rows index
    prompts, student rows are prompt-major, ``n`` per prompt). Returns the teacher scores ``[P]``
    and the student scores ``[P, n]`` of the forward passes (before any update)."""
    prompts = sum(len(index) for index, _ in teacher_parts)
    teacher_scores, student_scores = torch.zeros(prompts), torch.zeros(prompts * n)
    with torch.no_grad():
        for index, part in teacher_parts:
            teacher_scores[index] = score_teacher(index, part).float().cpu()
    for index, part in student_parts:
        part_scores = score_student(index, part)
        backward(bradley_terry_student_terms(teacher_scores[index // n].to(part_scores), part_scores, prompts * n))
        student_scores[index] = part_scores.detach().float().cpu()
    student_scores = student_scores.view(prompts, n)
    coefficient = bradley_terry_teacher_gradient(teacher_scores, student_scores)
    for index, part in teacher_parts:
        part_scores = score_teacher(index, part)
        backward((part_scores * coefficient[index].to(part_scores)).sum())
    return teacher_scores, student_scores


def sample_rows(prompt_rows: torch.Tensor, n: int) -> torch.Tensor:
    """The rows of a prompt-major student batch that hold the ``n`` samples of each of ``prompt_rows``."""
    return (prompt_rows.unsqueeze(1) * n + torch.arange(n)).reshape(-1)


def discriminator_scores(ctx, teacher_seqs: SequenceBatch, student: SequenceBatch):
    """The discriminator's scores without an update (a frozen discriminator): metrics and the
    student scores ``[prompts, n]``."""
    mb = max(1, ctx.cfg.discriminator.micro_batch_prompts) * ctx.cfg.rollout.n
    with ctx.engine.timer("score"):
        teacher_scores = ctx.engine.scores_no_grad(teacher_seqs, mb)
        student_scores = ctx.engine.scores_no_grad(student, mb).view(len(teacher_seqs), -1)
    metrics = {f"discriminator/{k}": v for k, v in discriminator_metrics(teacher_scores, student_scores).items()}
    with torch.no_grad():
        metrics["discriminator/d_loss"] = float(bradley_terry_loss(teacher_scores, student_scores))
    return metrics, student_scores


def reference_log_probs(ctx, student: SequenceBatch) -> torch.Tensor | None:
    """The frozen reference's log-probs ``[B, T-1]`` of the samples at the sampling temperature
    (``None`` when the stage has no reference: ``actor.kl_coef`` 0)."""
    if ctx.engine.reference is None:
        return None
    with ctx.engine.timer("reference_log_probs"):
        return ctx.engine.log_probs_no_grad(ctx.engine.reference, student, ctx.cfg.actor.micro_batch_size,
                                            temperature=sample_temperature(ctx.cfg))


def teacher_log_probs(ctx, student: SequenceBatch) -> torch.Tensor:
    """The teacher role's log-probs ``[B, T-1]`` of the samples on its raw logits (temperature 1:
    the teacher's own distribution)."""
    with ctx.engine.timer("teacher_log_probs"):
        return ctx.engine.log_probs_no_grad(ctx.engine.teacher, student, ctx.cfg.actor.micro_batch_size)


def teacher_view(ctx, student: SequenceBatch, sampling_log_probs: torch.Tensor | None = None):
    """``(teacher, actor)`` log-probs ``[B, T-1]`` of the rollouts under the teacher role and
    under the distribution they were drawn from (the actor's logits over the rollout
    temperature, whatever ``actor.temperature_scaled_logprobs`` says); ``None`` when the stage
    has no teacher (``model.teacher_path`` empty). Computed once per step for the diagnostics and
    the oracle reward. ``sampling_log_probs``: those actor log-probs when the stage already holds
    them (its ``pi_old`` at the rollout temperature), not computed again."""
    if ctx.engine.teacher is None:
        return None
    actor = sampling_log_probs
    if actor is None:
        with ctx.engine.timer("diagnostics"):
            actor = ctx.engine.log_probs_no_grad(ctx.engine.actor, student, ctx.cfg.actor.micro_batch_size,
                                                 temperature=rollout_temperature(ctx.cfg))
    return teacher_log_probs(ctx, student), actor


def reward_diagnostics(ctx, rewards: torch.Tensor, student: SequenceBatch, samples: list, view) -> dict:
    """``diag/...`` metrics from :func:`teacher_view`'s ``view`` (empty when it is ``None``)."""
    if view is None:
        return {}
    return reward_step_metrics(rewards, student.target_mask, *view, samples, ctx.engine.eos_ids)


def policy_update(ctx, student: SequenceBatch, advantages: torch.Tensor, ref: torch.Tensor | None,
                  old: torch.Tensor | None = None, answers: SequenceBatch | None = None) -> dict:
    """PPO-clip + k3 KL to the reference (+ entropy bonus) over ``actor.ppo_epochs`` x
    ``actor.mini_batches`` optimizer steps of the actor on the student samples.

    ``advantages``: ``[B]`` (one per sample, broadcast over its tokens) or ``[B, T-1]`` (per
    token). ``old``: the sampling policy's log-probs ``[B, T-1]``; when ``None`` they are the
    detached current log-probs with a single step per batch (the ratio is exactly 1), otherwise
    computed once before the first update. ``answers``: the teacher answers, for ``actor.sft_coef``
    x their token-mean cross-entropy added to the first optimizer step (InstructGPT's PPO-ptx)."""
    actor_cfg, engine = ctx.cfg.actor, ctx.engine
    rows = len(student)
    temperature = sample_temperature(ctx.cfg)
    if old is None and not (actor_cfg.ppo_epochs == 1 and actor_cfg.mini_batches == 1):
        with engine.timer("old_log_probs"):
            old = engine.log_probs_no_grad(engine.actor, student, actor_cfg.micro_batch_size, temperature)
    sums = {"pg_loss": 0.0, "kl": 0.0, "entropy": 0.0, "clip_fraction": 0.0}
    updates, ptx_loss = 0, None
    mini_size = math.ceil(rows / actor_cfg.mini_batches)
    with engine.timer("actor_update"):
        for _epoch in range(actor_cfg.ppo_epochs):
            for mini_start in range(0, rows, mini_size):
                mini_end = min(rows, mini_start + mini_size)
                denominator = student.target_mask[mini_start:mini_end].sum().clamp(min=1)
                parts = student.micro_batches(actor_cfg.micro_batch_size, mini_start, mini_end,
                                              tokens=actor_cfg.micro_batch_tokens)
                ptx = actor_micro_batches(ctx, answers) if answers is not None and actor_cfg.sft_coef > 0 \
                    and updates == 0 else []
                with engine.update("actor", len(parts) + len(ptx)) as update:
                    if ptx:
                        ptx_loss = sft_backward(ctx, update, ptx, float(answers.target_mask.sum()),
                                                coefficient=actor_cfg.sft_coef)
                    for picked, part in parts:
                        log_probs, entropy = engine.log_probs(engine.actor, part,
                                                              with_entropy=actor_cfg.entropy_coef > 0,
                                                              temperature=temperature)
                        mask = part.target_mask.to(log_probs.device)
                        width = log_probs.shape[1]
                        old_lp = log_probs.detach() if old is None else old[picked, :width].to(log_probs.device)
                        adv = advantages[picked] if advantages.dim() == 1 else advantages[picked, :width]
                        adv = adv.to(log_probs.device)
                        pg, clip_fraction = ppo_clip_loss(log_probs, old_lp, adv, mask, actor_cfg.clip_eps, denominator)
                        loss = pg
                        sums["pg_loss"] += float(pg.detach())
                        sums["clip_fraction"] += float(clip_fraction) * float(mask.sum() / denominator)
                        if ref is not None and actor_cfg.kl_coef > 0:
                            kl = kl_loss(log_probs, ref[picked, :width].to(log_probs.device), mask, denominator)
                            loss = loss + actor_cfg.kl_coef * kl
                            sums["kl"] += float(kl.detach())
                        if entropy is not None:
                            ent = masked_mean(entropy, mask, denominator)
                            loss = loss - actor_cfg.entropy_coef * ent
                            sums["entropy"] += float(ent.detach())
                        update.backward(loss)
                updates += 1
    out = {f"actor/{k}": v / updates for k, v in sums.items()}
    if actor_cfg.entropy_coef == 0:
        out.pop("actor/entropy")
    if ptx_loss is not None:
        out["actor/sft_loss"] = ptx_loss
    return out


def held_out_eval(ctx) -> dict:
    """SeqKD's progress signals on the first ``trainer.eval_prompts`` held-out examples (the
    ``data.eval_split`` part of the training files, else ``data.eval_files``), both black-box:

    - ``eval/forward_nll``: the actor's token-mean NLL of the held-out teacher answers, pooled over
      every rank's tokens (what SFT minimises; the measure that picks SFT's best checkpoint);
    - ``eval/rouge_l``: ROUGE-L F1 of greedy answers against the teacher's."""
    from gadchat.rouge import rouge_l_f1

    engine, examples = ctx.engine, ctx.eval_examples
    usable = len(examples) - len(examples) % ctx.world_size  # equal share per rank:
    mine = examples[:usable][ctx.rank :: ctx.world_size]  # ZeRO-3 forwards run in lock-step
    answers = teacher_batch(ctx, mine)
    log_probs = engine.log_probs_no_grad(engine.actor, answers, ctx.cfg.actor.micro_batch_size)
    all_tokens = runtime.global_stats([float(answers.target_mask.sum())])["mean"] * ctx.world_size
    nll = float(-(log_probs * answers.target_mask).sum())
    samples = engine.generate([e.prompt_ids for e in mine], seed=0, greedy=True, n=1)
    texts = [ctx.tokenizer.decode(g[0], skip_special_tokens=True) for g in samples]
    scores = [rouge_l_f1(text, e.response) for text, e in zip(texts, mine)]
    # the step metrics are averaged over ranks: this rank's share times the rank count pools them
    return {"eval/forward_nll": nll / max(all_tokens, 1.0) * ctx.world_size,
            "eval/rouge_l": sum(scores) / max(1, len(scores))}
