"""The warm-up stage end to end under the real ``deepspeed`` launcher (ZeRO-3, CPU, gloo)."""

from __future__ import annotations

import pytest
import torch

from conftest import BACKENDS, HAS_VLLM, launch, load_weights, read_metrics, tiny_args
from gadchat.generation import backend_class

DISCRIMINATOR_WARMUP = 3
STEPS = 6


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ranks", [1, 2])
def test_warmup_gate_learning_and_rollout_sync(tiny_model, tmp_path, ranks, backend):
    out = tmp_path / "warmup"
    launch("warmup", ranks, tiny_args(
        tiny_model, out, "--rollout.backend", backend, "--trainer.max_steps", STEPS,
        "--trainer.discriminator_warmup", DISCRIMINATOR_WARMUP, "--trainer.log_param_digest", "true",
        "--trainer.verify_rollout_sync", "true", "--deepspeed.zero_stage", 3))
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(STEPS + 1))
    initial, steps = rows[0], rows[1:]

    # The gate: row k holds the weights after k steps; steps 0..discriminator_warmup-1 leave the actor alone.
    for row in steps[:DISCRIMINATOR_WARMUP]:
        assert row["digest/actor"] == initial["digest/actor"], row["step"]
        assert row["actor/updated"] == 0.0
    previous = steps[DISCRIMINATOR_WARMUP - 1]["digest/actor"]
    for row in steps[DISCRIMINATOR_WARMUP:]:
        assert row["digest/actor"] != previous, row["step"]
        assert row["actor/updated"] == 1.0 and "actor/sft_loss" in row
        previous = row["digest/actor"]
    # The discriminator moves at every step.
    previous = initial["digest/discriminator"]
    for row in steps:
        assert row["digest/discriminator"] != previous, row["step"]
        previous = row["digest/discriminator"]

    # It learns: teacher vs student pairs told apart well above chance over the last steps.
    last = steps[-3:]
    assert sum(r["discriminator/d_acc"] for r in last) / len(last) > 0.75
    assert all(r["discriminator/teacher_score"] > r["discriminator/student_score"] for r in last)

    # After every weight push the rollout engine's greedy output equals the actor's own.
    assert all(r["debug/rollout_greedy_match"] == 1.0 for r in steps)

    # Every phase is timed, and throughput is reported.
    for key in ("time/generate", "time/discriminator_update", "time/step", "throughput/tokens_per_s"):
        assert all(key in r for r in steps), key
    assert all("time/actor_update" in r for r in steps[DISCRIMINATOR_WARMUP:])
    if backend_class(backend).follows_actor:  # weights pushed into the rollout engine after updates
        assert all("time/weight_sync" in r for r in steps[DISCRIMINATOR_WARMUP + 1:])
    assert (out / "final" / "actor" / "model.safetensors").exists()
    assert (out / "final" / "discriminator" / "model.safetensors").exists()


@pytest.mark.slow
def test_actor_untouched_until_discriminator_warmup_exactly(tiny_model, tmp_path):
    """Stopping at step == discriminator_warmup, the exported actor is the initial student, tensor for tensor,
    while the discriminator's backbone has moved away from it."""
    out = tmp_path / "gate"
    launch("warmup", 1, tiny_args(tiny_model, out, "--rollout.backend", "hf", "--trainer.max_steps", 2,
                                  "--trainer.discriminator_warmup", 2))
    initial, final = load_weights(tiny_model), load_weights(out / "final" / "actor")
    assert set(initial) == set(final)
    for name in initial:
        assert torch.equal(initial[name], final[name]), name
    discriminator = load_weights(out / "final" / "discriminator")
    moved = [n for n in initial if n.startswith("model.") and not torch.equal(initial[n], discriminator[n])]
    assert moved, "the discriminator backbone did not train"


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_warmup_runs_under_every_zero_stage(tiny_model, tmp_path, zero_stage):
    out = tmp_path / f"zero{zero_stage}"
    launch("warmup", 2, tiny_args(tiny_model, out, "--rollout.backend", "vllm" if HAS_VLLM else "hf",
                                  "--deepspeed.zero_stage", zero_stage, "--trainer.max_steps", 2,
                                  "--trainer.discriminator_warmup", 1, "--trainer.verify_rollout_sync", "true"))
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert "actor/sft_loss" in rows[1] and "actor/kl" in rows[1]
    assert all(r["debug/rollout_greedy_match"] == 1.0 for r in rows)
    assert (out / "final" / "actor" / "model.safetensors").exists()
