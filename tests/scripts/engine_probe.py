"""Run under the deepspeed launcher: load a stage's latest checkpoint into the hybrid engine and
save (rank 0) the actor's logits and the discriminator's scores on a few teacher sequences, so a
test can compare them with the exported Hugging Face folders.
Usage: PROBE_OUT=out.pt deepspeed engine_probe.py [stage flags]"""

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from gadchat import runtime  # noqa: E402

runtime.set_process_defaults()

import torch  # noqa: E402

from gadchat.stages.configure import load_config  # noqa: E402
from gadchat.stages.common import teacher_batch  # noqa: E402
from gadchat.trainer import StageTrainer  # noqa: E402

out_file = os.environ["PROBE_OUT"]
cfg = load_config(sys.argv[1:], stage="warmup")
trainer = StageTrainer(cfg)
step = trainer.checkpoints.maybe_resume()
batch = teacher_batch(trainer.context, trainer.examples[:4])
engine = trainer.engine
engine.eval_mode()
with torch.no_grad():
    device_batch = batch.to(engine.device)
    logits = engine.actor(input_ids=device_batch.input_ids, attention_mask=device_batch.attention_mask).logits
    scores = engine.scores(batch)
if runtime.is_rank0():
    torch.save({"step": step, "input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                "last_index": batch.last_index, "logits": logits.float().cpu(), "scores": scores.cpu()}, out_file)
runtime.finish()
runtime.exit_process(0)
