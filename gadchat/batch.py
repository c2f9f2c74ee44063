"""Right-padded ``prompt ++ response`` token batches and their micro-batches.

Micro-batches are either a fixed number of consecutive rows, or formed by a token budget: rows
sorted by length and grouped so that each micro-batch's padded size (rows x its longest row) stays
within the budget, which keeps padding small when lengths vary (teacher answers run from a few
tokens to 1.5k). Under a budget every rank runs the same number of micro-batches (the largest any
rank needs: ZeRO-3 gathers parameters in lock-step), and the losses keep their batch-wide
denominators, so the update is the batch token-mean whatever the grouping."""

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

    def select(self, rows: torch.Tensor) -> "SequenceBatch":
        """The rows ``rows`` (a LongTensor of indices), trimmed to their own longest sequence."""
        width = int(self.last_index[rows].max().item()) + 1
        return SequenceBatch(self.input_ids[rows, :width], self.attention_mask[rows, :width],
                             self.response_mask[rows, :width], self.last_index[rows])

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

    def micro_batches(self, rows: int, start: int = 0, end: int | None = None, tokens: int = 0) -> list:
        """``[(row_indices, part), ...]`` covering rows ``start:end``.

        ``tokens == 0``: consecutive parts of at most ``rows`` rows. ``tokens > 0``: the token budget
        of :func:`token_budget_parts` (``rows`` is then unused), the same number of parts on every
        rank. Each part is trimmed to its own longest sequence; ``row_indices`` index the batch."""
        end = len(self) if end is None else end
        if tokens <= 0:
            return [(torch.arange(first, min(first + rows, end)), self.slice(first, min(first + rows, end)))
                    for first in range(start, end, rows)]
        lengths = (self.last_index[start:end] + 1).tolist()
        groups = same_count_on_every_rank(lengths, tokens)
        out = []
        for group in groups:
            index = torch.tensor(group, dtype=torch.long) + start
            out.append((index, self.select(index)))
        return out

    def padding_fraction(self, parts: list) -> float:
        """Share of padding in ``parts`` (from :meth:`micro_batches`): 1 - real tokens / padded tokens."""
        padded = sum(part.input_ids.numel() for _, part in parts)
        real = sum(int(part.attention_mask.sum()) for _, part in parts)
        return 1.0 - real / max(1, padded)


def token_budget_parts(lengths: list, budget: int, parts: int | None = None) -> list:
    """Pure: indices of ``lengths`` grouped into micro-batches by a token budget.

    Rows are taken longest first and a micro-batch is closed when one more row would make its
    padded size (rows x longest row) exceed ``budget`` (a row longer than the budget gets a
    micro-batch of its own). ``parts``: split the costliest groups in two until there are exactly
    that many (another rank needs more). Indices inside a group are ascending."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups, current = [], []
    for i in order:
        if current and (len(current) + 1) * lengths[current[0]] > budget:
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    if parts is not None:
        if parts < len(groups) or parts > len(lengths):
            raise ValueError(f"cannot make {parts} micro-batches of {len(lengths)} rows ({len(groups)} needed)")
        while len(groups) < parts:
            costliest = max((g for g in groups if len(g) > 1), key=lambda g: len(g) * lengths[g[0]])
            at = groups.index(costliest)
            half = len(costliest) // 2
            groups[at : at + 1] = [costliest[:half], costliest[half:]]
    return [sorted(group) for group in groups]


def same_count_on_every_rank(lengths: list, budget: int) -> list:
    """:func:`token_budget_parts` with as many groups as the rank that needs most (every rank
    must call it: one collective)."""
    from gadchat import runtime

    return token_budget_parts(lengths, budget, parts=runtime.max_over_ranks(len(token_budget_parts(lengths, budget))))
