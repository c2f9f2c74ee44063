"""Run under the deepspeed launcher (stage flags as for a step's main.py): builds the real stage
trainer and checks, inside the real engine, (1) that the chunked log-prob path equals the plain one
in value and gradient under the configured ZeRO stage (the LM head is a ZeRO-3 parameter, tied to
the embedding on the tiny model), and (2) how many activation-checkpointed layer calls the actor
and the discriminator make during one real stage step, and in which mode the models are left.
Rank 0 writes the findings as JSON to $PROBE_OUT.
Usage: PROBE_OUT=out.json deepspeed update_probe.py [stage flags]"""

import json
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from gadchat import runtime  # noqa: E402

runtime.set_process_defaults()

from deepspeed.utils import safe_get_full_grad  # noqa: E402

from gadchat.stages.configure import load_config  # noqa: E402
from gadchat.stages.common import teacher_batch  # noqa: E402
from gadchat.trainer import StageTrainer  # noqa: E402

cfg = load_config(sys.argv[1:])
trainer = StageTrainer(cfg)
engine = trainer.engine
out = {"stage": cfg.trainer.stage, "world_size": trainer.world_size}

# (1) chunked == plain under the real engine, values and gradients
student = teacher_batch(trainer.context, [trainer.examples[i] for i in trainer.schedule.rank_indices(0)])
part = student.slice(0, 4)
mask = part.target_mask
results = {}
actor = engine.actor
actor.train()
for chunk in (0, 7):
    cfg.actor.logprob_chunk_tokens = chunk
    actor.set_gradient_accumulation_boundary(True)
    log_probs, entropy = engine.log_probs(actor, part, with_entropy=True, temperature=0.8)
    loss = ((log_probs * mask).sum() - 0.1 * (entropy * mask).sum()) / mask.sum()
    actor.backward(loss, scale_wrt_gas=False)
    grads = {}
    for name, param in actor.module.named_parameters():
        grad = safe_get_full_grad(param)
        grads[name] = None if grad is None else grad.detach().float().clone()
    actor.optimizer.zero_grad(set_to_none=True)
    results[chunk] = ((log_probs.detach() * mask).cpu(), grads)
actor.eval()
cfg.actor.logprob_chunk_tokens = 7
plain, chunked = results[0], results[7]
out["logprob_max_abs_diff"] = float((plain[0] - chunked[0]).abs().max())
diffs = {}
for name, grad in plain[1].items():
    other = chunked[1][name]
    if grad is None or other is None:
        diffs[name] = None if grad is None and other is None else float("inf")
    else:
        diffs[name] = float((grad - other).abs().max() / grad.abs().max().clamp(min=1e-12))
out["grad_rel_diff"] = diffs
out["grad_norm"] = float(sum(g.norm() ** 2 for g in plain[1].values() if g is not None) ** 0.5)

# (2) activation checkpointing during one real step
counts = {"actor": 0, "discriminator": 0}


def wrap(module, key):
    for layer in module.modules():
        func = getattr(layer, "_gradient_checkpointing_func", None)
        if func is None or not getattr(layer, "gradient_checkpointing", False):
            continue

        def counted(*args, _func=func, **kwargs):
            counts[key] += 1
            return _func(*args, **kwargs)

        layer._gradient_checkpointing_func = counted


wrap(engine.actor.module, "actor")
if engine.discriminator is not None:
    wrap(engine.discriminator.module, "discriminator")
step_batch = [trainer.examples[i] for i in trainer.schedule.rank_indices(0)]
metrics = trainer.step_fn(0, step_batch).metrics
out["checkpointed_calls"] = counts
out["actor_training_after_step"] = engine.actor.module.training
out["discriminator_training_after_step"] = None if engine.discriminator is None else engine.discriminator.module.training
out["metrics"] = {k: v for k, v in metrics.items() if isinstance(v, float)}
if runtime.is_rank0():
    with open(os.environ["PROBE_OUT"], "w") as handle:
        json.dump(out, handle, indent=1)
runtime.finish()
runtime.exit_process(0)
