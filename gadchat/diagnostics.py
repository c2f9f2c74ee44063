"""Diagnostics that read a teacher model we hold, for the warm-up and GAD stages
(``--trainer.diagnostics_teacher PATH``).

When the teacher is a model on disk (the known-teacher benchmark, or a user checking the method on
an open teacher), each step scores the rollouts under it and logs, beside the usual metrics, what
the discriminator's reward actually follows (:func:`gadchat.teacher_metrics.reward_diagnostics`):
its within-group rank correlation with the teacher's log-likelihood, with the Bayes-optimal
target ``log p_T - log p_S``, with length and with ending in an EOS, plus the teacher NLL and the
reverse KL of the rollouts. These separate a loss that comes from the discriminator's signal from
one that comes from the policy update. The teacher is read only here: nothing it computes reaches a
loss. It is a plain full copy per rank (no ZeRO sharding), meant for teachers small enough for that.
"""

from __future__ import annotations

import torch

from gadchat.losses import token_log_probs
from gadchat.teacher_metrics import reward_diagnostics


class TeacherProbe:
    """A frozen teacher on this rank's device that scores rollouts for the diagnostics."""

    def __init__(self, path: str, device: torch.device, micro_batch_size: int = 16):
        from gadchat.known_teacher import load_scorer

        self.model = load_scorer(path).to(device)
        self.device = device
        self.micro_batch_size = max(1, micro_batch_size)

    @torch.no_grad()
    def log_probs(self, batch) -> torch.Tensor:
        """Next-token log-probs ``[B, T-1]`` of a ``SequenceBatch`` under the teacher (fp32, CPU)."""
        out = torch.zeros(batch.input_ids.shape[0], batch.input_ids.shape[1] - 1)
        for start in range(0, len(batch), self.micro_batch_size):
            part = batch.slice(start, start + self.micro_batch_size).to(self.device)
            logits = self.model(input_ids=part.input_ids, attention_mask=part.attention_mask).logits[:, :-1]
            values = token_log_probs(logits, part.input_ids[:, 1:])
            out[start : start + len(part), : values.shape[1]] = values.float().cpu()
        return out

    @staticmethod
    def step_metrics(rewards: torch.Tensor, mask: torch.Tensor, teacher_log_probs: torch.Tensor,
                     actor_log_probs: torch.Tensor, samples: list, eos_ids) -> dict:
        """``diag/...`` metrics of one step's rollouts (``samples``: groups of token-id lists,
        ``rewards``: ``[groups, n]``; ``mask`` and both log-prob tensors ``[B, T-1]``, the actor's
        those of the sampling policy)."""
        eos = set(eos_ids)
        flat = [s for group in samples for s in group]
        return reward_diagnostics(rewards.float().cpu(), teacher_log_probs, actor_log_probs, mask,
                                  [len(s) for s in flat], [bool(s) and s[-1] in eos for s in flat])
