"""The black-box search from SeqKD's best checkpoint (issue 17), seed 42: every variant tried, run
where it is missing (``--run``) and recorded as one RESULTS.md section.

Each variant is one arm of ``applications.known_teacher --protocol best`` with its own flags and a
``--variant`` name (its runs go to ``<output-dir>/seed42/<arm>_<name>``); the default arms come from
the main comparison's runs in the same output folder. A row: the held-out metrics the app stored
(``known_teacher_eval.json``), the mean over the run's steps of the training diagnostic
``diag/token_reward_pearson`` (the per-token reward against the teacher's per-token log-ratio),
and, for a ``gad_lr`` run, its exported discriminator ``q`` evaluated as a student itself (where the
reward ``log q - log pi_old`` leads the actor).

    python benchmarks/known_teacher_best_search.py --run      # train and evaluate what is missing, record
    python benchmarks/known_teacher_best_search.py            # record from the runs there
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GAD_LR = "--actor.lr 1e-3 --actor.grad_clip 1.0 --discriminator.grad_clip 1.0"
CE_Q = f"{GAD_LR} --discriminator.bradley_terry_coef 0 --discriminator.sft_coef 1 --discriminator.lr 1e-4"  # q by cross-entropy
MIX_Q = "--discriminator.bradley_terry_coef 0.1 --discriminator.sft_coef 1 --discriminator.lr 1e-4"  # + 0.1 x Bradley-Terry
# (run folder, arm, variant name, that arm's flags, what it tests); "" variant = the main comparison's run
VARIANTS = [
    ("seqkd_best", "seqkd_best", "", "", "SeqKD's best checkpoint (the start of every row)"),
    ("seqkd_more", "seqkd_more", "", "", "60 more SFT steps"),
    ("seqkd_more_lr3e4", "seqkd_more", "lr3e4", "--actor.lr 3e-4", "60 more SFT steps at lr 3e-4 (the control for the "
     "black-box rows at a lower actor lr)"),
    ("seqkd_more_lr1e4", "seqkd_more", "lr1e4", "--actor.lr 1e-4", "60 more SFT steps at lr 1e-4"),
    ("gad", "gad", "", "--actor.lr 2e-5", "published GAD, fresh discriminator, 10 steps alone first"),
    ("gad_lr", "gad_lr", "", f"{GAD_LR} --discriminator.lr 1e-3", "gad_lr: Bradley-Terry q, baseline pi_old, q lr 1e-3"),
    ("gad_lr_sftq", "gad_lr", "sftq", CE_Q, "gad_lr: q by cross-entropy only (no contrast), q lr 1e-4"),
    ("gad_lr_kl", "gad_lr", "kl", f"{GAD_LR} --discriminator.lr 1e-3 --actor.kl_coef 0.1",
     "gad_lr: Bradley-Terry q + k3 KL 0.1 to SeqKD's best"),
    ("gad_lr_slowbt4", "gad_lr", "slowbt4", f"{GAD_LR} --discriminator.lr 1e-4 --discriminator.updates_per_step 4",
     "gad_lr: slow Bradley-Terry q (lr 1e-4), 4 q steps per actor step"),
    ("gad_lr_sftq4", "gad_lr", "sftq4", f"{CE_Q} --discriminator.updates_per_step 4",
     "gad_lr: q by cross-entropy only, 4 q steps per actor step"),
    ("gad_lr_mix", "gad_lr", "mix", f"{GAD_LR} {MIX_Q}", "gad_lr: q by cross-entropy + 0.1 x Bradley-Terry, q lr 1e-4"),
    ("gad_lr_mixptx", "gad_lr", "mixptx", f"{GAD_LR} {MIX_Q} --actor.sft_coef 0.1", "gad_lr: the cross-entropy + 0.1 x "
     "Bradley-Terry q, and 0.1 x SFT on the teacher answers in the actor's update (PPO-ptx)"),
    ("gad_lr_mix4", "gad_lr", "mix4", f"{GAD_LR} {MIX_Q} --discriminator.updates_per_step 4",
     "gad_lr: the cross-entropy + 0.1 x Bradley-Terry q, 4 q steps per actor step"),
    ("gad_lr_mixslow", "gad_lr", "mixslow", f"{GAD_LR.replace('1e-3', '3e-4', 1)} {MIX_Q}",
     "gad_lr: the cross-entropy + 0.1 x Bradley-Terry q, actor lr 3e-4"),
    ("gad_lr_mixkl", "gad_lr", "mixkl", f"{GAD_LR} {MIX_Q} --actor.kl_coef 0.1",
     "gad_lr: the cross-entropy + 0.1 x Bradley-Terry q, k3 KL 0.1 to SeqKD's best"),
    ("gad_lr_seq", "gad_lr", "seq", f"{GAD_LR} --discriminator.lr 1e-3 --actor.reward_form sequence",
     "gad_lr: Bradley-Terry q, the sequence reward GRPO-normalised (GAD's form)"),
    ("gad_lr_ref", "gad_lr", "ref", f"{GAD_LR} --discriminator.lr 1e-3 --discriminator.baseline reference",
     "gad_lr: Bradley-Terry q against the frozen reference (SeqKD's best) as baseline"),
    ("gad_lr_mean", "gad_lr", "mean", f"{GAD_LR} --discriminator.lr 1e-3 --discriminator.length_normalised true",
     "gad_lr: Bradley-Terry q on the length-normalised D (token-mean log-ratio), q lr 1e-3"),
    ("gad_lr_replay4", "gad_lr", "replay4", f"{GAD_LR} --discriminator.lr 1e-3 --discriminator.replay_steps 4",
     "gad_lr: Bradley-Terry q over this step's and the last 4 steps' pairs, q lr 1e-3"),
    ("gad_lr_mixreplay4", "gad_lr", "mixreplay4", f"{GAD_LR} {MIX_Q} --discriminator.replay_steps 4",
     "gad_lr: the cross-entropy + 0.1 x Bradley-Terry q, its Bradley-Terry over the last 4 steps' pairs too"),
    ("gad_lr_mixmean", "gad_lr", "mixmean", f"{GAD_LR} {MIX_Q} --discriminator.length_normalised true",
     "gad_lr: the cross-entropy + 0.1 x Bradley-Terry q on the length-normalised D"),
    ("seqkd_more_ema95", "seqkd_more", "ema95", "--actor.ema_decay 0.95",
     "60 more SFT steps, with an EMA of the weights (decay 0.95)"),
    ("gad_lr_mixema95", "gad_lr", "mixema95", f"{GAD_LR} {MIX_Q} --actor.ema_decay 0.95",
     "gad_lr: the cross-entropy + 0.1 x Bradley-Terry q, with an EMA of the actor's weights (decay 0.95)"),
    ("opd_selfema", "opd", "selfema", "--actor.lr 1e-3 --model.teacher_path {seed_dir}/seqkd_ema/run/final/actor_ema",
     "opd toward the seqkd_ema arm's weight average instead of the teacher (black-box: q = averaged SFT)"),
    ("spin", "spin", "", "--actor.lr 1e-4 --actor.grad_clip 1.0", "spin: beta 0.1, lr 1e-4"),
    ("spin_lr1e3", "spin", "lr1e3", "--actor.lr 1e-3 --actor.grad_clip 1.0", "spin: beta 0.1, lr 1e-3"),
    ("spin_refresh20", "spin", "refresh20", "--actor.lr 1e-4 --actor.grad_clip 1.0 --actor.reference_refresh_every 20",
     "spin: beta 0.1, lr 1e-4, reference refreshed every 20 steps (SPIN's iterations)"),
    ("opd", "opd", "", "--actor.lr 1e-3", "opd (white-box bound)"),
]
FLAG_ARGUMENT = {"seqkd_more": "--seqkd-flags", "gad_lr": "--gad-lr-flags", "spin": "--spin-flags", "gad": "--gad-flags", "opd": "--opd-flags"}
KEYS = ["reverse_kl", "teacher_nll", "forward_nll", "length_ratio"]
SEED = 42  # the search's seed


def run_variant(arm: str, variant: str, flags: str, output_dir: Path) -> None:
    command = [sys.executable, "-m", "applications.known_teacher", "--protocol", "best", "--seeds", str(SEED),
               "--output-dir", str(output_dir), "--arms", arm, "--variant", variant, FLAG_ARGUMENT[arm], flags]
    print("[search]", " ".join(command[2:]), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)


def pearson_and_work(run: Path) -> tuple:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()] \
        if (run / "metrics.jsonl").exists() else []
    values = [r["diag/token_reward_pearson"] for r in rows if isinstance(r.get("diag/token_reward_pearson"), float)]
    return (sum(values) / len(values) if values else None), len([r for r in rows if r.get("step", 0) > 0])


def evaluate_exports(runs: dict, export: str, out: Path, evaluate: bool) -> dict:
    """``{folder: metrics}`` of another export of each run than its actor, evaluated as a student
    itself by the benchmark's own cached evaluation (``applications.known_teacher.evaluate_cached``:
    seed 42's settings, stored beside the run as ``known_teacher_eval_<export>.json``):
    ``discriminator``, a gad_lr run's ``q`` (a causal LM; the actor's reward ``log q - log pi_old`` is
    the advantage of a reverse KL to ``q``, so ``q`` shows where the reward leads), or ``actor_ema``,
    the average of the actor's weights. Without ``evaluate`` only the stored results are read."""
    from types import SimpleNamespace

    from applications.known_teacher import evaluate_cached, evaluation_cache

    models = {folder: str(run / "final" / export) for folder, run in runs.items()
              if (run / "final" / export / "config.json").exists()}
    if not evaluate:
        models = {folder: path for folder, path in models.items()
                  if evaluation_cache(path, out, folder, SEED).exists()}
    if not models:
        return {}
    from transformers import AutoTokenizer

    from applications.known_teacher import prepare
    from applications.known_teacher_eval import held_out

    paths = prepare("auto")
    heldout = held_out(Path(paths["test"]), AutoTokenizer.from_pretrained(paths["student"]))
    settings = SimpleNamespace(eval_samples=2, backend="auto")  # the app's defaults, as the arms are evaluated
    return evaluate_cached(models, paths, heldout, settings, SEED, out)


def three_seed_notes(out: Path) -> list:
    """A line per variant run on seeds 42-44 too (``--seeds 43 44 --arms ARM --variant NAME``): its
    mean and sample spread over the three seeds beside SeqKD's best checkpoint's."""
    import statistics

    def evaluation(seed, folder):
        path = out / f"seed{seed}" / folder / ("known_teacher_eval.json" if folder == "seqkd_best" else "run/known_teacher_eval.json")
        return json.loads(path.read_text())["metrics"] if path.exists() else None

    notes = []
    for folder, _, variant, _, about in VARIANTS:
        if not variant or folder == "seqkd_best":
            continue
        runs = [evaluation(seed, folder) for seed in (42, 43, 44)]
        base = [evaluation(seed, "seqkd_best") for seed in (42, 43, 44)]
        if any(r is None for r in runs + base):
            continue
        cells = []
        for key in ("reverse_kl", "teacher_nll", "forward_nll"):
            mine, theirs = [r[key] for r in runs], [b[key] for b in base]
            cells.append(f"{key} {statistics.mean(mine):.3f} +- {statistics.stdev(mine):.3f} (SeqKD's best "
                         f"{statistics.mean(theirs):.3f} +- {statistics.stdev(theirs):.3f}; per seed "
                         f"{', '.join(f'{m:.3f}' for m in mine)})")
        notes.append(f"{about}, seeds 42-44: " + "; ".join(cells))
    return notes


def main(argv=None) -> int:
    from benchmarks import common

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="outputs/kt_best")
    parser.add_argument("--run", action="store_true", help="train and evaluate the variants that are missing")
    parser.add_argument("--no-save", dest="save", action="store_false")
    args = parser.parse_args(argv)
    out = (ROOT / args.output_dir).resolve()
    seed_dir = out / f"seed{SEED}"
    rows, missing = [], []
    if args.run:  # train what is missing first: the evaluations of other exports below need the runs
        for folder, arm, variant, flags, _ in VARIANTS:
            if variant and not (seed_dir / folder / "run" / "known_teacher_eval.json").exists():
                run_variant(arm, variant, flags.format(seed_dir=seed_dir), out)
    runs = {folder: seed_dir / folder / "run" for folder, _, variant, _, _ in VARIANTS if folder != "seqkd_best"}
    q_metrics = evaluate_exports({f: r for f, r in runs.items() if f.startswith("gad_lr")}, "discriminator", out,
                                 args.run)
    ema_metrics = evaluate_exports(runs, "actor_ema", out, args.run)
    for folder, arm, variant, flags, about in VARIANTS:
        run = seed_dir / folder if folder == "seqkd_best" else seed_dir / folder / "run"
        evaluation = run / "known_teacher_eval.json"
        if not evaluation.exists():
            missing.append(folder)
            continue
        metrics = json.loads(evaluation.read_text())["metrics"]
        pearson, steps = pearson_and_work(run) if folder != "seqkd_best" else (None, 0)
        rows.append([about, *[f"{metrics[k]:.3f}" if k != "length_ratio" else f"{metrics[k]:.2f}" for k in KEYS],
                     "-" if pearson is None else f"{pearson:+.3f}",
                     f"{q_metrics[folder]['reverse_kl']:.3f}" if folder in q_metrics else "-",
                     f"{ema_metrics[folder]['reverse_kl']:.3f}" if folder in ema_metrics else "-", flags or "-"])
        print(rows[-1], flush=True)
    if missing:
        print("not evaluated (run with --run):", ", ".join(missing))
    seed_notes = three_seed_notes(out)
    result = {"title": "Known-teacher quality: the black-box search from SeqKD's best checkpoint (seed 42)",
              "description": "Every variant tried, each continuing 60 actor steps from SeqKD's best checkpoint "
                             "(seed 42; 103 held-out prompts; `benchmarks/known_teacher_best_search.py`). Lower is "
                             "better for the first three columns; the per-token Pearson is the training diagnostic "
                             "(mean over the run's steps), the goal asks for >= +0.5.",
              "table": {"columns": ["arm / variant", "reverse KL / token", "teacher NLL", "forward NLL",
                                    "length / teacher's", "per-token Pearson (training)",
                                    "q itself: reverse KL / token", "the actor's EMA: reverse KL / token",
                                    "the arm's flags"],
                        "rows": rows},
              "notes": ["The 3-seed run of the default arms is the section 'the main comparison from SeqKD's best "
                        "checkpoint'.",
                        "'q itself': a gad_lr run's exported discriminator q (a causal LM) sampled and scored as a "
                        "student, the same evaluation as the arms; the actor's reward log q - log pi_old trains it "
                        "toward q (a reverse KL to q), so q bounds where the reward leads. 'The actor's EMA': the "
                        "run's final/actor_ema (--actor.ema_decay) evaluated the same way.", *seed_notes, *([f"not evaluated: {', '.join(missing)}"] if missing else [])]}
    if args.save:
        common.save_result("q_known_teacher_best_search", result,
                           common.command_line("benchmarks/known_teacher_best_search.py", argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
