"""Diagnostics that read a teacher model we hold, for the warm-up and GAD stages
(``--model.teacher_path PATH``: the stage then declares a frozen ``teacher`` role).

When the teacher is a model on disk (the known-teacher benchmark, or a user checking the method on
an open teacher), each step scores the rollouts under it and logs, beside the usual metrics, what
the discriminator's reward actually follows (:func:`gadchat.teacher_metrics.reward_diagnostics`):
its within-group rank correlation with the teacher's log-likelihood, with the Bayes-optimal
target ``log p_T - log p_S``, with length and with ending in an EOS, plus the teacher NLL and the
reverse KL of the rollouts. These separate a loss that comes from the discriminator's signal from
one that comes from the policy update. The teacher is read only here: nothing it computes reaches a
loss (except under ``--trainer.oracle_reward``, a white-box upper bound).
"""

from __future__ import annotations

import torch

from gadchat.teacher_metrics import reward_diagnostics


def reward_step_metrics(rewards: torch.Tensor, mask: torch.Tensor, teacher_log_probs: torch.Tensor,
                        actor_log_probs: torch.Tensor, samples: list, eos_ids) -> dict:
    """``diag/...`` metrics of one step's rollouts (``samples``: groups of token-id lists,
    ``rewards``: ``[groups, n]``; ``mask`` and both log-prob tensors ``[B, T-1]``, the actor's
    those of the sampling policy)."""
    eos = set(eos_ids)
    flat = [s for group in samples for s in group]
    return reward_diagnostics(rewards.float().cpu(), teacher_log_probs, actor_log_probs, mask,
                              [len(s) for s in flat], [bool(s) and s[-1] in eos for s in flat])
