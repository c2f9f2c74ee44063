"""One command for the whole method: GAD warm-up, then the GAD stage (and the SeqKD baseline beside
them when asked), each through the ``deepspeed`` launcher scripts of its step folder, then a
held-out evaluation and one table per stage.

CPU default (no flags): a tiny student built on the spot, the shipped GPT-4o teacher data, two
ZeRO-3 ranks, a few minutes on 2 cores. For a real run pick a model and a deployment::

    python -m applications.run_pipeline --model Qwen/Qwen2.5-7B-Instruct --deployment single_node \
        --output-dir outputs/qwen7b --with-seqkd -- --data.train_files my_teacher_data.jsonl

Flags after ``--`` go to every stage (``--section.field VALUE``, see any step's ``--help``).

Evaluation set: ``--eval-files`` with ``--eval-prompt-key`` / ``--eval-response-key`` (default: the
training keys given after ``--``); with ``--data.eval_split F`` after ``--`` and no
``--eval-files``, the held-out part of the training files (training never sees it); otherwise the
shipped GPT-4o held-out split with its published keys. The pipeline says which one it uses.
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
DEPLOYMENTS = ("cpu", "single_gpu", "single_node", "multi_node")
METHOD = "gad"  # the last stage of the method; the stages it starts from run first (their init_from_stage)
BASELINE = "seqkd"  # --with-seqkd


def stage_script(stage: str, deployment: str) -> Path:
    name = "run_tiny.sh" if deployment == "cpu" else "run_qwen2.5_7b.sh"
    from gadchat.stages import step_main

    return step_main(stage).parent / "training_scripts" / deployment / name


def last_mean(rows: list, key: str, count: int = 5):
    values = [r[key] for r in rows if r.get(key) is not None][-count:]
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


def eval_plan(args, extra: list) -> tuple:
    """``(evaluate flags, stage flags, description)`` of the evaluation set (see the module docstring)."""
    from gadchat.config import DataConfig
    from gadchat.stages.configure import load_config

    data = load_config(extra).data  # the stages' data section, as their flags set it
    published = DataConfig()
    if args.eval_files:
        prompt_key = args.eval_prompt_key or data.prompt_key
        response_key = args.eval_response_key or data.response_key
        flags = ["--eval-sets", f"heldout={args.eval_files}", "--prompt-key", prompt_key, "--response-key", response_key]
        stage_flags = ["--data.eval_files", args.eval_files, "--data.eval_prompt_key", prompt_key,
                       "--data.eval_response_key", response_key]
        return flags, stage_flags, f"{args.eval_files} (keys {prompt_key} / {response_key})"
    if data.eval_split > 0:
        flags = ["--eval-sets", f"heldout={data.train_files}", "--prompt-key", data.prompt_key,
                 "--response-key", data.response_key, "--eval-split", str(data.eval_split)]
        return flags, [], (f"the held-out {data.eval_split:g} of {data.train_files} (--data.eval_split; keys "
                           f"{data.prompt_key} / {data.response_key})")
    if args.eval_prompt_key or args.eval_response_key:
        raise SystemExit("[pipeline] --eval-prompt-key / --eval-response-key need --eval-files")
    return (["--eval-sets", "heldout"], [],
            f"the shipped GPT-4o held-out split {published.eval_files} (published keys; choose yours with --eval-files)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="builtin:tiny", help="student: hub id or local folder (builtin:tiny = CPU toy)")
    parser.add_argument("--deployment", default="cpu", choices=DEPLOYMENTS, help="launcher scripts to use")
    parser.add_argument("--output-dir", default="outputs/pipeline", help="one folder per stage, eval/, the table")
    parser.add_argument("--with-seqkd", action="store_true", help="also train the SeqKD baseline for comparison")
    parser.add_argument("--num-procs", type=int, default=2, help="ranks on the CPU deployment")
    parser.add_argument("--eval-prompts", type=int, default=16, help="held-out prompts for ROUGE-L (0 = all)")
    parser.add_argument("--eval-max-new-tokens", type=int, default=None, help="default: 48 on cpu, else 1536")
    parser.add_argument("--eval-backend", default="auto", choices=("auto", "vllm", "hf"), help="generation backend")
    parser.add_argument("--eval-files", default="", help="evaluation file (teacher data); empty: see the description")
    parser.add_argument("--eval-prompt-key", default="", help="prompt field of --eval-files (empty = the training key)")
    parser.add_argument("--eval-response-key", default="",
                        help="teacher-response field of --eval-files (empty = the training key)")
    return parser


def student_model(model: str) -> str:
    """The student's model folder (a ``builtin:`` name is built here once) or hub id."""
    if not model.startswith("builtin:"):
        return model
    from gadchat import runtime
    from gadchat.models import resolve_model_path

    runtime.set_process_defaults()
    return resolve_model_path(model)


def train_stages(args, out: Path, extra: list) -> tuple:
    """Run the method's stages in hand-off order (the baseline first with ``--with-seqkd``), each
    from its recipe's ``init_from_stage``; returns ``(stages, {stage: wall seconds})``."""
    from gadchat.stages import handoff_chain, recipe

    wall = {}
    stages = ([BASELINE] if args.with_seqkd else []) + handoff_chain(METHOD)
    for stage in stages:
        source = recipe(stage).init_from_stage
        wall[stage] = run_stage(stage, args, out / stage, out / source if source else None, extra)
    return stages, wall


def evaluate_models(args, models: list, eval_flags: list, eval_dir: Path, max_new: int) -> dict:
    """``applications.evaluate`` of ``LABEL=PATH`` models on the held-out set: its ``heldout`` results."""
    evaluate = [sys.executable, "-m", "applications.evaluate", "--models", *models, *eval_flags,
                "--output-dir", str(eval_dir), "--max-new-tokens", str(max_new), "--backend", args.eval_backend]
    if args.eval_prompts:
        evaluate += ["--max-prompts", str(args.eval_prompts)]
    print(f"[pipeline] evaluate: {' '.join(evaluate)}", flush=True)
    result = subprocess.run(evaluate, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"[pipeline] evaluation failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return json.loads((eval_dir / "results.json").read_text())["results"]["heldout"]


def results_table(stages: list, out: Path, heldout: dict, wall: dict) -> str:
    """One markdown row per stage: last-5 means of its training metrics, held-out ROUGE-L, wall time."""
    lines = ["| stage | steps | d_acc (last 5) | reward (last 5) | response tokens (last 5) | ROUGE-L held-out | wall s |",
             "|---|---|---|---|---|---|---|",
             f"| student (start) | - | - | - | - | {fmt(heldout['student']['rouge_l'], 2)} | - |"]
    for stage in stages:
        rows = [r for r in read_rows(out / stage) if r.get("step", 0) > 0]
        lines.append(
            f"| {stage} | {rows[-1]['step'] if rows else 0} | {fmt(last_mean(rows, 'discriminator/d_acc'))} | "
            f"{fmt(last_mean(rows, 'reward/mean'))} | {fmt(last_mean(rows, 'response_length/mean'), 1)} | "
            f"{fmt(heldout[stage]['rouge_l'], 2)} | {wall[stage]:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    if extra and extra[0] == "--":
        extra = extra[1:]
    if args.eval_prompts < 0 or args.num_procs < 1:
        raise SystemExit("[pipeline] --eval-prompts must be >= 0 and --num-procs >= 1")
    try:
        eval_flags, eval_stage_flags, eval_description = eval_plan(args, extra)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"[pipeline] evaluation set: {eval_description}", flush=True)
    extra = [*extra, *eval_stage_flags]
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    student = student_model(args.model)

    stages, wall = train_stages(args, out, extra)
    max_new = args.eval_max_new_tokens or (48 if args.deployment == "cpu" else 1536)
    started = time.perf_counter()
    heldout = evaluate_models(args, [f"student={student}"] + [f"{stage}={out / stage}" for stage in stages],
                              eval_flags, out / "eval", max_new)
    wall["eval"] = time.perf_counter() - started

    table = results_table(stages, out, heldout, wall)
    total = sum(wall.values())
    summary = (f"{table}\n\nROUGE-L: F1 x 100 against the teacher on {heldout['student']['prompts']} prompts of "
               f"{eval_description}, greedy, {max_new} new tokens. Total wall time {total:.0f} s "
               f"(evaluation {wall['eval']:.0f} s). Model: {args.model}; deployment: {args.deployment}.\n")
    (out / "pipeline_results.md").write_text(summary)
    print("\n" + summary)
    print(f"[pipeline] outputs in {out}: one folder per stage (final/actor, final/discriminator, checkpoints/, metrics.jsonl), "
          f"eval/, pipeline_results.md")
    return 0

if __name__ == "__main__":
    sys.exit(main())
