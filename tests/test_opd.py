"""The white-box on-policy distillation stage (gadchat/stages/opd.py): its advantages by hand, the
exact reverse-KL gradient on one token, its roles and rules, and a real run through the launcher."""

from __future__ import annotations

import json

import pytest
import torch

from gadchat.stages.configure import load_config
from gadchat.losses import ppo_clip_loss
from gadchat.stages import RECIPES, step_main
from gadchat.stages.opd import reverse_kl_advantages


def test_reverse_kl_advantages_by_hand():
    teacher = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.0, 0.0]])
    old = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -2.0, -4.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    expected = torch.tensor([[0.5, -1.0, 0.0], [0.0, 1.0, 4.0]])
    assert torch.equal(reverse_kl_advantages(teacher, old, mask), expected)


def test_on_one_token_the_update_is_the_exact_reverse_kl_gradient():
    """Over every token y weighted by p_S(y) (the expectation over the student's samples), the
    gradient of ppo_clip_loss with A = log p_T(y) - log p_S(y) equals grad KL(p_S || p_T)."""
    torch.manual_seed(0)
    logits = torch.randn(6, requires_grad=True)
    teacher = torch.log_softmax(torch.randn(6), dim=-1)
    log_p = torch.log_softmax(logits, dim=-1)
    expected, = torch.autograd.grad((log_p.exp() * (log_p - teacher)).sum(), logits)

    log_p = torch.log_softmax(logits, dim=-1)
    total = 0.0
    for y in range(6):
        lp = log_p[y].view(1, 1)
        adv = reverse_kl_advantages(teacher[y].view(1, 1), lp.detach(), torch.ones(1, 1))
        loss, _ = ppo_clip_loss(lp, lp.detach(), adv, torch.ones(1, 1))
        total = total + log_p[y].exp().detach() * loss
    got, = torch.autograd.grad(total, logits)
    assert torch.allclose(got, expected, atol=1e-6)


def test_roles_defaults_and_rules():
    recipe = RECIPES["opd"]
    cfg = load_config(["--model.teacher_path", "builtin:kt-teacher"], stage="opd")
    assert set(recipe.roles(cfg)) == {"actor", "teacher"}
    assert cfg.rollout.temperature == 1.0 and cfg.actor.kl_coef == 0.0
    assert not recipe.roles(cfg)["teacher"].trains and not recipe.roles(cfg)["teacher"].exported
    cfg = load_config(["--model.teacher_path", "builtin:kt-teacher", "--actor.kl_coef", "0.01"], stage="opd")
    assert set(recipe.roles(cfg)) == {"actor", "teacher", "reference"}
    with pytest.raises(ValueError, match="--model.teacher_path must name the teacher"):
        load_config([], stage="opd")
    assert step_main("opd").is_file()


@pytest.mark.slow
def test_opd_stage_runs_checkpoints_resumes_and_exports_the_actor(tiny_model, tmp_path):
    """2 ranks, ZeRO-3, HF rollouts at T = 1, the teacher *is* the student it starts from: at step 1
    the sampled reverse KL and every advantage are exactly 0; the run checkpoints only the actor,
    exports only the actor, and a second call resumes to a longer run."""
    from tests.conftest import launch, read_metrics, tiny_args

    out = tmp_path / "opd"
    args = tiny_args(tiny_model, out, "--rollout.backend", "hf", "--rollout.temperature", "1.0", "--model.teacher_path", tiny_model,
                     "--trainer.save_every", 1, "--trainer.max_steps", 2)
    launch("opd", 2, args)
    rows = [r for r in read_metrics(out) if r.get("step", 0) > 0]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["opd/reverse_kl"] == 0.0 and rows[0]["actor/pg_loss"] == 0.0
    assert rows[1]["opd/reverse_kl"] != 0.0  # the actor moved away from its teacher copy at lr 1e-3
    assert "time/teacher_log_probs" in rows[0] and "discriminator/d_loss" not in rows[0]
    assert sorted(p.name for p in (out / "final").iterdir()) == ["COMPLETE", "actor"]
    state = json.loads(sorted((out / "checkpoints").glob("step_*"))[-1].joinpath("trainer_state.json").read_text())
    assert state["stage"] == "opd" and set(state["models"]) == {"actor"}
    launch("opd", 2, [*args[:-2], "--trainer.max_steps", 3])
    assert [r["step"] for r in read_metrics(out) if r.get("step", 0) > 0] == [1, 2, 3]
