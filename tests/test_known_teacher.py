"""The known-teacher set-up: metric functions on hand-computed values, a deterministic teacher
build, teacher data in the published layout read by the ordinary data path, and the reward
diagnostics on hand-made cases."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from gadchat import teacher_metrics as tm
from tests.conftest import HAS_VLLM

# ---------------------------------------------------------------------------------------------
# metric functions


def test_per_token_metrics_pool_over_tokens():
    # two samples: 2 tokens and 1 token (the third position is padding)
    teacher = torch.tensor([[-1.0, -3.0, -99.0], [-2.0, -99.0, -99.0]])
    student = torch.tensor([[-0.5, -1.0, 0.0], [-4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert tm.teacher_nll_per_token(teacher, mask) == pytest.approx((1 + 3 + 2) / 3)
    # (lp_S - lp_T): 0.5, 2.0, -2.0 -> 0.5 / 3
    assert tm.reverse_kl_per_token(student, teacher, mask) == pytest.approx(0.5 / 3)
    assert tm.forward_nll_per_token(student, mask) == pytest.approx((0.5 + 1.0 + 4.0) / 3)
    with pytest.raises(ValueError, match="no response tokens"):
        tm.teacher_nll_per_token(teacher, torch.zeros_like(mask))


def test_length_eos_and_distinct():
    assert tm.length_ratio([10, 20], [15, 15, 30]) == pytest.approx(15 / 20)
    assert tm.eos_share([True, False, True, True]) == pytest.approx(0.75)
    # bigrams: (1,2) (2,1) (1,2) | (3,3) -> distinct {(1,2), (2,1), (3,3)} of 4
    assert tm.distinct_n([[1, 2, 1, 2], [3, 3], [5]], 2) == pytest.approx(3 / 4)
    assert tm.distinct_n([[1], []], 2) == 0.0


def test_spearman_hand_values_and_ties():
    assert tm.ranks([10, 30, 20, 20]) == [1.0, 4.0, 2.5, 2.5]
    assert tm.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert tm.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks x = 1,2,3 ; y = 1,3,2 -> rho = 1 - 6*sum(d^2)/(n(n^2-1)) = 1 - 6*2/24 = 0.5
    assert tm.spearman([1, 2, 3], [5, 9, 7]) == pytest.approx(0.5)
    assert tm.spearman([1, 1, 1], [1, 2, 3]) is None


def test_within_group_spearman_counts_constant_groups_as_zero():
    scores = [[1, 2, 3], [3, 2, 1], [5, 5, 5]]
    targets = [[1, 2, 3], [1, 3, 2], [1, 2, 3]]
    out = tm.within_group_spearman(scores, targets)
    assert out["defined"] == pytest.approx(2 / 3)
    assert out["mean"] == pytest.approx((1.0 + -0.5 + 0.0) / 3)
    assert out["positive_share"] == pytest.approx(1 / 3)
    assert tm.within_group_spearman([], []) == {"mean": 0.0, "positive_share": 0.0, "defined": 0.0}


def test_reward_diagnostics_on_a_hand_made_case():
    # 2 prompts x 3 samples. The reward equals the sequence log-ratio log p_T - log p_S exactly in the
    # first group and is its reverse in the second; length is 1 token everywhere but the last row.
    teacher = torch.tensor([[-1.0, 0], [-2.0, 0], [-3.0, 0], [-1.0, 0], [-2.0, 0], [-3.0, -1.0]])
    student = torch.tensor([[-2.0, 0], [-2.0, 0], [-2.0, 0], [-2.0, 0], [-2.0, 0], [-2.0, -1.0]])
    mask = torch.tensor([[1.0, 0], [1, 0], [1, 0], [1, 0], [1, 0], [1, 1]])
    log_ratio = tm.sequence_sums(teacher - student, mask)  # 1, 0, -1, 1, 0, -1
    assert log_ratio.tolist() == [1.0, 0.0, -1.0, 1.0, 0.0, -1.0]
    rewards = torch.stack([log_ratio[:3], -log_ratio[3:]])
    out = tm.reward_diagnostics(rewards, teacher, student, mask, lengths=[1, 1, 1, 1, 1, 2],
                                ended=[True, False, True, True, True, True])
    assert out["diag/reward_vs_log_ratio"] == pytest.approx((1.0 - 1.0) / 2)
    assert out["diag/reward_vs_teacher_logp"] == pytest.approx((1.0 - 1.0) / 2)
    # group 2 alone has a length spread (group 1 counts 0): reward (-1, 0, 1) vs length (1, 1, 2)
    assert out["diag/reward_vs_length"] == pytest.approx(tm.spearman([-1, 0, 1], [1, 1, 2]) / 2)
    # group 1 alone has an EOS spread: reward (1, 0, -1) vs ended (1, 0, 1)
    assert out["diag/reward_vs_ends_in_eos"] == pytest.approx(tm.spearman([1, 0, -1], [1, 0, 1]) / 2)
    assert out["diag/teacher_nll"] == pytest.approx(13 / 7)
    assert out["diag/reverse_kl"] == pytest.approx(tm.reverse_kl_per_token(student, teacher, mask))


# ---------------------------------------------------------------------------------------------
# the teacher build and its data


def _small_spec(steps: int = 3):
    from gadchat.known_teacher_models import TEACHER

    return dataclasses.replace(TEACHER, hidden_size=64, num_layers=1, intermediate_size=128, steps=steps, num_heads=2,
                               tokens_per_batch=1024)


def test_paragraph_examples_end_in_eos_and_fit(tmp_path):
    from transformers import AutoTokenizer

    from gadchat.known_teacher_models import PARAGRAPH_TOKENS, SHIPPED, paragraph_examples, read_rows
    from gadchat.tiny import build_tokenizer

    build_tokenizer(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    rows = read_rows(SHIPPED / "train.jsonl")[:20]
    examples = paragraph_examples(rows, tokenizer, shuffle_prompts=False, seed=0)
    assert len(examples) > 20  # several paragraphs per answer
    assert all(r[-1] == tokenizer.eos_token_id and len(r) <= PARAGRAPH_TOKENS + 1 for _, r in examples)
    shuffled = paragraph_examples(rows, tokenizer, shuffle_prompts=True, seed=0)
    assert [r for _, r in shuffled] == [r for _, r in examples]  # same answers ...
    assert sum(a[0] != b[0] for a, b in zip(shuffled, examples)) == len(examples)  # ... every one with another prompt


def test_teacher_build_is_deterministic(tmp_path):
    from safetensors.torch import load_file

    from gadchat.known_teacher_models import SHIPPED, build_lm, read_rows

    rows = read_rows(SHIPPED / "train.jsonl")[:40]
    first = load_file(str(build_lm(tmp_path / "a", _small_spec(), rows=rows, log=None) / "model.safetensors"))
    second = load_file(str(build_lm(tmp_path / "b", _small_spec(), rows=rows, log=None) / "model.safetensors"))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    untrained = load_file(str(build_lm(tmp_path / "c", _small_spec(steps=0), rows=rows, log=None) / "model.safetensors"))
    assert any(not torch.equal(first[k], untrained[k]) for k in first)  # training moved it


@pytest.mark.parametrize("backend", ["hf", pytest.param("vllm", marks=pytest.mark.skipif(not HAS_VLLM, reason="no vLLM"))])
def test_teacher_data_is_published_layout_read_by_the_data_path(tmp_path, backend):
    from transformers import AutoTokenizer

    from gadchat.config import DataConfig
    from gadchat.data import load_teacher_data
    from applications.known_teacher_eval import sample_teacher_data
    from gadchat.known_teacher_models import SHIPPED, build_lm, read_rows

    rows = read_rows(SHIPPED / "test.jsonl")[:12]
    teacher = build_lm(tmp_path / "teacher", _small_spec(steps=2), rows=read_rows(SHIPPED / "train.jsonl")[:10], log=None)
    out = tmp_path / "data" / "train.jsonl"
    counts = sample_teacher_data(str(teacher), rows, out, max_new_tokens=8, seed=0, backend=backend)
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert counts["prompts"] == 12 and counts["kept"] + counts["cut"] == 12 and counts["kept"] == len(written)
    for row in written:
        assert set(row) == {"content", "teacher_response"}
        assert row["content"] in [r["content"] for r in rows] and row["teacher_response"].strip()
    # an untrained-ish teacher with an 8-token cap is cut often: those rows are dropped, never given an EOS
    assert counts["cut"] > 0
    if written:
        tokenizer = AutoTokenizer.from_pretrained(teacher)
        examples, report = load_teacher_data(DataConfig(train_files=str(out)), tokenizer)
        assert len(examples) == len(written) and all(e.response_ids[-1] == tokenizer.eos_token_id for e in examples)


def test_evaluation_metrics_of_the_teacher_against_itself(tmp_path):
    """The teacher scored as its own student: reverse KL exactly 0, forward NLL = its own NLL."""
    from transformers import AutoTokenizer

    from applications.known_teacher_eval import evaluate_against_teacher, held_out
    from gadchat.known_teacher_models import SHIPPED, build_lm, read_rows

    teacher = build_lm(tmp_path / "teacher", _small_spec(steps=2), rows=read_rows(SHIPPED / "train.jsonl")[:10], log=None)
    test_rows = read_rows(SHIPPED / "test.jsonl")[:4]
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"content": r["content"], "teacher_response": "Sure. It is so."}) + "\n" for r in test_rows))
    heldout = held_out(data, AutoTokenizer.from_pretrained(teacher))
    out = evaluate_against_teacher({"self": str(teacher)}, str(teacher), heldout, samples_per_prompt=2,
                                   max_new_tokens=6, backend="hf", log=None)["self"]
    assert out["reverse_kl"] == pytest.approx(0.0, abs=1e-6)
    assert out["samples"] == 8 and 0 <= out["eos_share"] <= 1 and out["length"] <= 6
    assert math.isfinite(out["forward_nll"]) and out["forward_nll"] > 0


def test_response_log_probs_read_each_response_position_through_the_core_path(tiny_model):
    """The evaluation's log-probs (the core's sequence_log_probs) laid out by response position:
    ``log softmax(logits)[next token]`` at the position before each response token."""
    from applications.known_teacher_eval import load_scorer, response_log_probs

    model = load_scorer(str(tiny_model))
    prompts, responses = [[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]]
    log_probs, mask = response_log_probs(model, prompts, responses, pad_token_id=0, batch_size=1)
    assert log_probs.shape == mask.shape == (2, 3) and mask.sum(dim=1).tolist() == [2.0, 3.0]
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + response])).logits[0].float().log_softmax(-1)
        expected = torch.stack([logits[len(prompt) - 1 + i, token] for i, token in enumerate(response)])
        assert torch.allclose(log_probs[row, : len(response)], expected, atol=1e-5)
        assert log_probs[row, len(response):].abs().sum() == 0


def test_benchmark_summary_table_and_goal_checks():
    """The benchmark's summary (mean and sample std over seeds), table and goal checks on made-up results."""
    from applications.known_teacher import METRICS, goal_checks, summarise, table

    def result(rkl, nll, fwd):
        row = {key: 1.0 for key, _, _ in METRICS}
        row.update(reverse_kl=rkl, teacher_nll=nll, forward_nll=fwd)
        return row

    per_seed = {
        1: {"start": result(0.9, 7.0, 6.0), "seqkd": result(0.6, 6.0, 5.0), "gad": result(0.4, 5.5, 5.2),
            "gad_frozen": result(2.0, 8.0, 7.0)},
        2: {"start": result(0.9, 7.0, 6.0), "seqkd": result(0.62, 6.1, 5.0), "gad": result(0.42, 5.6, 5.2),
            "gad_frozen": result(2.2, 8.0, 7.0)},
    }
    arms = ["start", "seqkd", "gad", "gad_frozen"]
    summary = summarise(per_seed, arms)
    mean, std, values = summary["seqkd"]["reverse_kl"]
    assert mean == pytest.approx(0.61) and std == pytest.approx(0.0141421, rel=1e-4) and values == [0.6, 0.62]
    assert len(goal_checks(summary)) == 5 and all(met for _, met in goal_checks(summary))
    assert "0.610 ± 0.014" in table(summary, arms, None)
    per_seed[2]["gad"] = result(0.7, 6.5, 5.9)  # one bad seed: spread too wide, forward NLL > 5% worse
    failed = [text for text, met in goal_checks(summarise(per_seed, arms)) if not met]
    assert len(failed) == 3 and any("forward NLL" in text for text in failed)


def test_oracle_reward_and_pooling_flags_are_validated():
    from gadchat.config import GADConfig
    from gadchat.stages.configure import validate

    cfg = GADConfig()
    cfg.trainer.oracle_reward = True
    with pytest.raises(ValueError, match="trainer.oracle_reward"):
        validate(cfg)
    cfg.model.teacher_path = "builtin:kt-teacher"
    validate(cfg)
    cfg.discriminator.pooling = "max"
    with pytest.raises(ValueError, match="discriminator.pooling"):
        validate(cfg)


def test_missing_teacher_path_is_refused_up_front(tmp_path):
    from gadchat.config import GADConfig

    cfg = GADConfig()
    cfg.trainer.output_dir = str(tmp_path / "run")
    cfg.model.teacher_path = str(tmp_path / "no-such-teacher")
    with pytest.raises(ValueError, match="model.teacher_path .*no such folder"):
        cfg.check_paths()


@pytest.mark.slow
def test_gad_stage_logs_diagnostics_and_takes_the_oracle_reward(tiny_model, tmp_path):
    """A real GAD stage (1 rank, ZeRO-3, HF rollouts) whose diagnostics teacher *is* the student it
    starts from, sampling at T = 1: at step 1 the rollouts' reverse KL to that teacher is 0 and the
    oracle reward (the sequence log-ratio) is 0 for every sample; every diag/ key is logged and finite."""
    from tests.conftest import launch, read_metrics, tiny_args

    out = tmp_path / "gad"
    launch("gad", 1, tiny_args(tiny_model, out, "--rollout.backend", "hf", "--rollout.temperature", "1.0",
                               "--trainer.max_steps", 2, "--model.teacher_path", tiny_model,
                               "--trainer.oracle_reward", "true"))
    rows = [r for r in read_metrics(out) if r.get("step", 0) > 0]
    assert len(rows) == 2
    keys = {"diag/teacher_nll", "diag/reverse_kl", "diag/reward_vs_log_ratio", "diag/reward_vs_teacher_logp",
            "diag/reward_vs_length", "diag/reward_vs_ends_in_eos", "time/diagnostics"}
    for row in rows:
        assert keys <= set(row) and all(math.isfinite(row[k]) for k in keys)
        assert all(-1 <= row[k] <= 1 for k in keys if k.startswith("diag/reward_vs"))
    first = rows[0]
    assert abs(first["diag/reverse_kl"]) < 1e-4 and first["diag/teacher_nll"] > 1
    assert abs(first["reward/mean"]) < 1e-3 and first["reward/std"] < 1e-3  # log p_T - log p_S = 0


def test_the_shipped_known_teacher_builds_match_this_code_and_are_copied_not_built(tmp_path, monkeypatch):
    """The benchmark's models ship in the package with the spec they were built with; a cache gets
    the shipped copy (marked SHIPPED) unless GADCHAT_BUILD_KNOWN_TEACHER=1 asks for a build."""
    from gadchat.known_teacher_models import BUILD_SPECS, SHIPPED_MARKER, ensure_lm, shipped_build

    for name in BUILD_SPECS:
        assert shipped_build(name) is not None, f"{name}: the shipped build_spec.json is not this code's spec; rebuild and ship"
    folder = ensure_lm("kt-student", tmp_path / "student", log=None)
    assert (folder / SHIPPED_MARKER).exists() and (folder / "model.safetensors").stat().st_size > 1_000_000
    monkeypatch.setenv("GADCHAT_BUILD_KNOWN_TEACHER", "1")
    assert shipped_build("kt-student") is None


def test_an_arm_judged_by_another_export_is_evaluated_and_cached_beside_its_run(tmp_path):
    """seqkd_ema is judged by its run's weight average (final/actor_ema); each model's evaluation is
    cached in its run folder (beside the run for an export inside final/), or in the output folder."""
    from applications.known_teacher import evaluated_model, evaluation_cache

    out = tmp_path / "kt"
    run = out / "seed42" / "seqkd_ema" / "run"
    assert evaluated_model(run, "seqkd_ema") == str(run / "final" / "actor_ema")
    assert evaluated_model(run, "seqkd_more") == str(run)
    assert evaluation_cache(str(run / "final" / "actor_ema"), out, "seqkd_ema", 42) == \
        run.resolve() / "known_teacher_eval_actor_ema.json"
    assert evaluation_cache(str(run), out, "seqkd_more", 42) == run.resolve() / "known_teacher_eval.json"
    assert evaluation_cache(str(tmp_path / "elsewhere"), out, "start", 43) == out / "eval_start_seed43.json"
