"""LoRA for the actor and the discriminator, and the actor's EMA: the adapter on its own (trainable counts by hand, the
out-of-place merge, the adapter switched off, PEFT's folder), the configuration rules, and 2-rank
ZeRO-3 runs with real vLLM: the merged push (and the base alone as its negative control), the
adapter-off reference against a separate one, the merged export, checkpoints that hold only what
trains, exact resume with gradient checkpointing on (the EMA included), the offline export, and the
refusal of a mismatched resume; the EMA equals a hand-computed average under ZeRO-3."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import HAS_VLLM, REPO, launch, launch_probe, load_weights, read_metrics, tiny_args
from gadchat import lora
from gadchat.config import GADConfig, ActorConfig

BACKEND = "vllm" if HAS_VLLM else "hf"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_section(rank=4, alpha=0.0, targets=",".join(TARGETS)):
    return ActorConfig(lora_rank=rank, lora_alpha=alpha, lora_target_modules=targets)


def hand_count(config, rank: int) -> int:
    """sum over the adapted projections of r x (in + out), from the model's shape alone."""
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    per_layer = (h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h)  # q, k+v, o, gate+up, down
    return rank * per_layer * config.num_hidden_layers


def tiny_lm(tiny_model):
    from gadchat.models import load_causal_lm

    return load_causal_lm(str(tiny_model), torch.float32, "sdpa")


def ids(n=2, length=12):
    generator = torch.Generator().manual_seed(0)
    return torch.randint(5, 1000, (n, length), generator=generator)


# ----------------------------------------------------------------------------------------------
# the adapter on its own (one process)


def test_only_the_adapter_trains_and_its_size_is_the_hand_count(tiny_model):
    model = lora.add_adapter(tiny_lm(tiny_model), lora_section(rank=4), "actor", seed=1)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(lora.is_adapter_weight(n) for n in trainable)
    assert sum(trainable.values()) == hand_count(model.config, 4)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "embed_tokens" in n or "lm_head" in n)


def test_a_discriminator_adapter_trains_its_score_head_in_full(tiny_model):
    from gadchat.models import load_discriminator

    disc = load_discriminator(str(tiny_model), pad_token_id=0, dtype=torch.float32, attn="sdpa")
    lora.add_adapter(disc.seqcls, lora_section(rank=2), "discriminator", seed=1, seqcls=True)
    trainable = {n: p.numel() for n, p in disc.seqcls.named_parameters() if p.requires_grad}
    config = disc.seqcls.config
    assert trainable.pop("score.weight") == config.hidden_size
    assert sum(trainable.values()) == hand_count(config, 2)


def test_a_target_the_model_lacks_is_refused_naming_the_flag(tiny_model):
    with pytest.raises(ValueError, match=r"--actor.lora_target_modules 'c_attn': the model has no module named c_attn; its linear .*q_proj"):
        lora.add_adapter(tiny_lm(tiny_model), lora_section(targets="c_attn"), "actor", seed=1)


def test_merged_weights_are_computed_out_of_place_and_equal_peft_merge(tiny_model):
    model = lora.add_adapter(tiny_lm(tiny_model), lora_section(rank=4, alpha=8), "actor", seed=1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(0, 0.05)  # B starts at 0; make the adapter matter
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    merged = dict(lora.iter_merged_weights(model, zero3=False, bucket_bytes=0))
    base_only = dict(lora.iter_merged_weights(model, zero3=False, bucket_bytes=0, merge=False))
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # training weights untouched
    plain = tiny_lm(tiny_model)
    assert set(merged) == {n for n, _ in plain.named_parameters()}  # plain Hugging Face names, complete
    layer = lora.adapter_layers(model)["model.layers.0.self_attn.q_proj"]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = before["model.layers.0.self_attn.q_proj.base_layer.weight"] + 2.0 * (b @ a)  # alpha / r = 2
    assert torch.allclose(merged["model.layers.0.self_attn.q_proj.weight"], expected, atol=1e-6)
    assert torch.equal(base_only["model.layers.0.self_attn.q_proj.weight"],
                       before["model.layers.0.self_attn.q_proj.base_layer.weight"])
    # the merged plain model computes what the adapted one does; PEFT's own merge agrees
    plain.load_state_dict(merged, strict=False)
    x = ids()
    with torch.no_grad():
        adapted, merged_logits = model(input_ids=x).logits, plain(input_ids=x).logits
        with lora.adapters_disabled(model):
            off = model(input_ids=x).logits
        base = tiny_lm(tiny_model)(input_ids=x).logits
    assert torch.allclose(adapted, merged_logits, atol=1e-5)
    assert torch.equal(off, base) and (adapted - base).abs().max() > 1e-3
    assert all(p.requires_grad for n, p in model.named_parameters() if lora.is_adapter_weight(n))  # switched back


def test_the_adapter_folder_loads_in_peft_over_its_base(tiny_model, tmp_path):
    from peft import PeftModel

    section = lora_section(rank=4)
    model = lora.add_adapter(tiny_lm(tiny_model), section, "actor", seed=1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(0, 0.05)
    lora.save_adapter_folder(lora.adapter_state_dict(model, zero3=False), lora.lora_config(section), tmp_path / "a",
                             base_model=str(tiny_model))
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["r"] == 4
    loaded = PeftModel.from_pretrained(tiny_lm(tiny_model), str(tmp_path / "a"))
    x = ids()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=x).logits, model(input_ids=x).logits, atol=1e-6)


def test_ema_averages_the_trained_weights_by_hand_and_round_trips():
    from gadchat.ema import WeightEMA, ema_update

    average = torch.tensor([1.0, 2.0])
    ema_update(average, torch.tensor([3.0, -2.0]), 0.75)
    assert torch.equal(average, torch.tensor([1.5, 1.0]))  # 0.75 * a + 0.25 * w
    layer = torch.nn.Linear(2, 1, bias=False)
    layer.weight.data.copy_(torch.tensor([[0.0, 4.0]]))
    ema = WeightEMA(layer, 0.5)
    for value in ([[2.0, 0.0]], [[4.0, 8.0]]):
        layer.weight.data.copy_(torch.tensor(value))
        ema.update()
    expected = torch.tensor([[0.25 * 0 + 0.25 * 2 + 0.5 * 4, 0.25 * 4 + 0.25 * 0 + 0.5 * 8]])
    with ema.swapped_in():
        assert torch.equal(layer.weight.data, expected)
    assert torch.equal(layer.weight.data, torch.tensor([[4.0, 8.0]]))
    again = WeightEMA(layer, 0.5)
    again.load_state_dict(ema.state_dict(), "test")
    assert again.updates == 2 and torch.equal(again.averages[0], expected)
    with pytest.raises(ValueError, match="ema_decay must be"):
        WeightEMA(layer, 1.0)


# ----------------------------------------------------------------------------------------------
# configuration rules


def problems(*flags, stage="gad"):
    from gadchat import config
    from gadchat.stages.configure import build_parser, stage_defaults, stage_problems

    return stage_problems(config.parse_config(list(flags), stage, build_parser("t", stage), stage_defaults))


def test_lora_flags_are_checked_and_named():
    assert problems("--actor.lora_rank", "8") == []
    assert any(p.startswith("--actor.lora_rank must be >= 0") for p in problems("--actor.lora_rank", "-1"))
    assert any(p.startswith("--discriminator.lora_dropout must be") for p in problems("--discriminator.lora_dropout", "1"))
    assert any(p.startswith("--actor.lora_target_modules: lm_head cannot take an adapter")
               for p in problems("--actor.lora_rank", "8", "--actor.lora_target_modules", "q_proj,lm_head"))
    assert any(p.startswith("--trainer.init_optimizer_states must be false with --actor.lora_rank 8")
               for p in problems("--actor.lora_rank", "8", "--trainer.init_optimizer_states", "true"))
    assert GADConfig().actor.lora_rank == 0 and GADConfig().discriminator.lora_rank == 0  # the published recipe


def test_spin_refuses_a_refreshed_reference_with_a_lora_actor():
    assert any(p.startswith("--actor.reference_refresh_every must be 0 with --actor.lora_rank 4")
               for p in problems("--actor.lora_rank", "4", "--actor.reference_refresh_every", "2",
                                 "--trainer.save_every", "2", stage="spin"))


# ----------------------------------------------------------------------------------------------
# 2 ranks, ZeRO-3, real vLLM


@pytest.mark.slow
def test_lora_push_reference_counts_and_export_under_zero3(tiny_model, tmp_path):
    probe, export = tmp_path / "probe.pt", tmp_path / "export"
    os.environ["PROBE_EXPORT"] = str(export)
    try:
        launch_probe("lora_probe.py", 2, tiny_args(tiny_model, tmp_path / "run", "--rollout.backend", BACKEND,
                                                   "--actor.lora_rank", 4, "--discriminator.lora_rank", 2,
                                                   "--actor.lr", 0.05, "--actor.kl_coef", 0.01,
                                                   "--actor.ema_decay", 0.5), probe, timeout=600)
    finally:
        os.environ.pop("PROBE_EXPORT", None)
    seen = torch.load(probe)
    assert "reference" not in seen["roles_built"]  # the actor with its adapter off instead
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_model)
    assert sum(seen["actor_trainable"].values()) == hand_count(config, 4)
    assert sum(seen["discriminator_trainable"].values()) == hand_count(config, 2) + config.hidden_size
    assert all(lora.is_adapter_weight(n) for n in seen["actor_trainable"])
    # the optimizer holds fp32 master weights and two Adam moments of the adapter only
    assert seen["actor_optimizer_state_numel"] == 3 * sum(seen["actor_trainable"].values())
    assert seen["actor_total"] > 20 * sum(seen["actor_trainable"].values())
    assert seen["actor_adapter_replicated"] > 0
    assert seen["actor_adapter_rank_gap"] == 0.0 and seen["discriminator_adapter_rank_gap"] == 0.0
    # the EMA of the adapter after two updates is the hand-computed average, and swapping it in for
    # an export leaves the trained weights as they were
    for name, expected in seen["ema_expected"].items():
        assert torch.allclose(seen["ema_swapped_in"][name], expected, atol=1e-7), name
        assert torch.equal(seen["weights_after_swap"][name], seen["weights_before_swap"][name]), name
    assert any(not torch.equal(seen["ema_expected"][n], seen["weights_before_swap"][n]) for n in seen["ema_expected"])
    # the push: merged weights match the actor; the base alone does not (the check can fail)
    assert seen["sync_merged"]["debug/rollout_greedy_match"] == 1.0
    assert seen["sync_merged"]["debug/rollout_greedy_logprob_gap"] < 1e-5
    if BACKEND == "vllm":
        assert seen["sync_base_only"]["debug/rollout_greedy_logprob_gap"] > 1e-2
    # the adapter-off reference is exactly a separately built reference; the adapted actor is not
    assert torch.equal(seen["reference_adapter_off"], seen["reference_separate"])
    assert (seen["actor_log_probs"] - seen["reference_separate"]).abs().max() > 1e-3
    # the merged export is a plain Hugging Face model computing the live actor's logits
    assert not any(".lora_" in k or "base_layer" in k for k in load_weights(export))
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    with torch.no_grad():
        logits = model(input_ids=seen["input_ids"], attention_mask=seen["attention_mask"]).logits
    mask = seen["attention_mask"].bool()
    assert (logits - seen["live_logits"])[mask].abs().max() < 1e-4


def comparable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in rows]


@pytest.mark.slow
def test_lora_gad_checkpoints_the_adapter_resumes_exactly_and_refuses_a_full_resume(tiny_model, tmp_path):
    run = tmp_path / "gad"
    flags = ["--rollout.backend", BACKEND, "--actor.lora_rank", 4, "--discriminator.lora_rank", 2,
             "--actor.lr", 1e-2, "--actor.kl_coef", 0.01, "--trainer.max_steps", 4, "--trainer.save_every", 2,
             "--trainer.keep_last", 3, "--trainer.verify_rollout_sync", "true", "--trainer.log_param_digest", "true",
             "--actor.ema_decay", 0.9]
    launch("gad", 2, tiny_args(tiny_model, run, *flags))
    rows = read_metrics(run)
    assert all(r["debug/rollout_greedy_match"] == 1.0 for r in rows[1:])
    assert all(r["actor/kl"] > 0 for r in rows[2:])  # the adapter-off reference stays at the start
    assert len({r["digest/actor"] for r in rows}) == len(rows)  # the adapter moves every step
    # a checkpoint holds what trains: the adapters (and the head), not the frozen base
    state = json.loads((run / "checkpoints" / "step_00000002" / "trainer_state.json").read_text())
    assert state["lora"]["actor"]["rank"] == 4 and math.isfinite(state["lora"]["actor"]["base_digest"])
    size = sum(f.stat().st_size for f in (run / "checkpoints" / "step_00000002").rglob("*") if f.is_file())
    base = sum(f.stat().st_size for f in (run / "final" / "actor").glob("*.safetensors"))
    assert size < base  # two models' adapters and Adam states < one model's weights
    # the export: merged folders plus PEFT adapter folders, and the EMA's merged folder
    ema, last = load_weights(run / "final" / "actor_ema"), load_weights(run / "final" / "actor")
    assert set(ema) == set(last) and any(not torch.equal(ema[k], last[k]) for k in ema)
    for role in ("actor", "discriminator"):
        assert (run / "final" / f"{role}_adapter" / "adapter_model.safetensors").exists()
        assert not any(".lora_" in k for k in load_weights(run / "final" / role))

    # the offline export from the ZeRO checkpoint: the adapter merged onto its recorded base
    offline = tmp_path / "offline"
    result = subprocess.run([sys.executable, "-m", "inference.export", "--checkpoint", str(run), "--out", str(offline)],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    for role in ("actor", "discriminator"):
        live, merged = load_weights(run / "final" / role), load_weights(offline / role)
        assert set(live) == set(merged), role
        assert all(torch.allclose(live[k], merged[k], atol=1e-6) for k in live), role

    # killed after step 2, resumed with gradient checkpointing on: the same run, bit for bit
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "final")
    for step_dir in (resumed / "checkpoints").glob("step_*"):
        if int(step_dir.name.split("_")[1]) > 2:
            shutil.rmtree(step_dir)
    (resumed / "checkpoints" / "latest").write_text("step_00000002")
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= 2))
    launch("gad", 2, tiny_args(tiny_model, resumed, *flags, "--model.gradient_checkpointing", "true"))
    assert comparable(read_metrics(resumed)) == comparable(rows)
    for role in ("actor", "discriminator", "actor_ema"):  # the EMA survives the resume too
        a, b = load_weights(run / "final" / role), load_weights(resumed / "final" / role)
        assert all(torch.equal(a[k], b[k]) for k in a), role

    # the same folder resumed as full fine-tuning: refused in one line naming the flag
    result = launch("gad", 2, tiny_args(tiny_model, run, *flags, "--actor.lora_rank", 0, "--trainer.max_steps", 6),
                    check=False)
    assert result.returncode == 2
    assert "--actor.lora_rank/lora_alpha/lora_target_modules: the actor checkpoint was written with LoRA" in result.stderr
