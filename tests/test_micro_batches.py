"""Token-budget micro-batches (gadchat/batch.py): the grouping by hand, its padding on the real
teacher length distribution, and a real GAD step whose losses and gradient norms equal those of
one micro-batch holding the whole batch."""

from __future__ import annotations

import json

import pytest
import torch

from gadchat.batch import SequenceBatch, token_budget_parts


def test_groups_cover_every_row_once_and_stay_within_the_budget():
    lengths = [5, 100, 7, 50, 51, 3, 130]
    groups = token_budget_parts(lengths, 120)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        assert len(group) * max(lengths[i] for i in group) <= 120 or len(group) == 1  # 130 alone
    assert groups == [[6], [1], [3, 4], [0, 2, 5]]


def test_more_parts_split_the_costliest_group_and_impossible_counts_are_refused():
    lengths = [5, 100, 7, 50, 51, 3]
    assert token_budget_parts(lengths, 120, parts=4) == [[1], [4], [3], [0, 2, 5]]
    with pytest.raises(ValueError, match="cannot make 2 micro-batches"):
        token_budget_parts(lengths, 120, parts=2)
    with pytest.raises(ValueError, match="cannot make 7 micro-batches"):
        token_budget_parts(lengths, 120, parts=7)


def test_rows_keep_their_values_and_padding_falls_on_the_real_teacher_lengths():
    """64 teacher answers of the shipped GPT-4o data (the lengths the engine meets): fixed
    micro-batches of 8 rows pad heavily, a 4096-token budget keeps padding under 10%."""
    from pathlib import Path

    rows = [json.loads(line) for line in (Path(__file__).parent.parent / "data" / "alpaca_eval_gpt4o" /
                                          "train.jsonl").read_text().splitlines()[:64]]
    lengths = [max(1, len(r["teacher_response"]) // 4) for r in rows]  # ~4 characters per token
    batch = SequenceBatch.build([[1, 2]] * len(lengths), [list(range(3, 3 + n)) for n in lengths], 0)
    fixed = batch.micro_batches(8)
    budget = batch.micro_batches(8, tokens=4096)
    assert batch.padding_fraction(budget) < 0.10 < batch.padding_fraction(fixed)
    for index, part in budget:
        for row, original in zip(part.input_ids, index):
            width = int(batch.last_index[original]) + 1
            assert torch.equal(row[:width], batch.input_ids[original, :width])


@pytest.mark.slow
def test_a_gad_step_under_token_budgets_equals_one_whole_batch_micro_batch(tiny_model, tmp_path):
    """2 ranks, ZeRO-3, the same rollouts: with budgets that make several micro-batches of uneven
    rows, the actor's and the discriminator's losses and gradient norms equal those of a single
    micro-batch per rank (the batch token-mean is kept; only the summation order and the padded widths differ)."""
    from tests.conftest import launch, read_metrics, tiny_args

    def run(name, *flags):
        out = tmp_path / name
        launch("gad", 2, tiny_args(tiny_model, out, "--rollout.backend", "hf", "--trainer.max_steps", 1,
                                   "--actor.mini_batches", 2, *flags))
        return [r for r in read_metrics(out) if r.get("step") == 1][0]

    whole = run("whole", "--actor.micro_batch_size", 64, "--discriminator.micro_batch_prompts", 8)
    budget = run("budget", "--actor.micro_batch_tokens", 300, "--discriminator.micro_batch_tokens", 700)
    assert whole["response_length/mean"] == budget["response_length/mean"]  # the same rollouts
    for key in ("reward/mean", "discriminator/d_loss", "discriminator/grad_norm", "actor/pg_loss", "actor/kl", "actor/grad_norm"):
        assert budget[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-7), key
