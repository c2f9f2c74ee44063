"""Where our GAD iteration spends its time below the phase level: cProfile over a few
``StageTrainer.gad_step`` calls on work W (after one untimed step), top functions by own and
cumulative time. A diagnosis aid for missed targets; writes nothing to RESULTS.md.

    python benchmarks/profile_gad_step.py [--steps 3] [--zero-stage 3] [--top 30] [-- extra gadchat flags]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--zero-stage", type=int, default=3)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--callers", action="append", default=[], help="also print who calls functions matching this")
    args, extra = parser.parse_known_args(argv)
    os.environ.update({k: v for k, v in common.bench_env().items() if k in (
        "OMP_NUM_THREADS", "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE", "DS_ACCELERATOR",
        "VLLM_LOGGING_LEVEL", "TOKENIZERS_PARALLELISM")})
    from gadchat import runtime

    runtime.set_process_defaults()
    from gadchat.stages.configure import load_config
    from gadchat.trainer import StageTrainer

    out = tempfile.mkdtemp(prefix="profile_gad_")
    cfg = load_config(["--config", "configs/cpu_tiny.yaml", "--rollout.n", "8", "--rollout.max_new_tokens", "64",
                       "--data.shuffle", "false", "--deepspeed.zero_stage", str(args.zero_stage),
                       "--trainer.output_dir", out, "--trainer.resume", "none", "--trainer.max_steps", "1000"]
                      + [a for a in extra if a != "--"], stage="gad")
    trainer = StageTrainer(cfg)

    def step(i):
        batch = [trainer.examples[j] for j in trainer.schedule.rank_indices(i)]
        return trainer.step_fn(i, batch)

    step(0)
    trainer.engine.timer.timings()
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    for i in range(1, args.steps + 1):
        step(i)
    profiler.disable()
    wall = (time.perf_counter() - started) / args.steps
    phases = {k: v / args.steps for k, v in trainer.engine.timer.timings().items()}
    print(f"ZeRO-{args.zero_stage}: {wall:.3f} s/step (under cProfile); phases per step: "
          + ", ".join(f"{k[5:]}={v:.3f}" for k, v in phases.items()))
    for key in ("tottime", "cumulative"):
        buffer = io.StringIO()
        pstats.Stats(profiler, stream=buffer).sort_stats(key).print_stats(args.top)
        print(f"--- top {args.top} by {key} (per {args.steps} steps) ---")
        print("\n".join(buffer.getvalue().splitlines()[6:]))
    for pattern in args.callers:
        buffer = io.StringIO()
        pstats.Stats(profiler, stream=buffer).print_callers(pattern)
        print(f"--- callers of {pattern} ---")
        print("\n".join(buffer.getvalue().splitlines()[6:]))


if __name__ == "__main__":
    main(sys.argv[1:])
