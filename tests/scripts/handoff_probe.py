"""Run under the deepspeed launcher: build a stage with ``--trainer.init_from``, do what it does
before its first step (``maybe_resume``: the hand-off), and save (rank 0) the fp32 master weights
of its trained models and the size of their optimizer state, for a test to compare with the
previous stage's checkpoint and export.
Usage: PROBE_OUT=out.pt deepspeed handoff_probe.py [stage flags]"""

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from gadchat import runtime  # noqa: E402

runtime.set_process_defaults()

import torch  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param  # noqa: E402

from gadchat.stages.configure import load_config  # noqa: E402
from gadchat.trainer import StageTrainer  # noqa: E402

cfg = load_config(sys.argv[1:], stage="gad")
trainer = StageTrainer(cfg)
step = trainer.checkpoints.maybe_resume()
out = {"step": step, "dtype": str(trainer.engine.dtype)}
for name, engine in trainer.engine.trained_models().items():
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    out[name] = {"master": {key: safe_get_full_fp32_param(param).cpu() for key, param in engine.module.named_parameters()},
                 "optimizer_state_entries": len(inner.state)}
if runtime.is_rank0():
    torch.save(out, os.environ["PROBE_OUT"])
runtime.finish()
runtime.exit_process(0)
