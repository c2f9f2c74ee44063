"""Losses and advantages of GAD as pure functions over tensors and masks.

Shapes: ``[B, T]`` per-token tensors with a 0/1 ``mask`` over response tokens (up to and including
the first EOS); ``[B]`` per-sequence scores. Formulas follow docs/algorithm.md section 4 and the
GAD paper (arXiv 2511.10643, Eq. 2-4); the PPO-clip and k3 forms are those of verl's
``core_algos.py`` (Schulman's k3 estimator, http://joschu.net/blog/kl-approx.html).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum()


def masked_mean(values: torch.Tensor, mask: torch.Tensor, denominator: float | torch.Tensor | None = None) -> torch.Tensor:
    """``sum(values * mask) / sum(mask)`` (token-mean); ``denominator`` overrides ``sum(mask)`` so a
    micro-batch can contribute its share of a token-mean over the whole batch."""
    if denominator is None:
        denominator = mask.sum().clamp(min=1)
    return masked_sum(values, mask) / denominator


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = logits.float()
    return logits / temperature if temperature != 1.0 else logits


def token_log_probs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log softmax(z)[labels]`` per position with ``z = logits / temperature``, computed as
    ``z[label] - logsumexp(z)`` in float32 without materialising the full log-softmax.

    ``temperature`` is the sampling temperature of the rollout (verl's ``logits.div_(temperature)``):
    the log-probs are then those of the distribution the samples were drawn from. 1 = unscaled."""
    logits = _scaled(logits, temperature)
    picked = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``H = logsumexp(z) - sum softmax(z) * z`` per position, ``z = logits / temperature``."""
    logits = _scaled(logits, temperature)
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def _chunk_log_probs(head, hidden, labels, temperature: float, with_entropy: bool):
    # The plain formulas on the chunk's logits. (Dividing the chunk's own logits by the temperature
    # in place measured ~one chunk of logits MORE peak memory on CPU, not less; kept out of place.)
    logits = head(hidden)
    log_probs = token_log_probs(logits, labels, temperature)
    if not with_entropy:
        return (log_probs,)
    return log_probs, token_entropy(logits, temperature)


def chunked_token_log_probs(head, hidden: torch.Tensor, labels: torch.Tensor, chunk_tokens: int,
                            temperature: float = 1.0, with_entropy: bool = False):
    """:func:`token_log_probs` (and :func:`token_entropy`) of ``z = head(hidden) / temperature``
    without the full ``[N, V]`` logits: ``hidden`` ``[N, H]`` (final hidden states of the N
    positions wanted), ``labels`` ``[N]``, ``head`` maps ``[n, H]`` to logits ``[n, V]`` (the LM
    head). Rows are processed ``chunk_tokens`` at a time; per chunk ``log p = z[label] -
    logsumexp(z)``, ``H = logsumexp(z) - sum softmax(z) z`` in float32, the same formulas as the
    plain functions, so values agree up to the matmul's rounding and gradients are the same.

    With gradients enabled each chunk runs under ``torch.utils.checkpoint`` (non-reentrant): the
    backward keeps only the chunk's hidden states and recomputes its logits, so at most one chunk's
    vocabulary-sized tensors are alive at a time. Returns ``(log_probs [N], entropy [N] or None)``.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    from torch.utils.checkpoint import checkpoint

    grad = torch.is_grad_enabled()
    log_probs, entropies = [], []
    count = hidden.shape[0]
    for start in range(0, max(count, 1), chunk_tokens):  # an empty input still runs one (empty) chunk
        h, y = hidden[start : start + chunk_tokens], labels[start : start + chunk_tokens]
        if grad:
            out = checkpoint(_chunk_log_probs, head, h, y, temperature, with_entropy, use_reentrant=False)
        else:
            out = _chunk_log_probs(head, h, y, temperature, with_entropy)
        log_probs.append(out[0])
        if with_entropy:
            entropies.append(out[1])
    log_probs = log_probs[0] if len(log_probs) == 1 else torch.cat(log_probs)
    if not with_entropy:
        return log_probs, None
    return log_probs, entropies[0] if len(entropies) == 1 else torch.cat(entropies)


def sft_loss(log_probs: torch.Tensor, mask: torch.Tensor, denominator=None) -> torch.Tensor:
    """Token-mean cross-entropy on the teacher response: ``L_sft = sum(-log p(y_t|x) * m) / sum(m)``.

    ``mask`` covers the teacher tokens including the final EOS."""
    return masked_mean(-log_probs, mask, denominator)


def bradley_terry_loss(teacher_scores: torch.Tensor, student_scores: torch.Tensor) -> torch.Tensor:
    """Discriminator loss with the teacher scored once per prompt.

    ``L_D = mean_{p,i} -logsigmoid(r(x_p, y_t,p) - r(x_p, y_s,p,i))``

    ``teacher_scores``: ``[P]``, one per prompt. ``student_scores``: ``[P, n]``, the ``n`` samples
    of each prompt. Broadcasting pairs each teacher score with its prompt's samples, so the teacher
    sequence is run through the discriminator once instead of ``n`` times; the value and the
    gradients equal those of pairing every sample with its own copy of the teacher sequence.
    """
    return -F.logsigmoid(teacher_scores.unsqueeze(-1) - student_scores).mean()


def bradley_terry_student_terms(teacher_scores: torch.Tensor, student_scores: torch.Tensor, pairs: int) -> torch.Tensor:
    """Some samples' share of :func:`bradley_terry_loss`, their teachers' scores held fixed.

    ``sum_i -logsigmoid(t_p(i) - s_i) / pairs``, ``pairs`` = P x n of the whole loss

    ``teacher_scores``: ``t_p(i)``, the score of each sample's own prompt's teacher sequence,
    aligned with ``student_scores``. Its gradient in each ``s_i`` is that of the whole loss
    (each ``s_i`` appears in one term only), so samples can be back-propagated in any grouping
    once the teacher scores are known."""
    return -F.logsigmoid(teacher_scores - student_scores).sum() / pairs


def bradley_terry_teacher_gradient(teacher_scores: torch.Tensor, student_scores: torch.Tensor) -> torch.Tensor:
    """``dL_D / dt_p`` of :func:`bradley_terry_loss`, ``[P]``:

    ``-(1 / (P n)) sum_i sigmoid(s_{p,i} - t_p)``

    so that back-propagating ``sum_p t_p * dL_D/dt_p`` through a recomputed teacher score gives the
    teacher side of the loss's gradient exactly (``teacher_scores`` ``[P]``, ``student_scores``
    ``[P, n]``, both detached)."""
    prompts, n = student_scores.shape
    return -torch.sigmoid(student_scores - teacher_scores.unsqueeze(-1)).sum(-1) / (prompts * n)


def discriminator_metrics(teacher_scores: torch.Tensor, student_scores: torch.Tensor) -> dict:
    """``d_acc = mean[r_t > r_s]`` over all pairs, and the mean scores."""
    with torch.no_grad():
        return {
            "d_acc": (teacher_scores.unsqueeze(-1) > student_scores).float().mean().item(),
            "teacher_score": teacher_scores.float().mean().item(),
            "student_score": student_scores.float().mean().item(),
        }


def grpo_advantages(scores: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantage per sample: ``A_i = (r_i - mean_group(r)) / (std_group(r) + eps)``.

    ``scores``: ``[P, n]``, one row per prompt group. ``std`` is the unbiased sample standard
    deviation (as ``torch.std`` and verl); a group whose rewards are all equal gets 0, and a group
    of one sample gets 0 rather than NaN.
    """
    scores = scores.float()
    mean = scores.mean(dim=-1, keepdim=True)
    if scores.shape[-1] > 1:
        std = scores.std(dim=-1, keepdim=True)
    else:
        std = torch.zeros_like(mean)
    # A float mean of equal values can differ from them by rounding (e.g. eight 0.1s); dividing that
    # residue by std + eps (std ~ 0) would give a spurious advantage, so equal groups are set to 0.
    centered = (scores - mean).masked_fill((scores == scores[..., :1]).all(dim=-1, keepdim=True), 0.0)
    return centered / (std + eps)


def ppo_clip_loss(log_probs, old_log_probs, advantages, mask, clip_eps: float = 0.2, denominator=None):
    """PPO-clip policy loss, token-mean.

    ``rho = exp(logp - logp_old)``; ``L = mean_t max(-A * rho, -A * clip(rho, 1-eps, 1+eps))``.
    With one optimizer step per batch ``rho == 1`` and this is REINFORCE with GRPO advantages.
    ``advantages`` is ``[B, T]`` (broadcast over the response tokens) or ``[B]``.
    Returns ``(loss, clip_fraction)``.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1).expand_as(log_probs)
    ratio = torch.exp(log_probs - old_log_probs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask, denominator)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    return loss, clip_fraction


def k3_kl(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """Per-token low-variance KL estimate (k3): ``kl = ref_logp - logp; k3 = exp(kl) - kl - 1``,
    clamped to ``[-10, 10]``. Non-negative, zero where the policy equals the reference."""
    kl = ref_log_probs - log_probs
    return torch.clamp(torch.exp(kl) - kl - 1.0, min=-10.0, max=10.0)


def kl_loss(log_probs, ref_log_probs, mask, denominator=None) -> torch.Tensor:
    """Token-mean of :func:`k3_kl` over the response mask."""
    return masked_mean(k3_kl(log_probs, ref_log_probs), mask, denominator)


# ----------------------------------------------------------------------------------------------
# black-box per-token rewards: a language-model discriminator (gad_lr) and SPIN's DPO loss (spin)


def sequence_log_ratio(log_probs: torch.Tensor, baseline_log_probs: torch.Tensor, mask: torch.Tensor,
                       length_normalised: bool = False) -> torch.Tensor:
    """The likelihood-ratio discriminator's score of each sequence, ``[B]``:

    ``D(x, y) = sum_t m_t (log q(y_t | x, y_<t) - log b(y_t | x, y_<t))``

    or, ``length_normalised``, that sum divided by the sequence's ``sum_t m_t`` (the token-mean).
    ``log_probs``: ``log q`` ``[B, T]`` of the discriminator (a causal LM); ``baseline_log_probs``:
    ``log b`` of the frozen baseline (the rollout policy or the reference), same shape. Trained by
    Bradley-Terry between teacher answers and student samples, the optimum of the sum with ``b`` the
    sampling policy is ``q = p_T``: ``D`` is then the teacher's log-ratio ``log p_T(y|x) - log pi(y|x)``.
    The token-mean gives up that optimum for a score in which an answer's length is no feature."""
    total = ((log_probs - baseline_log_probs) * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if length_normalised else total


def token_log_ratio_rewards(discriminator_log_probs: torch.Tensor, old_log_probs: torch.Tensor,
                            mask: torch.Tensor) -> torch.Tensor:
    """Per-token rewards of the likelihood-ratio discriminator, ``[B, T]``:

    ``r_t = m_t * (log q(y_t | x, y_<t) - log pi_old(y_t | x, y_<t))``

    the form of on-policy distillation's advantages (``opd``) with the discriminator ``q`` in the
    teacher's place: used as advantages by PPO-clip, each token is credited with its own log-ratio."""
    return (discriminator_log_probs - old_log_probs) * mask


def dpo_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, beta: float) -> torch.Tensor:
    """SPIN's loss (Chen et al., ICML 2024): DPO with the teacher's answer chosen and each of the
    model's own samples rejected, the chosen answer's term shared by its prompt's ``n`` samples:

    ``L = mean_{p,i} -logsigmoid(beta * (h_p - h_{p,i}))``,  ``h(y) = log pi(y|x) - log ref(y|x)``

    ``chosen_scores``: ``h`` of each prompt's teacher answer ``[P]``; ``rejected_scores``: ``h`` of
    its samples ``[P, n]`` (sequence sums of per-token log-ratios, :func:`sequence_log_ratio`).
    It is :func:`bradley_terry_loss` on the implicit rewards ``beta * h``, so the same exact
    micro-batching applies. The gradient raises ``log pi`` of the chosen answer and lowers that of
    the samples, each pair weighted by ``sigmoid(beta * (h_{p,i} - h_p))``."""
    return bradley_terry_loss(beta * chosen_scores, beta * rejected_scores)
