"""The GAD adversarial stage, the SeqKD baseline, and the hand-off between stages by path."""

from __future__ import annotations

import pytest
import torch

from conftest import BACKENDS, launch, load_weights, read_metrics, tiny_args


@pytest.fixture(scope="module")
def warmup_output(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("stages") / "warmup"
    launch("warmup", 1, tiny_args(tiny_model, out, "--rollout.backend", "hf", "--trainer.max_steps", 4,
                                  "--trainer.discriminator_warmup", 2))
    return out


def assert_same_weights(folder_a, folder_b):
    a, b = load_weights(folder_a), load_weights(folder_b)
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_gad_steps_move_actor_and_discriminator_never_the_reference(tiny_model, warmup_output, tmp_path, backend):
    out = tmp_path / "gad"
    launch("gad", 2, tiny_args(tiny_model, out, "--trainer.init_from", warmup_output, "--rollout.backend", backend,
                               "--trainer.max_steps", 3, "--trainer.log_param_digest", "true",
                               "--trainer.verify_rollout_sync", "true"))
    rows = read_metrics(out)
    initial, steps = rows[0], rows[1:]
    assert len(steps) == 3
    assert initial["digest/reference"] == initial["digest/actor"]  # the reference is the actor as loaded
    previous = initial
    for row in steps:
        assert row["digest/actor"] != previous["digest/actor"]
        assert row["digest/discriminator"] != previous["digest/discriminator"]
        assert row["digest/reference"] == initial["digest/reference"]
        previous = row
    assert steps[0]["actor/kl"] == pytest.approx(0.0, abs=1e-7)  # policy == reference at the first step
    assert steps[-1]["actor/kl"] > 0
    for key in ("reward/mean", "reward/std", "advantage/mean", "advantage/std", "actor/pg_loss", "actor/clip_fraction",
                "discriminator/d_acc", "discriminator/d_loss", "response_length/mean", "time/generate", "time/discriminator_update",
                "time/reference_log_probs", "time/actor_update"):
        assert all(key in row for row in steps), key
    # GRPO advantages are normalised per prompt group: mean 0 over the batch.
    assert all(abs(row["advantage/mean"]) < 1e-5 for row in steps)
    assert all(row["debug/rollout_greedy_match"] == 1.0 for row in steps)


@pytest.mark.slow
def test_gad_stage_starts_from_the_warmup_weights_exactly(tiny_model, warmup_output, tmp_path):
    """With zero learning rates one GAD step leaves the weights as loaded: the exported actor and
    discriminator equal the warm-up's final ones tensor for tensor."""
    out = tmp_path / "gad_lr0"
    launch("gad", 1, tiny_args(tiny_model, out, "--trainer.init_from", warmup_output, "--rollout.backend", "hf",
                               "--trainer.max_steps", 1, "--actor.lr", 0.0, "--discriminator.lr", 0.0))
    assert_same_weights(warmup_output / "final" / "actor", out / "final" / "actor")
    assert_same_weights(warmup_output / "final" / "discriminator", out / "final" / "discriminator")


@pytest.mark.slow
def test_frozen_discriminator_reward_is_optimised(tiny_model, warmup_output, tmp_path):
    """The paper's off-policy ablation: with D fixed, policy gradient raises D's score of fresh
    samples (on a fixed set of prompts, so steps are comparable)."""
    out = tmp_path / "gad_frozen"
    launch("gad", 1, tiny_args(tiny_model, out, "--trainer.init_from", warmup_output, "--rollout.backend", "hf",
                               "--discriminator.freeze", "true", "--data.max_rows", 8, "--trainer.epochs", 30,
                               "--trainer.max_steps", 30, "--actor.lr", 1e-3, "--rollout.max_new_tokens", 32,
                               "--trainer.log_param_digest", "true"))
    rows = read_metrics(out)
    steps = rows[1:]
    assert len(steps) == 30
    assert all(row["digest/discriminator"] == rows[0]["digest/discriminator"] for row in steps)  # frozen
    first = sum(r["reward/mean"] for r in steps[:5]) / 5
    last = sum(r["reward/mean"] for r in steps[-5:]) / 5
    assert last > first + 1.0, (first, last)


@pytest.mark.slow
def test_seqkd_learns_and_hands_off_to_warmup(tiny_model, tmp_path):
    seqkd = tmp_path / "seqkd"
    launch("seqkd", 2, tiny_args(tiny_model, seqkd, "--trainer.max_steps", 8, "--actor.lr", 1e-3,
                                 "--data.max_rows", 8, "--trainer.epochs", 8,
                                 "--trainer.eval_every", 4, "--trainer.eval_prompts", 4, "--rollout.max_new_tokens", 16))
    rows = read_metrics(seqkd)
    assert len(rows) == 8
    assert rows[-1]["actor/sft_loss"] < rows[0]["actor/sft_loss"] - 0.5
    assert [r["step"] for r in rows if "eval/rouge_l" in r] == [4, 8]
    assert all(0.0 <= r["eval/rouge_l"] <= 1.0 for r in rows if "eval/rouge_l" in r)
    assert not (seqkd / "final" / "discriminator").exists()  # SeqKD trains no discriminator

    warmup = tmp_path / "warmup_from_seqkd"
    launch("warmup", 1, tiny_args(tiny_model, warmup, "--trainer.init_from", seqkd, "--rollout.backend", "hf",
                                  "--trainer.max_steps", 1, "--trainer.discriminator_warmup", 5))
    assert_same_weights(seqkd / "final" / "actor", warmup / "final" / "actor")
    # The discriminator backbone starts from the SeqKD student, not from the original one.
    discriminator, student = load_weights(warmup / "final" / "discriminator"), load_weights(seqkd / "final" / "actor")
    assert discriminator["model.norm.weight"].shape == student["model.norm.weight"].shape


@pytest.mark.slow
def test_gad_can_inherit_the_warmup_optimizer_states_but_not_its_learning_rate(tiny_model, warmup_output, tmp_path):
    """``--trainer.init_optimizer_states`` loads the warm-up's Adam moments; the GAD stage's own
    learning rate still applies (zero here: the weights must not move)."""
    out = tmp_path / "gad_optim"
    launch("gad", 1, tiny_args(tiny_model, out, "--trainer.init_from", warmup_output, "--rollout.backend", "hf",
                               "--trainer.init_optimizer_states", "true", "--trainer.max_steps", 1,
                               "--actor.lr", 0.0, "--discriminator.lr", 0.0))
    assert_same_weights(warmup_output / "final" / "actor", out / "final" / "actor")
    assert_same_weights(warmup_output / "final" / "discriminator", out / "final" / "discriminator")
