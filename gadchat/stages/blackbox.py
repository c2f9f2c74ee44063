"""Pieces the black-box per-token stages share (``gad_lr``: a language-model discriminator whose
log-ratio to a baseline is the reward; ``spin``: the actor is its own discriminator): a pairwise
update over sequence log-ratios, micro-batched by rows with the exact Bradley-Terry gradient, the
cross-entropy term on the teacher answers, and the per-token reward diagnostic. Plain functions of
the running stage's context ``ctx``, as in :mod:`gadchat.stages.common`."""

from __future__ import annotations

import torch

from gadchat.batch import SequenceBatch
from gadchat.losses import bradley_terry_loss, discriminator_metrics, sequence_log_ratio
from gadchat.stages.common import bradley_terry_by_rows, sample_temperature
from gadchat.teacher_metrics import token_pearson


def pair_parts(answers: SequenceBatch, samples: SequenceBatch, n: int, prompts_per_part: int, tokens: int):
    """Micro-batches ``(answer_parts, sample_parts)`` of a pairwise update: ``prompts_per_part``
    teacher answers and ``prompts_per_part x n`` samples per part, or rows by a ``tokens`` budget."""
    per = max(1, prompts_per_part)
    return answers.micro_batches(per, tokens=tokens), samples.micro_batches(per * n, tokens=tokens)


def pair_log_probs(ctx, model, answers: SequenceBatch, samples: SequenceBatch, phase: str):
    """No-grad log-probs ``[rows, T-1]`` of ``model`` (a frozen baseline or reference, or the actor
    before its update) on the teacher answers and on the samples, at the sampling temperature (one
    distribution on both sides of each pair), timed as ``phase``."""
    engine, size = ctx.engine, ctx.cfg.actor.micro_batch_size
    temperature = sample_temperature(ctx.cfg)
    with engine.timer(phase):
        return (engine.log_probs_no_grad(model, answers, size, temperature),
                engine.log_probs_no_grad(model, samples, size, temperature))


def pair_backward_passes(parts) -> int:
    """The backward passes of :func:`log_ratio_pair_update` over ``parts``: one per part."""
    return len(parts[0]) + len(parts[1])


def log_ratio_pair_update(ctx, update, model, parts, answer_baseline: torch.Tensor, sample_baseline: torch.Tensor,
                          scale: float, temperature: float, coefficient: float = 1.0, length_normalised: bool = False):
    """Back-propagate ``coefficient x`` the Bradley-Terry loss of the scores
    ``s(y) = scale * sum_t (log model(y_t) - log b(y_t))`` (:func:`~gadchat.losses.sequence_log_ratio`;
    ``length_normalised``: the token-mean instead of the sum),
    each prompt's teacher answer preferred over each of its ``n`` samples, into ``update``
    (:func:`pair_backward_passes` of them; the answers are run forward twice).

    With ``model`` the discriminator ``q`` and ``scale`` 1 this is the gad_lr discriminator's loss;
    with ``model`` the actor, ``b`` the reference and ``scale = beta`` it is SPIN's DPO loss
    (:func:`~gadchat.losses.dpo_loss`). ``parts``: :func:`pair_parts`; the gradient is exact in any
    grouping (:func:`~gadchat.stages.common.bradley_terry_by_rows`). Baselines are ``[rows, T-1]``
    no-grad log-probs aligned with the answers and the samples. Returns the answers' and the
    samples' scores ``[P]``, ``[P, n]`` (before this update)."""
    engine = ctx.engine
    answer_parts, sample_parts = parts

    def score(baseline):
        def of(rows, part):
            log_probs, _ = engine.log_probs(model, part, temperature=temperature)
            width = log_probs.shape[1]
            mask = part.target_mask.to(log_probs.device)
            return scale * sequence_log_ratio(log_probs, baseline[rows, :width].to(log_probs.device), mask,
                                              length_normalised)
        return of

    return bradley_terry_by_rows(score(answer_baseline), score(sample_baseline),
                                 lambda loss: update.backward(coefficient * loss), answer_parts, sample_parts,
                                 ctx.cfg.rollout.n)


def pair_metrics(prefix: str, answer_scores: torch.Tensor, sample_scores: torch.Tensor, loss_name: str = "loss") -> dict:
    """``{prefix}/{loss_name}`` (the Bradley-Terry loss of the scores), ``{prefix}/d_acc`` (the share of
    pairs where the teacher's answer scores higher) and the mean scores."""
    out = {f"{prefix}/{loss_name}": float(bradley_terry_loss(answer_scores, sample_scores))}
    out.update({f"{prefix}/{k}": v for k, v in discriminator_metrics(answer_scores, sample_scores).items()})
    return out


def token_reward_diagnostics(token_rewards: torch.Tensor, view, mask: torch.Tensor) -> dict:
    """``diag/token_reward_pearson``: the Pearson correlation over every sampled token of a per-token
    black-box reward with the teacher's own per-token log-ratio ``log p_T(y_t) - log pi(y_t)``
    (``view``: :func:`gadchat.stages.common.teacher_view`, ``None`` without a teacher: no metric)."""
    if view is None:
        return {}
    teacher_lp, actor_lp = view
    return {"diag/token_reward_pearson": token_pearson(token_rewards, teacher_lp - actor_lp, mask)}


def replay_record(answers: SequenceBatch, samples: SequenceBatch, answer_baseline: torch.Tensor,
                  sample_baseline: torch.Tensor) -> dict:
    """One step's pairs as plain CPU tensors (a checkpoint holds them: ``StageContext.carried``)."""
    def fields(batch):
        return [t.detach().cpu() for t in (batch.input_ids, batch.attention_mask, batch.response_mask, batch.last_index)]
    return {"answers": fields(answers), "samples": fields(samples),
            "answer_baseline": answer_baseline.detach().cpu(), "sample_baseline": sample_baseline.detach().cpu()}


def replayed_pairs(record: dict) -> tuple:
    """``(answers, samples, answer_baseline, sample_baseline)`` of a :func:`replay_record`."""
    return (SequenceBatch(*record["answers"]), SequenceBatch(*record["samples"]),
            record["answer_baseline"], record["sample_baseline"])


def remember(history: list, record: dict, keep: int) -> list:
    """``history`` with ``record`` appended, the newest ``keep`` only (pure)."""
    return (list(history) + [record])[-keep:] if keep > 0 else []
