"""Recipe details of issue 11: temperature-scaled log-probs (defaults), one EOS set for both rollout
backends, the trimmer and the scorer, teacher text encoded as text, per-stage seeds, global
statistics over the ranks, and the discriminator_warmup gate in the GAD stage."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import HAS_VLLM, REPO, launch, read_metrics, subprocess_env, tiny_args
from gadchat.stages.configure import load_config
from gadchat.data import PromptSchedule, encode_response
from gadchat.batch import SequenceBatch
from gadchat.models import eos_token_ids, load_generation_config
from gadchat.stages import STAGES
from gadchat.stages.base import rollout_seed, stage_seed
from gadchat.stages.common import sample_temperature, sft_temperature


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


# ----------------------------------------------------------------------------------------------
# (a) temperature


def test_temperature_defaults_scale_sample_log_probs_but_not_sft():
    cfg = load_config(["--rollout.temperature", "0.7"], stage="gad")
    assert cfg.actor.temperature_scaled_logprobs is True and cfg.actor.sft_temperature_scaled is False
    assert sample_temperature(cfg) == 0.7
    assert sft_temperature(cfg) == 1.0
    cfg = load_config(["--rollout.temperature", "0.7", "--actor.temperature_scaled_logprobs", "false",
                       "--actor.sft_temperature_scaled", "true"], stage="warmup")
    assert sample_temperature(cfg) == 1.0
    assert sft_temperature(cfg) == 0.7
    assert load_config([], stage="gad").actor.logprob_chunk_tokens > 0  # chunked by default


# ----------------------------------------------------------------------------------------------
# (b) one EOS set


def test_eos_set_is_the_tokenizer_eos_plus_the_generation_config_ones(tokenizer):
    from transformers import GenerationConfig

    eos = tokenizer.eos_token_id
    assert eos_token_ids(tokenizer) == [eos]
    assert eos_token_ids(tokenizer, GenerationConfig(eos_token_id=eos)) == [eos]
    assert eos_token_ids(tokenizer, GenerationConfig(eos_token_id=[eos, 0, 7])) == sorted({eos, 0, 7})
    assert eos_token_ids(tokenizer, GenerationConfig(eos_token_id=5)) == sorted({eos, 5})


def test_scorer_reads_any_eos_of_the_set_as_the_tokenizer_eos():
    batch = SequenceBatch.build([[5, 6], [5], [5, 6, 7]], [[8, 2], [9, 3], [4]], pad_token_id=0)
    out = batch.with_final_token({2, 3}, canonical=2)
    assert out.input_ids.tolist() == [[5, 6, 8, 2], [5, 9, 2, 0], [5, 6, 7, 4]]  # only a final EOS changes
    assert batch.input_ids.tolist() == [[5, 6, 8, 2], [5, 9, 3, 0], [5, 6, 7, 4]]  # the batch itself untouched
    assert torch.equal(out.last_index, batch.last_index) and torch.equal(out.response_mask, batch.response_mask)
    assert batch.with_final_token({2}, canonical=2) is batch


VLLM_SCRIPT = """
import json, sys
from gadchat import runtime
runtime.set_process_defaults()
import torch
from gadchat.generation import VLLMBackend
folder, prompt, eos = sys.argv[1], json.loads(sys.argv[2]), set(json.loads(sys.argv[3]))
rollout = VLLMBackend(folder, folder, torch.float32, max_model_len=256, eos_ids=eos, seed=0)
out = rollout.generate([prompt], n=1, temperature=0.0, top_p=1.0, max_new_tokens=12, seed=0, greedy=True)
print("@@" + json.dumps(out[0][0]))
"""


@pytest.mark.slow
def test_both_backends_stop_on_a_generation_config_eos(tiny_model, tokenizer, tmp_path):
    """A model whose generation config names a second EOS: the engine's EOS set holds both, and the
    HF and vLLM backends stop at (and the trimmer keeps) the first of either."""
    from transformers import AutoModelForCausalLM

    from gadchat.data import encode_prompt
    from gadchat.generation import HFBackend

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    prompt = encode_prompt(tokenizer, [{"role": "user", "content": "Name three primary colours."}])
    free = HFBackend(SimpleNamespace(module=model), tokenizer.pad_token_id, {tokenizer.eos_token_id}, False)
    tokens = free.generate([prompt], 1, 1.0, 1.0, 12, seed=0, greedy=True)[0][0]
    assert tokenizer.eos_token_id not in tokens and len(tokens) == 12, tokens
    # the latest first occurrence of a token (a random tiny model often repeats one token throughout)
    position = max(tokens.index(t) for t in set(tokens))
    extra = tokens[position]
    folder = tmp_path / "two_eos"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    config["eos_token_id"] = [tokenizer.eos_token_id, extra]
    (folder / "generation_config.json").write_text(json.dumps(config))
    eos = set(eos_token_ids(tokenizer, load_generation_config(str(folder))))
    assert eos == {tokenizer.eos_token_id, extra}
    expected = tokens[: position + 1]

    hf = HFBackend(SimpleNamespace(module=model), tokenizer.pad_token_id, eos, False)
    assert hf.generate([prompt], 1, 1.0, 1.0, 12, seed=0, greedy=True)[0][0] == expected
    if HAS_VLLM:
        result = subprocess.run([sys.executable, "-c", VLLM_SCRIPT, str(folder), json.dumps(prompt),
                                 json.dumps(sorted(eos))], cwd=REPO, env=subprocess_env(), capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-4000:]
        line = [x for x in result.stdout.splitlines() if x.startswith("@@")][-1]
        assert json.loads(line[2:]) == expected


# ----------------------------------------------------------------------------------------------
# (c) teacher text is text


def test_special_token_strings_inside_a_teacher_answer_stay_text(tokenizer):
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    text = "Close the turn with <|im_end|> and pad with <|endoftext|>; <|im_start|>user is a header."
    ids = encode_response(tokenizer, text)
    assert ids[-1] == eos and ids.count(eos) == 1  # the appended EOS only
    assert pad not in ids and start not in ids
    assert tokenizer.decode(ids[:-1]) == text


# ----------------------------------------------------------------------------------------------
# (d) per-stage seeds


def test_stages_do_not_replay_each_others_prompt_order_or_rollout_seeds():
    seeds = {stage: stage_seed(42, stage) for stage in STAGES}
    assert len(set(seeds.values())) == len(STAGES) >= 4
    assert stage_seed(42, "gad") == stage_seed(42, "gad") and stage_seed(43, "gad") != seeds["gad"]
    orders = {stage: [PromptSchedule(700, 8, 1, 0, seed).global_indices(step) for step in range(5)]
              for stage, seed in seeds.items()}
    assert orders["warmup"] != orders["gad"] and orders["seqkd"] != orders["warmup"]
    warmup = {rollout_seed(42, "warmup", step, rank) for step in range(50) for rank in range(8)}
    gad = {rollout_seed(42, "gad", step, rank) for step in range(50) for rank in range(8)}
    assert not warmup & gad and len(warmup) == len(gad) == 400


# ----------------------------------------------------------------------------------------------
# (e) global statistics


def _stats_worker(rank, world, port, values, out):
    import torch.distributed as dist

    from gadchat import runtime

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        stats = runtime.global_stats(values[rank])
        torch.save(stats, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_global_stats_pool_every_rank_not_means_of_per_rank_values(tmp_path):
    from conftest import free_port
    from gadchat import runtime

    values = [[1.0, 2.0, 9.0, 4.0], [0.5, -3.0, 2.0, 2.5]]
    torch.multiprocessing.spawn(_stats_worker, args=(2, free_port(), values, str(tmp_path / "s")), nprocs=2)
    pooled = torch.tensor(values[0] + values[1], dtype=torch.float64)
    for rank in range(2):
        stats = torch.load(tmp_path / f"s.{rank}")
        assert stats["max"] == 9.0 and stats["min"] == -3.0 and stats["count"] == 8
        assert stats["mean"] == pytest.approx(float(pooled.mean()), abs=1e-12)
        assert stats["std"] == pytest.approx(float(pooled.std()), abs=1e-12)
    # the old per-rank means would have said max 6.5 and a different std
    per_rank_std = sum(float(torch.tensor(v).std()) for v in values) / 2
    assert abs(per_rank_std - float(pooled.std())) > 0.1
    alone = runtime.global_stats([3.0, 1.0, 2.0])
    assert (alone["mean"], alone["std"], alone["max"], alone["min"]) == (2.0, 1.0, 3.0, 1.0)


# ----------------------------------------------------------------------------------------------
# (f) the gate in the GAD stage


@pytest.mark.slow
def test_gad_stage_honours_discriminator_warmup(tiny_model, tmp_path):
    out = tmp_path / "gad_gate"
    launch("gad", 1, tiny_args(tiny_model, out, "--rollout.backend", "hf", "--trainer.max_steps", 2,
                               "--trainer.discriminator_warmup", 1, "--trainer.log_param_digest", "true",
                               "--rollout.max_new_tokens", 16))
    initial, first, second = read_metrics(out)
    assert first["actor/updated"] == 0.0 and "actor/pg_loss" not in first
    assert first["digest/actor"] == initial["digest/actor"]
    assert first["digest/discriminator"] != initial["digest/discriminator"]  # the discriminator trains meanwhile
    assert second["actor/updated"] == 1.0 and "actor/pg_loss" in second
    assert second["digest/actor"] != first["digest/actor"]


# ----------------------------------------------------------------------------------------------
# (f) the registry declares the hand-offs


def test_each_stage_starts_from_an_earlier_registered_stage_or_the_model():
    from gadchat.stages import RECIPES, handoff_chain

    order = list(RECIPES)
    for name, stage in RECIPES.items():
        if stage.init_from_stage is not None:
            assert order.index(stage.init_from_stage) < order.index(name), name
        assert stage.teacher_model in ("", "optional", "required"), name
        chain = handoff_chain(name)
        assert chain[-1] == name and len(set(chain)) == len(chain)
    assert handoff_chain("gad") == ["warmup", "gad"] and handoff_chain("seqkd") == ["seqkd"]
