"""bfloat16 on this CPU (issue 11): one warm-up and one GAD step with ``--model.dtype bfloat16``
under ZeRO-3 with 2 ranks and each rollout backend, with the weight-push check after every push.

In bf16 the vLLM CPU kernels and transformers round differently, so on a random tiny model a near
tie can flip a greedy token although the weights are the same; the push is checked by the
teacher-forced gap (``debug/rollout_greedy_logprob_gap``: vLLM's greedy tokens scored by the
actor, 0 for an exact greedy agreement, bf16 rounding otherwise; stale weights give far more)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from conftest import BACKENDS, launch, launch_probe, read_metrics, tiny_args
from gadchat.checkpoint import latest_checkpoint
from gadchat.generation import backend_class

BF16_GAP = 0.05  # a few bf16 ulps of a log-prob of magnitude ~7 (one ulp at 4-8 is 0.03125)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_warmup_and_gad_steps_under_zero3(tiny_model, tmp_path, backend):
    common = ["--model.dtype", "bfloat16", "--rollout.backend", backend, "--deepspeed.zero_stage", 3,
              "--trainer.max_steps", 1, "--trainer.verify_rollout_sync", "true", "--rollout.max_new_tokens", 16,
              "--trainer.log_param_digest", "true"]
    warmup, gad = tmp_path / "warmup", tmp_path / "gad"
    launch("warmup", 2, tiny_args(tiny_model, warmup, "--trainer.discriminator_warmup", 0, *common))
    launch("gad", 2, tiny_args(tiny_model, gad, "--trainer.init_from", warmup, *common))
    for out, loss in ((warmup, "actor/sft_loss"), (gad, "actor/pg_loss")):
        initial, row = read_metrics(out)
        assert row["actor/updated"] == 1.0 and math.isfinite(row[loss]) and math.isfinite(row["discriminator/d_loss"])
        assert row["digest/actor"] != initial["digest/actor"] and row["digest/discriminator"] != initial["digest/discriminator"]
        assert row["digest/reference"] == initial["digest/reference"] if "digest/reference" in row else True
        assert row["debug/rollout_greedy_logprob_gap"] < BF16_GAP, row
        if not backend_class(backend).follows_actor:  # generates with the actor itself: exact
            assert row["debug/rollout_greedy_match"] == 1.0
        assert (out / "final" / "actor" / "model.safetensors").exists()


def _probe_handoff(previous: Path, tmp_path: Path, tiny_model: Path, *extra) -> dict:
    """The gad stage's state right after its hand-off from ``previous`` (2 ranks, bf16, ZeRO-3)."""
    probe = tmp_path / f"probe{len(list(tmp_path.glob('probe*')))}.pt"
    result = launch_probe("handoff_probe.py", 2, tiny_args(tiny_model, tmp_path / "gad", "--model.dtype", "bfloat16",
                                                           "--trainer.init_from", previous, *extra), probe, timeout=300)
    return {**torch.load(probe), "log": result.stdout + result.stderr}


def _exported(previous: Path, role: str) -> dict:
    folder = previous / "final" / role
    loader = AutoModelForCausalLM if role == "actor" else AutoModelForSequenceClassification
    model = loader.from_pretrained(folder, dtype=torch.bfloat16)
    prefix = "seqcls." if role == "discriminator" else ""  # the engine's scorer wraps the exported model
    return {prefix + key: value.float() for key, value in model.state_dict().items()}


@pytest.mark.slow
def test_bf16_handoff_starts_from_the_fp32_master_weights_with_fresh_moments(tiny_model, tmp_path):
    """trainer.init_full_precision (default): the GAD stage's fp32 master weights are exactly the
    warm-up's final ZeRO checkpoint's (not its bf16 export rounded up), for the actor and the
    discriminator, and the Adam moments start empty; with the option off they are the export's."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    warmup = tmp_path / "warmup"
    launch("warmup", 2, tiny_args(tiny_model, warmup, "--model.dtype", "bfloat16", "--trainer.max_steps", 2,
                                  "--trainer.discriminator_warmup", 0, "--actor.lr", "1e-3", "--discriminator.lr", "1e-3",
                                  "--rollout.max_new_tokens", 8, "--rollout.backend", "hf"))
    step_dir = latest_checkpoint(warmup)
    full = _probe_handoff(warmup, tmp_path, tiny_model, "--rollout.backend", "hf")
    rounded = _probe_handoff(warmup, tmp_path, tiny_model, "--rollout.backend", "hf",
                             "--trainer.init_full_precision", "false")
    assert full["step"] == rounded["step"] == 0
    assert "full-precision hand-off" in full["log"]
    for role in ("actor", "discriminator"):
        saved = get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=role)
        export = _exported(warmup, role)
        master, master_rounded = full[role]["master"], rounded[role]["master"]
        assert master.keys() == master_rounded.keys() and set(master) <= set(saved)
        for key, value in master.items():
            assert torch.equal(value, saved[key].float()), (role, key)
            assert torch.equal(master_rounded[key], export[key]), (role, key)
        # The test can tell them apart: most weights are not bf16 numbers after two fp32 updates.
        differing = sum(not torch.equal(master[k], master_rounded[k]) for k in master)
        assert differing > len(master) // 2, (role, differing, len(master))
        assert full[role]["optimizer_state_entries"] == 0


@pytest.mark.slow
def test_bf16_handoff_from_another_rank_count_falls_back_to_the_export_and_says_why(tiny_model, tmp_path):
    warmup = tmp_path / "warmup1"
    launch("warmup", 1, tiny_args(tiny_model, warmup, "--model.dtype", "bfloat16", "--trainer.max_steps", 1,
                                  "--trainer.discriminator_warmup", 0, "--rollout.max_new_tokens", 8,
                                  "--rollout.backend", "hf"))
    seen = _probe_handoff(warmup, tmp_path, tiny_model, "--rollout.backend", "hf")
    assert "written by 1 ranks, this run has 2" in seen["log"] and "starts from the exported bfloat16 weights" in seen["log"]
    export = _exported(warmup, "actor")
    assert all(torch.equal(value, export[key]) for key, value in seen["actor"]["master"].items())
