"""The black-box per-token stages beside published GAD: ``gad_lr`` (a language-model discriminator
whose log-ratio to a baseline is the reward) and ``spin`` (DPO against the student's own samples),
their pure losses on hand values, SeqKD's best-checkpoint hand-off, and 2-rank ZeRO-3 runs that
checkpoint, resume exactly and export."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import HAS_VLLM, REPO, launch, load_weights, read_metrics, tiny_args
from gadchat.batch import SequenceBatch
from gadchat.losses import bradley_terry_loss, dpo_loss, sequence_log_ratio, token_log_ratio_rewards
from gadchat.safe_load import safe_torch_load
from gadchat.stages import blackbox
from gadchat.teacher_metrics import token_pearson

BACKEND = "vllm" if HAS_VLLM else "hf"


# ----------------------------------------------------------------------------------------------
# pure functions, hand values


def test_sequence_log_ratio_sums_the_masked_token_differences():
    q = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
    b = torch.tensor([[-1.5, -1.0, -7.0], [-1.0, -2.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    # row 0: (-1 + 1.5) + (-2 + 1) = -0.5 (the third token is masked); row 1: 0.5 + 1.5 - 8 = -6
    assert sequence_log_ratio(q, b, mask).tolist() == pytest.approx([-0.5, -6.0])
    # length-normalised: each sum over its own 2 and 3 response tokens
    assert sequence_log_ratio(q, b, mask, length_normalised=True).tolist() == pytest.approx([-0.25, -2.0])


def test_the_replay_history_keeps_the_newest_steps_as_plain_tensors():
    first = SequenceBatch.build([[1, 2]], [[3, 4, 5]], pad_token_id=0)
    samples = SequenceBatch.build([[1, 2], [1, 2]], [[6], [7, 8]], pad_token_id=0)
    record = blackbox.replay_record(first, samples, torch.zeros(1, 4), torch.ones(2, 3))
    answers, replayed, answer_baseline, sample_baseline = blackbox.replayed_pairs(record)
    assert torch.equal(answers.input_ids, first.input_ids) and torch.equal(replayed.response_mask, samples.response_mask)
    assert torch.equal(sample_baseline, torch.ones(2, 3)) and torch.equal(answer_baseline, torch.zeros(1, 4))
    history = []
    for step in range(4):
        history = blackbox.remember(history, {"step": step}, keep=2)
    assert history == [{"step": 2}, {"step": 3}]
    assert blackbox.remember(history, {"step": 4}, keep=0) == []


def test_token_rewards_are_the_masked_log_ratio_of_each_token():
    q = torch.tensor([[-1.0, -2.0, -3.0]])
    old = torch.tensor([[-2.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert token_log_ratio_rewards(q, old, mask).tolist() == [[1.0, -1.0, 0.0]]


def test_dpo_loss_on_hand_values_and_its_gradient_sign():
    beta = 0.5
    chosen = torch.tensor([2.0, -1.0], requires_grad=True)  # h = log pi - log ref of each teacher answer
    rejected = torch.tensor([[1.0, 3.0], [-1.0, -3.0]], requires_grad=True)  # h of each prompt's 2 samples
    loss = dpo_loss(chosen, rejected, beta)
    margins = [0.5 * (2 - 1), 0.5 * (2 - 3), 0.5 * (-1 + 1), 0.5 * (-1 + 3)]
    expected = sum(-math.log(1 / (1 + math.exp(-m))) for m in margins) / 4
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    assert float(loss.detach()) == pytest.approx(float(bradley_terry_loss(beta * chosen, beta * rejected).detach()))
    loss.backward()
    # descending the loss raises the teacher answer's log-ratio and lowers every sample's
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()
    # d/dh_p,i = beta * sigmoid(-margin) / 4 for the first sample of the first prompt
    assert float(rejected.grad[0, 0]) == pytest.approx(beta / 4 / (1 + math.exp(margins[0])), rel=1e-6)


def test_token_pearson_on_hand_values():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, 0.0]])
    targets = torch.tensor([[2.0, 4.0, 6.0], [8.0, -99.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert token_pearson(rewards, targets, mask) == pytest.approx(1.0)  # the masked tokens agree exactly
    assert token_pearson(rewards, -targets, mask) == pytest.approx(-1.0)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    y = torch.tensor([[1.0, 3.0, 2.0, 4.0]])
    assert token_pearson(x, y, torch.ones_like(x)) == pytest.approx(0.8)  # cov 1.0 / (var 1.25 x var 1.25)^0.5
    assert token_pearson(x, torch.ones_like(x), torch.ones_like(x)) == 0.0  # a constant side


def test_a_score_head_handoff_does_not_start_a_language_model_discriminator(tmp_path):
    from gadchat import roles
    from gadchat.config import GADConfig

    scorer, lm = tmp_path / "scorer", tmp_path / "lm"
    for folder, arch in ((scorer, "Qwen2ForSequenceClassification"), (lm, "Qwen2ForCausalLM")):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"architectures": [arch]}))
    cfg = GADConfig()
    cfg.model.actor_path = "start"
    wanted = {"actor": roles.actor(), "discriminator": roles.discriminator(kind=roles.CAUSAL_LM)}
    handoff = {"actor": "handed", "discriminator": str(scorer)}
    assert roles.role_sources(wanted, cfg, handoff)["discriminator"] == "handed"  # q starts from the actor
    handoff["discriminator"] = str(lm)
    assert roles.role_sources(wanted, cfg, handoff)["discriminator"] == str(lm)
    published = {"actor": roles.actor(), "discriminator": roles.discriminator()}
    assert roles.role_sources(published, cfg, handoff)["discriminator"] == "handed"  # nor a q a score head


def test_spin_refuses_checkpoints_between_reference_refreshes():
    from gadchat.config import GADConfig
    from gadchat.stages import recipe

    cfg = GADConfig()
    cfg.actor.reference_refresh_every, cfg.trainer.save_every = 4, 6
    assert "--trainer.save_every must be a multiple of --actor.reference_refresh_every" in \
        recipe("spin").config_problems(cfg)[0]
    cfg.trainer.save_every = 8
    assert recipe("spin").config_problems(cfg) == []


def test_gad_lr_refuses_a_replay_with_no_bradley_terry_loss_to_feed():
    from gadchat.config import GADConfig
    from gadchat.stages import recipe

    cfg = GADConfig()
    cfg.discriminator.replay_steps, cfg.discriminator.bradley_terry_coef, cfg.discriminator.sft_coef = 2, 0.0, 1.0
    problems = recipe("gad_lr").config_problems(cfg)
    assert len(problems) == 1 and problems[0].startswith("--discriminator.replay_steps must be 0")
    cfg.discriminator.bradley_terry_coef = 0.1
    assert recipe("gad_lr").config_problems(cfg) == []


# ----------------------------------------------------------------------------------------------
# 2 ranks, ZeRO-3: SeqKD's best checkpoint -> gad_lr / spin, checkpoints, exact resume, export


def comparable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in rows]


def cut_back_to(run: Path, copy: Path, step: int) -> None:
    """``copy``: the finished ``run`` as it stood right after its step-``step`` checkpoint (later
    checkpoints, the export and later metrics removed), as a run killed there leaves it."""
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "final")
    for step_dir in (copy / "checkpoints").glob("step_*"):
        if int(step_dir.name.split("_")[1]) > step:
            shutil.rmtree(step_dir)
    (copy / "checkpoints" / "latest").write_text(f"step_{step:08d}")
    rows = [r for r in read_metrics(copy) if r["step"] <= step]
    (copy / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_weights(a), load_weights(b)
    assert set(wa) == set(wb)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


@pytest.fixture(scope="module")
def seqkd_best(tiny_model, tmp_path_factory):
    """A SeqKD run that logs the validation forward NLL and saves every 2 steps, and its best
    checkpoint exported as a next stage's start (``inference.export --best-by --as-init-from``)."""
    root = tmp_path_factory.mktemp("blackbox")
    run = root / "seqkd"
    launch("seqkd", 2, tiny_args(tiny_model, run, "--rollout.backend", "hf", "--trainer.max_steps", 6,
                                 "--trainer.eval_every", 2, "--trainer.save_every", 2, "--trainer.keep_last", 10,
                                 "--data.eval_split", 0.2, "--trainer.eval_prompts", 8))
    logged = {r["step"]: r["eval/forward_nll"] for r in read_metrics(run) if "eval/forward_nll" in r}
    assert sorted(logged) == [2, 4, 6] and all(math.isfinite(v) for v in logged.values())
    best_step = min(logged, key=logged.get)
    best = root / "seqkd_best"
    result = subprocess.run([sys.executable, "-m", "inference.export", "--checkpoint", str(run), "--best-by",
                             "eval/forward_nll", "--out", str(best), "--as-init-from", "--which", "actor"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"at step {best_step}:" in result.stdout
    assert (best / "final" / "COMPLETE").exists() and (best / "final" / "actor" / "config.json").exists()
    return best


@pytest.mark.slow
def test_gad_lr_trains_q_and_actor_resumes_exactly_and_exports_q_as_a_language_model(tiny_model, seqkd_best,
                                                                                     tmp_path):
    run = tmp_path / "gad_lr"
    args = tiny_args(tiny_model, run, "--trainer.init_from", seqkd_best, "--rollout.backend", BACKEND,
                     "--trainer.max_steps", 4, "--trainer.save_every", 2, "--trainer.log_param_digest", "true",
                     "--trainer.verify_rollout_sync", "true", "--model.teacher_path", tiny_model,
                     "--discriminator.sft_coef", 0.5, "--actor.sft_coef", 0.1, "--actor.kl_coef", 0.01,
                     "--discriminator.lr", 1e-3, "--discriminator.micro_batch_tokens", 600,
                     "--discriminator.replay_steps", 2, "--discriminator.length_normalised", "true")
    launch("gad_lr", 2, args)
    rows = read_metrics(run)
    initial, steps = rows[0], rows[1:]
    start = load_weights(seqkd_best / "final" / "actor")
    assert initial["digest/actor"] == initial["digest/discriminator"] == initial["digest/reference"]  # all from SeqKD
    for row in steps:
        assert row["digest/actor"] != initial["digest/actor"] and row["digest/discriminator"] != initial["digest/discriminator"]
        assert row["digest/reference"] == initial["digest/reference"]
        for key in ("discriminator/d_loss", "discriminator/d_acc", "discriminator/sft_loss", "reward/per_token_mean",
                    "actor/pg_loss", "actor/sft_loss", "actor/kl", "diag/token_reward_pearson", "diag/reverse_kl"):
            assert key in row and math.isfinite(row[key]), key
        assert row["debug/rollout_greedy_match"] == 1.0  # the pushed weights are the updated actor's
    # q starts as the actor (both SeqKD's best): before its first update D is 0 on every answer
    assert steps[0]["discriminator/d_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert steps[0]["discriminator/teacher_score"] == pytest.approx(0.0, abs=1e-5)
    assert all(row["reward/std"] > 0 for row in steps)  # the rewards come from the updated q

    # each rank's replay history (steps 0 and 1 at the step-2 checkpoint) is in the checkpoint: the
    # resume below, whose q then trains on this step's pairs and the replayed ones, must match
    for rank in (0, 1):
        carried = safe_torch_load(run / "checkpoints" / "step_00000002" / f"carried_rank{rank}.pt")
        assert len(carried["replay"]) == 2 and carried["replay"][0]["sample_baseline"].dim() == 2
    resumed = tmp_path / "gad_lr_resumed"
    cut_back_to(run, resumed, 2)
    launch("gad_lr", 2, tiny_args(tiny_model, resumed, *args[args.index("--trainer.init_from"):]))
    assert comparable(read_metrics(resumed)) == comparable(rows)
    for role in ("actor", "discriminator"):
        assert_same_weights(run / "final" / role, resumed / "final" / role)
    # q is exported as a causal LM, loadable as one, and it moved away from SeqKD's weights
    config = json.loads((run / "final" / "discriminator" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    scoring = json.loads((run / "final" / "discriminator" / "likelihood_ratio.json").read_text())
    assert scoring["baseline"] == "pi_old" and scoring["logits_temperature"] == 0.8
    q = load_weights(run / "final" / "discriminator")
    assert set(q) == set(start) and any(not torch.equal(q[k], start[k]) for k in q)


@pytest.mark.slow
def test_spin_refreshes_its_reference_resumes_exactly_and_exports(tiny_model, seqkd_best, tmp_path):
    run = tmp_path / "spin"
    args = tiny_args(tiny_model, run, "--trainer.init_from", seqkd_best, "--rollout.backend", "hf",
                     "--trainer.max_steps", 4, "--trainer.save_every", 2, "--trainer.log_param_digest", "true",
                     "--actor.reference_refresh_every", 2, "--actor.sft_coef", 0.2, "--actor.micro_batch_tokens", 900,
                     "--model.teacher_path", tiny_model)
    launch("spin", 2, args)
    rows = read_metrics(run)
    initial, steps = rows[0], rows[1:]
    assert initial["digest/reference"] == initial["digest/actor"]
    # the implicit rewards are 0 while the actor is its reference: at step 1 and right after a refresh
    assert steps[0]["spin/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert steps[2]["spin/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert steps[1]["spin/loss"] != pytest.approx(math.log(2), abs=1e-6)
    assert steps[1]["digest/reference"] == initial["digest/reference"]
    assert steps[2]["digest/reference"] == steps[1]["digest/actor"]  # refreshed before step 3 (index 2)
    assert all("diag/token_reward_pearson" in r and "actor/sft_loss" in r for r in steps)

    resumed = tmp_path / "spin_resumed"
    cut_back_to(run, resumed, 2)
    launch("spin", 2, tiny_args(tiny_model, resumed, *args[args.index("--trainer.init_from"):]))
    assert comparable(read_metrics(resumed)) == comparable(rows)
    assert_same_weights(run / "final" / "actor", resumed / "final" / "actor")
