"""Run under the deepspeed launcher (2 ranks, ZeRO-3, a LoRA actor and discriminator): count what
trains and what the optimizers hold, make two actor updates at a learning rate where the adapter
matters, then check the vLLM push (merged weights, and the base alone as the negative control), the
adapter-off reference against a separately built reference, and the merged export against the live
logits. Rank 0 saves what it saw to PROBE_OUT; the export goes to PROBE_EXPORT.
Usage: PROBE_OUT=out.pt PROBE_EXPORT=folder deepspeed lora_probe.py [gad stage flags]"""

import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from gadchat import runtime  # noqa: E402

runtime.set_process_defaults()

import torch  # noqa: E402

from gadchat import lora  # noqa: E402
from gadchat import roles  # noqa: E402
from gadchat.hf_export import export_live  # noqa: E402
from gadchat.stages.common import teacher_batch  # noqa: E402
from gadchat.stages.configure import load_config  # noqa: E402
from gadchat.trainer import StageTrainer  # noqa: E402

cfg = load_config(sys.argv[1:], stage="gad")
trainer = StageTrainer(cfg)
engine = trainer.engine
out = {"roles_built": sorted(engine.models)}

# what trains: the sizes ZeRO-3 knows (ds_numel) of the parameters that require grad, and the
# optimizer state's fp32 partitions and Adam moments on this rank, summed over the ranks
for name, model in engine.trained_models().items():
    trainable = {n: int(p.ds_numel) for n, p in model.module.named_parameters() if p.requires_grad}
    out[f"{name}_trainable"] = trainable
    out[f"{name}_total"] = sum(int(p.ds_numel) for p in model.module.parameters())

batch = teacher_batch(trainer.context, trainer.examples[:4]).to(engine.device)


def optimizer_state_numel(model) -> int:
    flat = model.optimizer.fp32_partitioned_groups_flat
    state = model.optimizer.optimizer.state
    local = sum(t.numel() for t in flat) + sum(v.numel() for s in state.values() for v in s.values()
                                               if torch.is_tensor(v) and v.dim() > 0)
    total = torch.tensor([local], dtype=torch.float64)
    torch.distributed.all_reduce(total)
    return int(total.item())


def replica_gaps() -> None:
    """Adapters small enough for ZeRO-3 to keep whole on every rank (``ds_persist``; gathered again
    after every optimizer step) hold the same values everywhere."""
    for name, model in engine.trained_models().items():
        gap, count = torch.zeros(1), 0
        for n, p in model.module.named_parameters():
            if lora.is_adapter_weight(n) and p.ds_persist and p.data.numel() == p.ds_numel:
                rank0 = p.data.clone()
                torch.distributed.broadcast(rank0, 0)
                gap, count = torch.maximum(gap, (p.data - rank0).abs().max().reshape(1)), count + 1
        torch.distributed.all_reduce(gap, op=torch.distributed.ReduceOp.MAX)
        out[f"{name}_adapter_rank_gap"], out[f"{name}_adapter_replicated"] = float(gap), count


def trained_weights(model) -> dict:
    """The whole trained parameters (gathered from ZeRO-3), on every rank."""
    import deepspeed

    named = [(n, p) for n, p in model.module.named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in named]):
        return {n: p.data.detach().float().clone() for n, p in named}


seen_weights = [trained_weights(engine.actor)]  # w0, w1, w2: the EMA's inputs
for _ in range(2):
    with engine.update("actor", 1) as update:
        log_probs, _ = engine.log_probs(engine.actor, batch)
        update.backward(-(log_probs * batch.target_mask).sum() / batch.target_mask.sum())
    replica_gaps()
    seen_weights.append(trained_weights(engine.actor))
decay = cfg.actor.ema_decay
out["ema_expected"] = {n: decay**2 * seen_weights[0][n] + decay * (1 - decay) * seen_weights[1][n]
                       + (1 - decay) * seen_weights[2][n] for n in seen_weights[0]}
with engine.actor_ema.swapped_in():
    out["ema_swapped_in"] = trained_weights(engine.actor)
out["weights_after_swap"], out["weights_before_swap"] = trained_weights(engine.actor), seen_weights[2]
out["actor_optimizer_state_numel"] = optimizer_state_numel(engine.actor)

prompts = [example.prompt_ids for example in trainer.examples[:4]]
if engine.rollout is None:
    engine.build_rollout()
out["sync_merged"] = engine.rollout_sync_check(prompts, 16)
engine.rollout.load_weights(lora.iter_merged_weights(engine.actor.module, engine.zero3, 2**20, merge=False))
out["sync_base_only"] = engine.rollout_sync_check(prompts, 16)  # not re-pushed: the rollout holds the base

# the reference: the actor with its adapter off, against a separately built frozen reference
separate = engine._build(roles.reference(), engine.actor_path)
out["reference_adapter_off"] = engine.log_probs_no_grad(engine.reference, batch, 4)
out["reference_separate"] = engine.log_probs_no_grad(separate, batch, 4)
out["actor_log_probs"] = engine.log_probs_no_grad(engine.actor, batch, 4)

# the merged export reproduces the live actor's logits
export_dir = Path(os.environ["PROBE_EXPORT"])
export_live(engine.actor.module, export_dir, engine.tokenizer, zero3=engine.zero3)
with torch.no_grad():
    out["live_logits"] = engine.actor(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float().cpu()
out["input_ids"], out["attention_mask"] = batch.input_ids.cpu(), batch.attention_mask.cpu()
if runtime.is_rank0():
    torch.save(out, os.environ["PROBE_OUT"])
runtime.finish()
runtime.exit_process(0)
