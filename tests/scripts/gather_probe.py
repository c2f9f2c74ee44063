"""Run under the deepspeed launcher (2 ranks, ZeRO-3, rollout.backend hf): sample from the actor
with its weights gathered once per generate call and with the per-layer gathers, same seed; then
check that the gather left the model as ZeRO-3 had it (weights partitioned again, the partitioning
hooks back) by running one actor update. Rank 0 saves what it saw to PROBE_OUT.
Usage: PROBE_OUT=out.pt deepspeed gather_probe.py [stage flags]"""

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from gadchat import runtime  # noqa: E402

runtime.set_process_defaults()

import torch  # noqa: E402

from gadchat.stages.configure import load_config  # noqa: E402
from gadchat.stages.common import teacher_batch  # noqa: E402
from gadchat.trainer import StageTrainer  # noqa: E402


def partitioned(module) -> bool:
    """Every ZeRO-3 parameter but the small persistent ones (stage3_param_persistence_threshold)
    holds only its partition (an empty full tensor) outside a gather; there are such parameters."""
    large = [p for p in module.parameters() if not p.ds_persist]
    return bool(large) and all(p.ds_status.name == "NOT_AVAILABLE" and p.numel() == 0 for p in large)


cfg = load_config(sys.argv[1:], stage="gad")
trainer = StageTrainer(cfg)
engine = trainer.engine
prompts = [example.prompt_ids for example in trainer.examples[:3]]
hooks_before = len(engine.actor.optimizer.parameter_offload.forward_hooks)
out = {"partitioned_before": partitioned(engine.actor.module)}
for gather in (True, False):
    cfg.rollout.hf_gather_weights = gather
    backend = engine.actor_generator()
    out[f"gather_{gather}"] = backend.gather_weights
    out[f"tokens_{gather}"] = backend.generate(prompts, n=2, temperature=0.8, top_p=1.0, max_new_tokens=12, seed=7)
    out[f"partitioned_after_{gather}"] = partitioned(engine.actor.module)
out["hooks_restored"] = len(engine.actor.optimizer.parameter_offload.forward_hooks) == hooks_before > 0
batch = teacher_batch(trainer.context, trainer.examples[:2]).to(engine.device)
with engine.update("actor", 1) as update:
    logits = engine.actor(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    update.backward(logits.float().logsumexp(-1).mean())
out["update_loss"] = update.loss
out["partitioned_after_update"] = partitioned(engine.actor.module)
if runtime.is_rank0():
    torch.save(out, os.environ["PROBE_OUT"])
runtime.finish()
runtime.exit_process(0)
