"""Inside the real engine (deepspeed launcher, ZeRO-3, CPU): activation checkpointing asked for
really runs during the actor and discriminator updates (the models are put in training mode for
them and back in eval mode after), and the chunked log-prob path equals the plain one in value and
gradient with the LM head a partitioned ZeRO-3 parameter tied to the embedding (issue 11)."""

from __future__ import annotations

import json

import pytest

from conftest import HAS_VLLM, launch_probe, tiny_args


def run_probe(ranks: int, args: list, tmp_path) -> dict:
    out = tmp_path / "probe.json"
    launch_probe("update_probe.py", ranks, args, out)
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("stage, ranks, backend", [("warmup", 2, "hf"), ("gad", 1, "vllm" if HAS_VLLM else "hf")])
def test_checkpointing_runs_in_updates_and_chunked_log_probs_match_under_zero3(tiny_model, tmp_path, stage, ranks,
                                                                                backend):
    probe = run_probe(ranks, tiny_args(tiny_model, tmp_path / "run", "--trainer.stage", stage,
                                       "--trainer.discriminator_warmup", 0, "--rollout.backend", backend,
                                       "--model.gradient_checkpointing", "true", "--rollout.max_new_tokens", 16,
                                       "--deepspeed.zero_stage", 3), tmp_path)
    # two layers per forward; the actor's update and the discriminator's both checkpoint
    assert probe["checkpointed_calls"]["actor"] >= 2, probe["checkpointed_calls"]
    assert probe["checkpointed_calls"]["discriminator"] >= 2, probe["checkpointed_calls"]
    assert probe["actor_training_after_step"] is False and probe["discriminator_training_after_step"] is False
    assert probe["metrics"]["actor/updated"] == 1.0
    # chunked == plain inside the engine, LM head tied and partitioned
    assert probe["logprob_max_abs_diff"] < 1e-5
    assert probe["grad_norm"] > 0
    for name, diff in probe["grad_rel_diff"].items():
        assert diff is not None and diff < 1e-4, (name, diff)


class _FakeDeepSpeedEngine:
    """The calls ``ModelUpdate`` makes on a DeepSpeed engine, counted."""

    def __init__(self):
        self.steps, self.training = 0, False

    def train(self):
        self.training = True

    def eval(self):
        self.training = False

    def set_gradient_accumulation_boundary(self, flag):
        pass

    def backward(self, loss, scale_wrt_gas=False):
        pass

    def step(self):
        self.steps += 1


def test_an_actor_update_marks_the_rollout_weights_stale_only_when_it_completes():
    import torch

    from gadchat.engine import HybridEngine
    from gadchat.roles import actor, discriminator

    hybrid = HybridEngine.__new__(HybridEngine)  # the update bookkeeping only: no models built
    hybrid.roles = {"actor": actor(), "discriminator": discriminator()}
    hybrid.models = {"actor": _FakeDeepSpeedEngine(), "discriminator": _FakeDeepSpeedEngine()}
    hybrid.rollout_class = type("FollowsActor", (), {"follows_actor": True})
    hybrid._rollout_needs_sync = False
    hybrid.actor_ema = None

    with hybrid.update("discriminator", 1) as update:
        update.backward(torch.tensor(1.0))
    assert not hybrid._rollout_needs_sync  # the discriminator does not touch the rollout weights

    with pytest.raises(ValueError):
        with hybrid.update("actor", 1) as update:
            raise ValueError("the step failed before its backward")
    assert not hybrid._rollout_needs_sync and hybrid.models["actor"].steps == 0

    with hybrid.update("actor", 2) as update:
        update.backward(torch.tensor(1.0))
        update.backward(torch.tensor(2.0))
    assert hybrid._rollout_needs_sync and hybrid.models["actor"].steps == 1
    assert not hybrid.models["actor"].training  # back in eval mode
