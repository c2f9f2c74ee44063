"""Measurement 1 (and 5 on the CPU default): where the time of a warm-up and of a GAD iteration goes.

Runs the real entry points (``training/step2_warmup/main.py``, ``training/step3_gad/main.py``) on
``configs/cpu_tiny.yaml`` as subprocesses, reads their ``metrics.jsonl`` ``time/*`` keys, drops the
first step (warm-up of caches and allocator), and reports medians per phase, the unattributed rest
("other" = step - sum of phases), tokens/s, the weight-sync share, and each run's peak RSS
(``os.wait4`` rusage of the child). The warm-up stage runs with ``--trainer.discriminator_warmup 1`` so
every measured step includes the gated actor update.

    python benchmarks/bench_phases.py [--steps 7] [--zero-stage 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PHASES = ["generate", "score", "discriminator_update", "reference_log_probs", "actor_update", "weight_sync"]


def run_stage(stage: str, steps: int, out: Path, extra: list) -> tuple[list, float, float]:
    from gadchat.stages import step_main

    argv = [common.MAIN_PYTHON, str(step_main(stage)), "--config", "configs/cpu_tiny.yaml", "--trainer.output_dir", str(out),
            "--trainer.max_steps", str(steps), "--trainer.tensorboard", "false", "--trainer.progress_bar", "false",
            "--trainer.export_hf", "false", "--trainer.resume", "none"] + extra
    if stage == "warmup":
        argv += ["--trainer.discriminator_warmup", "1"]
    log = open(out.parent / f"{stage}.log", "w")
    started = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=common.ROOT, env=common.bench_env(), stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    log.close()
    if proc.returncode != 0:
        raise SystemExit(f"{stage} run failed (rc={proc.returncode}); see {log.name}")
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return rows, usage.ru_maxrss / 1024.0, wall


def summarise(rows: list) -> dict:
    measured = [r for r in rows if r.get("step", 0) > 1]  # skip the first step
    phases = {p: common.median([r.get(f"time/{p}", 0.0) for r in measured]) for p in PHASES}
    others = [r["time/step"] - sum(r.get(f"time/{p}", 0.0) for p in PHASES) for r in measured]
    sync_share = common.median([r.get("time/weight_sync", 0.0) / r["time/step"] for r in measured])
    return {"steps_measured": len(measured), "phases": phases, "other": common.median(others),
            "step": common.median([r["time/step"] for r in measured]),
            "tokens_per_s": common.median([r["throughput/tokens_per_s"] for r in measured]),
            "sync_share": sync_share}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=7, help="steps per stage; the first is not counted")
    parser.add_argument("--zero-stage", type=int, default=None, help="default: the config's (3)")
    args = parser.parse_args(argv)
    extra = [] if args.zero_stage is None else ["--deepspeed.zero_stage", str(args.zero_stage)]
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_phases_") as tmp:
        from gadchat.stages import handoff_chain

        for stage in handoff_chain("gad"):  # the GAD method's stages (warm-up, then GAD)
            rows, rss, wall = run_stage(stage, args.steps, Path(tmp) / stage, extra)
            results[stage] = summarise(rows) | {"peak_rss_mib": rss, "process_wall_s": wall}
            print(f"[{stage}] {json.dumps(results[stage], indent=None, default=float)}")
    columns = ["stage", "step s"] + [f"{p} s" for p in PHASES] + ["other s", "tokens/s", "sync share", "peak RSS MiB",
                                                                   "process wall s"]
    table_rows = []
    for stage, r in results.items():
        table_rows.append([stage, r["step"]] + [r["phases"][p] for p in PHASES] +
                          [r["other"], r["tokens_per_s"], f"{r['sync_share'] * 100:.2f}%", r["peak_rss_mib"],
                           r["process_wall_s"]])
    for row in table_rows:
        print(" | ".join(str(round(v, 4)) if isinstance(v, float) else str(v) for v in row))
    g = results["gad"]
    description = (
        f"CPU default (`configs/cpu_tiny.yaml`: tiny Qwen2 0.5M params, 8 prompts x n=4, 48 new tokens, ZeRO "
        f"stage {args.zero_stage if args.zero_stage is not None else 3}, vLLM rollout), {args.steps} steps per "
        f"stage, first dropped, median of {g['steps_measured']}. Phases are the trainer's `time/*` metrics: in the GAD "
        "step the discriminator's pre-update forward pass *is* the scoring (one pass), so `score` is 0 and its "
        "cost sits in `discriminator_update`. `other` = step - sum(phases): batch building, GRPO advantages, metrics. "
        "Warm-up runs with `--trainer.discriminator_warmup 1` so every counted step includes the actor SFT(+KL) update. "
        "Peak RSS is the whole process (vLLM, three DeepSpeed engines, Python).")
    common.save_result("1_phases", {
        "title": "1. Phase breakdown, CPU default",
        "description": description,
        "table": {"columns": columns, "rows": table_rows},
        "raw": results,
        "targets": {"sync_share": g["sync_share"]},
        "notes": [f"Weight sync share of a GAD iteration on the CPU default: {g['sync_share'] * 100:.2f}% (target <= 5%)."],
    }, command="python benchmarks/bench_phases.py" + (f" --steps {args.steps}" if args.steps != 7 else ""))


if __name__ == "__main__":
    main()
