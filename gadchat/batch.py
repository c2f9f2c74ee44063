"""Right-padded ``prompt ++ response`` token batches and their micro-batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SequenceBatch:
    """Right-padded ``prompt ++ response`` sequences.

    ``response_mask[b, t] = 1`` where token ``t`` belongs to the response (up to and including its
    EOS); ``last_index[b]`` is the position of the last valid token, where the discriminator scores.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    last_index: torch.Tensor

    @classmethod
    def build(cls, prompts: list, responses: list, pad_token_id: int) -> "SequenceBatch":
        lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
        width = max(lengths)
        size = len(prompts)
        input_ids = torch.full((size, width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((size, width), dtype=torch.long)
        response_mask = torch.zeros((size, width), dtype=torch.float32)
        for row, (prompt, response) in enumerate(zip(prompts, responses)):
            input_ids[row, : lengths[row]] = torch.tensor(list(prompt) + list(response), dtype=torch.long)
            attention_mask[row, : lengths[row]] = 1
            response_mask[row, len(prompt) : lengths[row]] = 1.0
        last_index = torch.tensor(lengths, dtype=torch.long) - 1
        return cls(input_ids, attention_mask, response_mask, last_index)

    def __len__(self):
        return self.input_ids.shape[0]

    def slice(self, start: int, end: int) -> "SequenceBatch":
        """Rows ``start:end``, trimmed to their own longest sequence."""
        width = int(self.last_index[start:end].max().item()) + 1
        return SequenceBatch(
            self.input_ids[start:end, :width],
            self.attention_mask[start:end, :width],
            self.response_mask[start:end, :width],
            self.last_index[start:end],
        )

    def with_final_token(self, eos_ids, canonical: int) -> "SequenceBatch":
        """A copy whose last valid token is ``canonical`` wherever it is one of ``eos_ids``: the
        discriminator then scores every sequence ending in any EOS of the set (a student sample
        may stop on ``<|endoftext|>``) on the same token as the teacher sequences."""
        rows = torch.arange(len(self))
        last = self.input_ids[rows, self.last_index]
        hit = torch.isin(last, torch.tensor(sorted(eos_ids), dtype=last.dtype, device=last.device)) & (last != canonical)
        if not bool(hit.any()):
            return self
        input_ids = self.input_ids.clone()
        input_ids[rows[hit], self.last_index[hit]] = canonical
        return SequenceBatch(input_ids, self.attention_mask, self.response_mask, self.last_index)

    def to(self, dev) -> "SequenceBatch":
        return SequenceBatch(*(t.to(dev) for t in (self.input_ids, self.attention_mask, self.response_mask, self.last_index)))

    @property
    def target_mask(self) -> torch.Tensor:
        """Response mask aligned with next-token log-probs (positions ``1..T-1``)."""
        return self.response_mask[:, 1:]

    def micro_batches(self, rows: int, start: int = 0, end: int | None = None) -> list:
        """``[(first_row, part), ...]``: rows ``start:end`` in consecutive parts of at most ``rows``
        rows, each trimmed to its own longest sequence."""
        end = len(self) if end is None else end
        return [(first, self.slice(first, min(first + rows, end))) for first in range(start, end, rows)]
