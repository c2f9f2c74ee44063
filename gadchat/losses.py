"""Losses and advantages of GAD as pure functions over tensors and masks.

Shapes: ``[B, T]`` per-token tensors with a 0/1 ``mask`` over response tokens (up to and including
the first EOS); ``[B]`` per-sequence scores. Formulas follow DESIGN.md section 2 and the GAD paper
(arXiv 2511.10643, Eq. 2-4); the PPO-clip and k3 forms are those of verl's ``core_algos.py``
(Schulman's k3 estimator, http://joschu.net/blog/kl-approx.html).
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


def token_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[labels]`` per position, computed as ``logit[label] - logsumexp(logit)``
    in float32 without materialising the full log-softmax."""
    logits = logits.float()
    picked = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """``H = logsumexp(z) - sum softmax(z) * z`` per position."""
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


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
