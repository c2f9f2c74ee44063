"""One command for the whole method: GAD warm-up, then the GAD stage (and the SeqKD baseline beside
them when asked), each through the ``deepspeed`` launcher scripts of its step folder, then a
held-out evaluation and one table per stage.

CPU default (no flags): a tiny student built on the spot, the shipped GPT-4o teacher data, two
ZeRO-3 ranks, a few minutes on 2 cores. For a real run pick a model and a deployment::

    python -m applications.run_pipeline --model Qwen/Qwen2.5-7B-Instruct --deployment single_node \
        --output-dir outputs/qwen7b --with-seqkd -- --data.train_files my_teacher_data.jsonl

Flags after ``--`` go to every stage (``--section.field VALUE``, see any step's ``--help``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STEPS = {"seqkd": "step1_seqkd", "warmup": "step2_warmup", "gad": "step3_gad"}
DEPLOYMENTS = ("cpu", "single_gpu", "single_node", "multi_node")


def stage_script(stage: str, deployment: str) -> Path:
    name = "run_tiny.sh" if deployment == "cpu" else "run_qwen2.5_7b.sh"
    return REPO / "training" / STEPS[stage] / "training_scripts" / deployment / name


def last_mean(rows: list, key: str, count: int = 5):
    values = [r[key] for r in rows if key in r][-count:]
    return sum(values) / len(values) if values else None


def read_rows(output_dir: Path) -> list:
    path = output_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def run_stage(stage: str, args, output_dir: Path, init_from: Path | None, extra: list) -> float:
    env = dict(os.environ)
    env["ACTOR"] = args.model
    env["OUTPUT"] = str(output_dir)
    if init_from is not None:
        env["INIT_FROM"] = str(init_from)
    else:
        env.pop("INIT_FROM", None)
    if args.deployment == "cpu":
        env.setdefault("NUM_PROCS", str(args.num_procs))
    command = ["bash", str(stage_script(stage, args.deployment)), "--trainer.progress_bar", "false", *extra]
    print(f"[pipeline] {stage}: {' '.join(command)}", flush=True)
    started = time.perf_counter()
    log_path = output_dir.parent / f"{stage}.log"
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in process.stdout:
            log.write(line)
            if " step " in line or "error" in line.lower() or "Traceback" in line:
                print(f"  [{stage}] {line.rstrip()[-200:]}", flush=True)
        code = process.wait()
    if code != 0:
        raise SystemExit(f"[pipeline] the {stage} stage failed (exit {code}); its log: {log_path}")
    return time.perf_counter() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:tiny", help="student: hub id or local folder (default: tiny CPU student)")
    parser.add_argument("--deployment", default="cpu", choices=DEPLOYMENTS)
    parser.add_argument("--output-dir", default="outputs/pipeline")
    parser.add_argument("--with-seqkd", action="store_true", help="also train the SeqKD baseline for comparison")
    parser.add_argument("--num-procs", type=int, default=2, help="ranks on the CPU deployment")
    parser.add_argument("--eval-prompts", type=int, default=16, help="held-out prompts for ROUGE-L (0 = all 105)")
    parser.add_argument("--eval-max-new-tokens", type=int, default=None)
    parser.add_argument("--eval-backend", default="auto", choices=("auto", "vllm", "hf"))
    args, extra = parser.parse_known_args(argv)
    if extra and extra[0] == "--":
        extra = extra[1:]
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)

    if args.model.startswith("builtin:"):
        from gadchat import runtime
        from gadchat.models import resolve_model_path

        runtime.set_process_defaults()
        student = resolve_model_path(args.model)
    else:
        student = args.model

    wall = {}
    stages = (["seqkd"] if args.with_seqkd else []) + ["warmup", "gad"]
    for stage in stages:
        init_from = out / "warmup" if stage == "gad" else None
        wall[stage] = run_stage(stage, args, out / stage, init_from, extra)

    max_new = args.eval_max_new_tokens or (48 if args.deployment == "cpu" else 1536)
    models = [f"student={student}"] + [f"{stage}={out / stage}" for stage in stages]
    evaluate = [sys.executable, "-m", "applications.evaluate", "--models", *models, "--eval-sets", "heldout",
                "--output-dir", str(out / "eval"), "--max-new-tokens", str(max_new), "--backend", args.eval_backend]
    if args.eval_prompts:
        evaluate += ["--max-prompts", str(args.eval_prompts)]
    print(f"[pipeline] evaluate: {' '.join(evaluate)}", flush=True)
    started = time.perf_counter()
    result = subprocess.run(evaluate, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"[pipeline] evaluation failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    wall["eval"] = time.perf_counter() - started
    heldout = json.loads((out / "eval" / "results.json").read_text())["results"]["heldout"]

    lines = ["| stage | steps | d_acc (last 5) | reward (last 5) | response tokens (last 5) | ROUGE-L held-out | wall s |",
             "|---|---|---|---|---|---|---|",
             f"| student (start) | - | - | - | - | {fmt(heldout['student']['rouge_l'], 2)} | - |"]
    for stage in stages:
        rows = [r for r in read_rows(out / stage) if r.get("step", 0) > 0]
        lines.append(
            f"| {stage} | {rows[-1]['step'] if rows else 0} | {fmt(last_mean(rows, 'critic/d_acc'))} | "
            f"{fmt(last_mean(rows, 'reward/mean'))} | {fmt(last_mean(rows, 'response_length/mean'), 1)} | "
            f"{fmt(heldout[stage]['rouge_l'], 2)} | {wall[stage]:.0f} |")
    table = "\n".join(lines)
    total = sum(wall.values())
    summary = (f"{table}\n\nROUGE-L: F1 x 100 against the teacher on {heldout['student']['prompts'] if 'prompts' in heldout['student'] else args.eval_prompts or 105} "
               f"held-out prompts, greedy, {max_new} new tokens. Total wall time {total:.0f} s "
               f"(evaluation {wall['eval']:.0f} s). Model: {args.model}; deployment: {args.deployment}.\n")
    (out / "pipeline_results.md").write_text(summary)
    print("\n" + summary)
    print(f"[pipeline] outputs in {out}: one folder per stage (final/actor, final/critic, checkpoints/, metrics.jsonl), "
          f"eval/, pipeline_results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
