"""Benchmark worker: our GAD iteration (StageTrainer.gad_step on the hybrid engine), kept warm.

Protocol (benchmarks/common.py): answers ``ready`` after building the engine and running one
untimed warm-up step, then for each ``run K`` on stdin runs K steps and answers their timings.
Argv: GAD-Chat configuration flags (``--config ... --section.field value``).
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


def build():
    from gadchat import runtime

    runtime.set_process_defaults()
    from gadchat.stages.configure import load_config
    from gadchat.trainer import StageTrainer

    cfg = load_config(sys.argv[1:], stage="gad")
    trainer = StageTrainer(cfg)
    engine = trainer.engine
    step = 0

    def one_step():
        nonlocal step
        batch = [trainer.examples[i] for i in trainer.schedule.rank_indices(step)]
        started = time.perf_counter()
        metrics = trainer.step_fn(step, batch).metrics
        elapsed = time.perf_counter() - started
        phases = {k[len("time/"):]: v for k, v in engine.timer.timings().items()}
        step += 1
        return {"step_s": elapsed, "phases": phases, "response_length": metrics["response_length/mean"],
                "prompts": [e.prompt_ids[:4] for e in batch][:1]}

    return one_step


if __name__ == "__main__":
    common.serve_worker(build)
