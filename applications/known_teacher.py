"""The known-teacher quality benchmark: does GAD bring a student closer to its teacher than SeqKD?

The teacher is a model we hold (``builtin:kt-teacher``, :mod:`gadchat.known_teacher_models`), so the
evaluation reads its exact likelihoods, while training stays black-box: the stages see only the
teacher's sampled text, in the published data layout, through the ordinary data path and the real
launcher scripts (DeepSpeed ZeRO-3, vLLM rollouts). Arms, at equal teacher data and equal actor
optimizer steps (``seqkd`` steps = warm-up actor steps + GAD steps):

- ``start``: the untrained student;
- ``seqkd``: SFT on the teacher's answers;
- ``warmup``: GAD warm-up (discriminator only for ``discriminator_warmup`` steps, then SFT + discriminator);
- ``gad``: the warm-up followed by the GAD stage;
- ``gad_frozen``: the same with the discriminator frozen (the reward-hacking ablation);
- ``opd``: white-box on-policy distillation from the start (the ``opd`` stage: the student's samples
  scored token by token by the teacher model itself), the upper bound of what the teacher's
  likelihoods buy; reported with the share of its gain over the start that GAD recovers.

Each arm is evaluated on the held-out prompts (:func:`applications.known_teacher_eval.evaluate_against_teacher`);
the GAD stages log the reward diagnostics (``--model.teacher_path``). Output: per-seed
results, ``results.json``, ``results.md`` (mean and spread over seeds) and PNG plots.

    python -m applications.known_teacher --seeds 42 43 44 --output-dir outputs/known_teacher
    python -m applications.known_teacher --seeds 42 --arms seqkd,warmup,gad   # the CPU demo

Flags after ``--`` go to every stage; ``--gad-flags`` only to the GAD stages.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "configs" / "known_teacher.yaml"
ARMS = ("start", "seqkd", "warmup", "gad", "gad_frozen", "opd", "gad_lr", "spin")
# The main comparison (--protocol best): every arm continues from SeqKD's best checkpoint (chosen per seed
# by the forward NLL of a validation part of the training data, never the test prompts) for the same
# number of actor steps; seqkd_more is more SFT from there, opd the white-box bound from there.
BEST_ARMS = ("seqkd_best", "seqkd_more", "gad", "gad_lr", "spin", "opd", "seqkd_more_lora", "opd_lora", "seqkd_ema")
# seqkd_ema: SFT from the start for --curve-steps steps with an exponential moving average of the weights
# (--actor.ema_decay, DeepSpeed-Chat's --enable_ema), the average evaluated: black-box, a stronger SFT
# baseline than the best checkpoint (measured 2026-12-07, docs/known_teacher.md).
SEQKD_EMA_DECAY = 0.99
EVALUATED_EXPORT = {"seqkd_ema": "actor_ema"}  # arms whose model is another export of their run than final/actor
VALIDATION_SPLIT = 0.1  # --protocol best: the share of the training prompts held out to pick SeqKD's best step
# The search on this set-up (benchmarks/RESULTS.md): the recipe's actor lr (1e-3, tuned for SFT of the
# tiny student) makes the policy outrun the discriminator in the GAD stage and collapse; 2e-5 was stable.
DEFAULT_GAD_FLAGS = "--actor.lr 2e-5"
DEFAULT_OPD_FLAGS = "--actor.lr 1e-3"  # the recipe's SFT lr; 1e-4 left OPD level with SeqKD (RESULTS.md)
DEFAULT_GAD_LR_FLAGS = "--actor.lr 1e-3 --discriminator.lr 1e-3 --actor.grad_clip 1.0 --discriminator.grad_clip 1.0"
# SPIN's learning rate: from SeqKD's best checkpoint 1e-4 (1e-3 was worse there, RESULTS.md); from the
# untrained start the SFT arm's 1e-3, so both learn at the same rate over the same actor steps.
DEFAULT_SPIN_FLAGS = {"best": "--actor.lr 1e-4 --actor.grad_clip 1.0", "start": "--actor.lr 1e-3 --actor.grad_clip 1.0"}
# The LoRA arms (issue 19): the same stages with a rank-16 adapter on the seven projections, at ten times
# the full fine-tuning learning rate (a common rule for LoRA; not tuned here).
LORA_FLAGS = "--actor.lora_rank 16 --actor.lr 1e-2"
TEACHER_MAX_NEW_TOKENS = 128  # the teacher data's cap; the recipe's rollouts use the same
METRICS = [  # (key, label, lower is better)
    ("reverse_kl", "reverse KL / token", True),
    ("teacher_nll", "teacher NLL / token (samples)", True),
    ("greedy_teacher_nll", "teacher NLL / token (greedy)", True),
    ("forward_nll", "forward NLL / token", True),
    ("length_ratio", "length / teacher's", None),
    ("eos_share", "ends in EOS", None),
    ("distinct_2", "distinct-2", None),
    ("rouge_l", "ROUGE-L (greedy)", False),
    ("actor_updates", "actor updates", None),
    ("model_updates", "model updates (actor + discriminator)", None),
]
CURVES = ["reward/mean", "discriminator/d_acc", "response_length/mean", "diag/token_reward_pearson",
          "diag/reward_vs_log_ratio", "diag/reward_vs_length", "diag/teacher_nll", "diag/reverse_kl"]


def log(text: str) -> None:
    print(text, flush=True)


def prepare(backend: str) -> dict:
    """Teacher, student and teacher data, each built once into the cache."""
    from gadchat import runtime
    from applications.known_teacher_eval import SHIPPED, read_rows, sample_teacher_data
    from gadchat.known_teacher_models import SHIPPED_MARKER
    from gadchat.models import cache_dir, resolve_model_path
    from gadchat.resources import SHIPPED_KNOWN_TEACHER, resource

    runtime.set_process_defaults()
    started = time.perf_counter()
    paths = {"teacher": resolve_model_path("builtin:kt-teacher"), "student": resolve_model_path("builtin:kt-student")}
    data = cache_dir() / "known-teacher-data"
    shipped = resource(SHIPPED_KNOWN_TEACHER) / "data"
    from_shipped_teacher = (Path(paths["teacher"]) / SHIPPED_MARKER).exists()
    for split in ("train", "test"):
        target = data / f"{split}.jsonl"
        if not target.exists() and from_shipped_teacher and (shipped / f"{split}.jsonl").is_file():
            # sampled from the shipped teacher with the settings below: the same file, minutes sooner
            data.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + f".tmp{os.getpid()}")
            tmp.write_bytes((shipped / f"{split}.jsonl").read_bytes())
            os.replace(tmp, target)
            log(f"[known-teacher] teacher data {split}: the shipped sample of the shipped teacher -> {target}")
        if not target.exists():
            counts = sample_teacher_data(paths["teacher"], read_rows(SHIPPED / f"{split}.jsonl"), target,
                                         TEACHER_MAX_NEW_TOKENS, seed=0 if split == "train" else 1, backend=backend)
            log(f"[known-teacher] teacher data {split}: {counts['kept']} of {counts['prompts']} prompts kept "
                f"({counts['cut']} answers hit the {TEACHER_MAX_NEW_TOKENS}-token cap and were dropped) -> {target}")
        paths[split] = str(target)
    log(f"[known-teacher] teacher, student and teacher data ready ({time.perf_counter() - started:.0f} s)")
    return paths


def stage_plan(arm: str, args) -> list:
    """``(stage, run folder name, init_from run name or None, extra flags)`` for one arm."""
    if args.protocol == "best":
        return best_stage_plan(arm, args)
    warm_actor_steps = args.warmup_steps - args.discriminator_warmup
    warmup = ("warmup", "warmup", None, ["--trainer.max_steps", args.warmup_steps,
                                         "--trainer.discriminator_warmup", args.discriminator_warmup])
    gad_flags = ["--trainer.max_steps", args.gad_steps, *shlex.split(args.gad_flags)]
    suffix = f"_{args.variant}" if args.variant else ""
    if arm == "seqkd":
        return [("seqkd", "seqkd", None, ["--trainer.max_steps", warm_actor_steps + args.gad_steps])]
    if arm == "warmup":
        return [warmup]
    if arm == "gad":
        return [warmup, ("gad", "gad" + suffix, "warmup", gad_flags)]
    if arm == "gad_frozen":
        return [warmup, ("gad", "gad_frozen" + suffix, "warmup", gad_flags + ["--discriminator.freeze", "true"])]
    if arm == "opd":  # the same actor steps as SeqKD, from the start
        return [("opd", "opd" + suffix, None, ["--trainer.max_steps", warm_actor_steps + args.gad_steps,
                                               *shlex.split(args.opd_flags)])]
    if arm in ("gad_lr", "spin"):  # the same actor steps as SeqKD, from the start
        return [(arm, arm + suffix, None, ["--trainer.max_steps", warm_actor_steps + args.gad_steps,
                                           *shlex.split(arm_flags(arm, args))])]
    raise ValueError(arm)


def arm_flags(arm: str, args) -> str:
    return {"gad": args.gad_flags, "opd": args.opd_flags, "gad_lr": args.gad_lr_flags, "spin": args.spin_flags,
            "seqkd_more": args.seqkd_flags, "seqkd_ema": args.seqkd_flags}.get(arm, "")


def best_stage_plan(arm: str, args) -> list:
    """The main comparison's plans: each arm continues ``--continue-steps`` actor steps from the run
    ``seqkd_best`` (:func:`best_seqkd`). Published GAD gets ``--discriminator-warmup`` more steps in
    which only its fresh discriminator trains (the paper starts GAD from a warm-up that trained it)."""
    suffix = f"_{args.variant}" if args.variant else ""
    steps = args.continue_steps
    if arm == "seqkd_best":
        return []
    if arm == "seqkd_more":
        return [("seqkd", "seqkd_more" + suffix, "seqkd_best", ["--trainer.max_steps", steps,
                                                                *shlex.split(arm_flags(arm, args))])]
    if arm == "gad":
        return [("gad", "gad" + suffix, "seqkd_best", ["--trainer.max_steps", steps + args.discriminator_warmup,
                                                       "--trainer.discriminator_warmup", args.discriminator_warmup,
                                                       *shlex.split(args.gad_flags)])]
    if arm in ("gad_lr", "spin", "opd"):
        return [(arm, arm + suffix, "seqkd_best", ["--trainer.max_steps", steps, *shlex.split(arm_flags(arm, args))])]
    if arm == "seqkd_ema":  # from the start, as long as the SFT curve, its weight average evaluated
        return [("seqkd", "seqkd_ema" + suffix, None, ["--trainer.max_steps", args.curve_steps,
                                                      "--actor.ema_decay", SEQKD_EMA_DECAY,
                                                      *shlex.split(arm_flags(arm, args))])]
    if arm == "seqkd_more_lora":
        return [("seqkd", "seqkd_more_lora", "seqkd_best", ["--trainer.max_steps", steps, *shlex.split(LORA_FLAGS)])]
    if arm == "opd_lora":
        return [("opd", "opd_lora" + suffix, "seqkd_best", ["--trainer.max_steps", steps, *shlex.split(arm_flags("opd", args)),
                                                            *shlex.split(LORA_FLAGS)])]
    raise ValueError(f"--protocol best has no arm {arm!r} (arms: {', '.join(BEST_ARMS)})")


def best_seqkd(root: Path, paths: dict, args, common: list, extra: list) -> tuple:
    """SeqKD's learning curve and its best checkpoint, for ``--protocol best``: a SeqKD run of
    ``--curve-steps`` steps that saves and logs the validation forward NLL every ``--curve-every``
    steps, and the checkpoint where that NLL is lowest exported as ``root/seqkd_best`` (a folder a
    next stage's ``--trainer.init_from`` takes). Returns the curve's run folder, ``seqkd_best`` and
    its wall time; both are reused when already there."""
    from applications.run_pipeline import run_stage
    from gadchat.checkpoint_files import best_checkpoint

    curve, best = root / "seqkd_curve" / "run", root / "seqkd_best"
    launcher = SimpleNamespace(model=paths["student"], deployment="cpu", num_procs=args.num_procs)
    wall = 0.0
    if not (curve / "final" / "COMPLETE").exists():
        flags = ["--trainer.max_steps", args.curve_steps, "--trainer.eval_every", args.curve_every,
                 "--trainer.save_every", args.curve_every, "--trainer.keep_last", 10_000,
                 "--trainer.eval_prompts", 10_000, "--trainer.overwrite", "true"]
        wall = run_stage("seqkd", launcher, curve, None, [str(v) for v in common + flags + extra])
    step_dir, step, value = best_checkpoint(curve, "eval/forward_nll")
    marker = best / "best_step.json"
    if not (marker.exists() and json.loads(marker.read_text()).get("step") == step):
        import subprocess

        subprocess.run([sys.executable, "-m", "inference.export", "--checkpoint", str(curve), "--best-by",
                        "eval/forward_nll", "--out", str(best), "--as-init-from", "--which", "actor"],
                       cwd=REPO, check=True, capture_output=True, text=True)
        marker.write_text(json.dumps({"step": step, "eval/forward_nll": value, "checkpoint": str(step_dir)}))
    log(f"[known-teacher] SeqKD's best checkpoint: step {step} (validation forward NLL {value:.4f}) -> {best}")
    return curve, best, wall


def train_seed(seed: int, arms: list, paths: dict, args, extra: list) -> dict:
    """Run the arms' stages for one seed (a shared warm-up runs once); returns run folders by name."""
    from applications.run_pipeline import run_stage
    from gadchat.stages import recipe

    root = Path(args.output_dir).resolve() / f"seed{seed}"
    runs, wall = {}, {}
    launcher = SimpleNamespace(model=paths["student"], deployment="cpu", num_procs=args.num_procs)
    base = ["--config", RECIPE, "--data.train_files", paths["train"], "--data.eval_files", paths["test"],
            "--trainer.seed", seed, "--trainer.tensorboard", "true"]
    if args.protocol == "best":  # a validation part of the training prompts, never trained on by any arm
        base += ["--data.eval_split", VALIDATION_SPLIT]
        runs["seqkd_curve"], runs["seqkd_best"], wall["seqkd_curve"] = best_seqkd(root, paths, args, base, extra)
    for arm in arms:
        for stage, name, init_name, flags in stage_plan(arm, args):
            if name in runs:
                continue
            output = root / name / "run"
            common = list(base)
            reads = recipe(stage).teacher_model  # "required": opd trains on the teacher; "optional": diag/
            if reads == "required" or (reads == "optional" and not args.no_diagnostics):
                common += ["--model.teacher_path", paths["teacher"]]
            init = runs[init_name] if init_name else None
            if (output / "final" / "COMPLETE").exists():  # finished earlier (a rerun adds arms or records)
                wall[name] = 0.0
            else:
                wall[name] = run_stage(stage, launcher, output, init, [str(v) for v in common + flags + extra])
            runs[name] = output
    return {"runs": runs, "wall": wall}


def evaluated_model(run: Path, arm: str) -> str:
    """The model an arm is judged by: its last stage's run (its ``final/actor``), or the export
    :data:`EVALUATED_EXPORT` names (``final/actor_ema`` for ``seqkd_ema``)."""
    return str(Path(run) / "final" / EVALUATED_EXPORT[arm]) if arm in EVALUATED_EXPORT else str(run)


def evaluation_cache(path: str, out: Path, name: str, seed: int) -> Path:
    """Where :func:`evaluate_cached` keeps a model's result: in its run folder (beside the run for an
    export inside its ``final/``), or in ``out`` for models that are not runs of this benchmark."""
    path = Path(path).resolve()
    if not path.is_relative_to(out):
        return out / f"eval_{name}_seed{seed}.json"
    if path.parent.name == "final":
        return path.parent.parent / f"known_teacher_eval_{path.name}.json"
    return path / "known_teacher_eval.json"


def evaluate_cached(models: dict, paths: dict, heldout, args, seed: int, out: Path) -> dict:
    """:func:`evaluate_against_teacher` per model, reusing a stored result made with the same
    settings (kept in the run folder, or in ``out`` for models that are not runs of this benchmark)."""
    from applications.known_teacher_eval import evaluate_against_teacher

    settings = {"teacher": paths["teacher"], "prompts": len(heldout.messages), "samples": args.eval_samples,
                "max_new_tokens": TEACHER_MAX_NEW_TOKENS, "seed": seed, "backend": args.backend}
    results, caches, missing = {}, {}, {}
    for name, path in models.items():
        caches[name] = evaluation_cache(path, out, name, seed)
        if caches[name].exists():
            stored = json.loads(caches[name].read_text())
            if stored.get("settings") == settings and stored.get("model") == str(path):
                results[name] = stored["metrics"]
                continue
        missing[name] = path
    if missing:  # together: one generation engine for all of them (evaluate_against_teacher)
        fresh = evaluate_against_teacher(missing, paths["teacher"], heldout, args.eval_samples,
                                         TEACHER_MAX_NEW_TOKENS, seed=seed, backend=args.backend)
        for name, path in missing.items():
            results[name] = fresh[name]
            caches[name].write_text(json.dumps({"settings": settings, "model": str(path), "metrics": fresh[name]},
                                               indent=1))
    return {name: results[name] for name in models}


def read_metrics(run: Path) -> list:
    path = Path(run) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def summarise(per_seed: dict, arms: list) -> dict:
    """``{arm: {metric: (mean, std, values)}}`` over seeds (std = sample std; 0 for one seed)."""
    out = {}
    for arm in arms:
        out[arm] = {}
        for key, _, _ in METRICS:
            values = [per_seed[s][arm][key] for s in per_seed if arm in per_seed[s]]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            out[arm][key] = (statistics.mean(values), std, values)
    return out


def teacher_cell(teacher_self: dict, key: str) -> str:
    """The teacher's own value of a metric (``-`` for the work counts, which it has none of)."""
    return f"{teacher_self[key]:.3f}" if key in teacher_self else "-"


def table(summary: dict, arms: list, teacher_self: dict | None) -> str:
    header = "| arm | " + " | ".join(label for _, label, _ in METRICS) + " |"
    lines = [header, "|---" * (len(METRICS) + 1) + "|"]
    for arm in arms:
        cells = [f"{summary[arm][k][0]:.3f} ± {summary[arm][k][1]:.3f}" for k, _, _ in METRICS]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    if teacher_self:
        lines.append("| teacher (itself) | " + " | ".join(teacher_cell(teacher_self, k) for k, _, _ in METRICS) + " |")
    return "\n".join(lines)


def work_counts(run: Path) -> dict:
    """``{"actor": n, "discriminator": n}``: the optimizer steps each model of a run took, read from
    its logged steps (an actor step where ``actor/updated`` is not 0; ``discriminator.updates_per_step``
    discriminator steps per step of a stage that trains one)."""
    rows = [r for r in read_metrics(run) if r.get("step", 0) > 0]
    config = json.loads((Path(run) / "config.json").read_text()) if (Path(run) / "config.json").exists() else {}
    per_step = config.get("discriminator", {}).get("updates_per_step", 1)
    return {"actor": sum(1 for r in rows if r.get("actor/updated", 1.0) != 0.0),
            "discriminator": sum(per_step for r in rows if "discriminator/grad_norm" in r)}


def best_goal_checks(summary: dict) -> list:
    """The main comparison's goal (--protocol best), per black-box arm against SeqKD's best
    checkpoint: reverse KL and teacher NLL lower by more than twice the larger seed spread, forward
    NLL at most 5% above; the stretch: half of the way from the best SeqKD to opd from it."""
    checks = []
    if "seqkd_best" not in summary:
        return checks
    base = summary["seqkd_best"]
    for arm in ("seqkd_more", "gad", "gad_lr", "spin", "seqkd_ema"):
        if arm not in summary:
            continue
        for key in ("reverse_kl", "teacher_nll"):
            (a, a_std, _), (b, b_std, _) = summary[arm][key], base[key]
            margin = 2 * max(a_std, b_std)
            checks.append((f"{arm} {key} {a:.3f} below the best SeqKD's {b:.3f} by more than twice the larger "
                           f"spread ({margin:.3f})", b - a > margin))
        a, b = summary[arm]["forward_nll"][0], base["forward_nll"][0]
        checks.append((f"{arm} forward NLL {a:.3f} no more than 5% above the best SeqKD's {b:.3f}", a <= 1.05 * b))
        if "opd" in summary:
            o, a, b = summary["opd"]["reverse_kl"][0], summary[arm]["reverse_kl"][0], base["reverse_kl"][0]
            share = (b - a) / (b - o) if b != o else float("nan")
            checks.append((f"stretch: {arm} covers {share:.0%} of the way from the best SeqKD ({b:.3f}) to opd from "
                           f"it ({o:.3f}) in reverse KL (half needed)", share >= 0.5))
    return checks


def goal_checks(summary: dict) -> list:
    """The issue's goal, each as (statement, met) from the means and the seed spread."""
    checks = best_goal_checks(summary)
    def have(*arms):
        return all(a in summary for a in arms)
    if have("gad", "seqkd"):
        for key in ("reverse_kl", "teacher_nll"):
            (g, gs, _), (s, ss, _) = summary["gad"][key], summary["seqkd"][key]
            checks.append((f"GAD {key} {g:.3f} lower than SeqKD {s:.3f} by more than the spread ({max(gs, ss):.3f})",
                           s - g > max(gs, ss)))
        g, s = summary["gad"]["forward_nll"][0], summary["seqkd"]["forward_nll"][0]
        checks.append((f"GAD forward NLL {g:.3f} no more than 5% above SeqKD {s:.3f}", g <= 1.05 * s))
    if have("seqkd", "start"):
        s, b = summary["seqkd"]["reverse_kl"][0], summary["start"]["reverse_kl"][0]
        checks.append((f"SeqKD reverse KL {s:.3f} lower than the untrained student's {b:.3f}", s < b))
    if have("gad_frozen", "gad"):
        f, g = summary["gad_frozen"]["reverse_kl"][0], summary["gad"]["reverse_kl"][0]
        checks.append((f"frozen-discriminator GAD ends further from the teacher (reverse KL {f:.3f} vs {g:.3f})", f > g))
    if have("opd", "gad", "start"):
        o, g, b = (summary[arm]["reverse_kl"][0] for arm in ("opd", "gad", "start"))
        share = (b - g) / (b - o) if b != o else float("nan")
        checks.append((f"white-box OPD reverse KL {o:.3f} below the start's {b:.3f}; black-box GAD ({g:.3f}) "
                       f"recovers {share:.0%} of that gain", o < b))
    return checks


def curve_run_of(run_name: str) -> str:
    """The stage family of a run folder name (``gad``, ``gad_frozen``, ``gad_lr``, ``spin`` with an
    optional ``_VARIANT``), or ``""``."""
    for family in ("gad_frozen", "gad_lr", "spin", "gad"):  # longest prefix first
        if run_name == family or run_name.startswith(family + "_"):
            return family
    return ""


def plot(summary: dict, arms: list, per_seed_runs: dict, out_dir: Path) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    for ax, (key, label, lower) in zip(axes.flat, METRICS):
        means = [summary[a][key][0] for a in arms]
        stds = [summary[a][key][1] for a in arms]
        ax.bar(arms, means, yerr=stds, capsize=4, color=[plt.cm.tab10(i % 10) for i in range(len(arms))])
        for i, arm in enumerate(arms):
            ax.scatter([i] * len(summary[arm][key][2]), summary[arm][key][2], color="k", s=8, zorder=3)
        ax.set_title(label + ("" if lower is None else " (lower is better)" if lower else " (higher is better)"), fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.suptitle("Known-teacher benchmark: held-out metrics per arm (mean, seed spread, seeds as dots)")
    fig.tight_layout()
    path = out_dir / "metrics_per_arm.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    written.append(path)

    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    for ax, key in zip(axes.flat, CURVES):
        for seed, runs in per_seed_runs.items():
            for name, style in (("gad", "-"), ("gad_frozen", ":"), ("gad_lr", "--"), ("spin", "-.")):
                run = next((path for run_name, path in runs.items() if curve_run_of(run_name) == name), None)
                rows = [r for r in read_metrics(run) if key in r] if run else []
                if rows:
                    ax.plot([r["step"] for r in rows], [r[key] for r in rows], style, label=f"{name} s{seed}")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("GAD step", fontsize=8)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8)
    fig.suptitle("Adversarial stages per step (solid: GAD, dotted: frozen discriminator, dashed: gad_lr, "
                 "dash-dot: spin)")
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    path = out_dir / "gad_curves.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    written.append(path)
    return written


def wall_time_note(total: float, reused: int) -> str:
    """The recorded wall time, saying when it does not cover every stage (runs finished by an earlier
    invocation are reused, not retrained)."""
    if not reused:
        return f"wall time {total:.0f} s"
    return (f"wall time of this invocation {total:.0f} s, not the benchmark's cost: {reused} stage runs were "
            "reused from earlier invocations (the stage logs time each run)")


def record(args, extra: list, summary: dict, arms: list, teacher_self: dict, checks: list, report: list,
           pictures: list, total: float, reused: int = 0) -> list:
    """Store the run as ``benchmarks/results/9_known_teacher_NAME.json`` (rendered into RESULTS.md by
    the benchmarks' common store) and copy its plots beside it; returns the plots' new paths."""
    import shutil

    sys.path.insert(0, str(REPO / "benchmarks"))
    from common import RESULTS_DIR, save_result

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    copied = []
    for picture in pictures:
        target = RESULTS_DIR / f"known_teacher_{args.record}_{Path(picture).name}"
        shutil.copyfile(picture, target)
        copied.append(target)
    rows = [[arm, *[f"{summary[arm][k][0]:.3f} ± {summary[arm][k][1]:.3f}" for k, _, _ in METRICS]] for arm in arms]
    rows.append(["teacher (itself)", *[teacher_cell(teacher_self, k) for k, _, _ in METRICS]])
    command = "python -m applications.known_teacher " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if len(sys.argv) > 1 else []))
    save_result(f"q_known_teacher_{args.record}", {
        "title": f"Known-teacher quality: {args.title or args.record}",
        "description": "\n".join(report[:2]) + f" Plots: {', '.join('results/' + p.name for p in copied)}.",
        "table": {"columns": ["arm", *[label for _, label, _ in METRICS]], "rows": rows},
        "notes": [f"[{'x' if met else ' '}] {text}" for text, met in checks] + [wall_time_note(total, reused)],
        "summary": summary, "args": vars(args), "extra": [str(e) for e in extra],
    }, command)
    return copied


def environment() -> str:
    import torch
    import transformers

    try:
        import vllm

        vllm_version = vllm.__version__
    except ImportError:
        vllm_version = "not installed"
    import deepspeed

    return (f"{platform.node()} ({platform.machine()}, {__import__('os').cpu_count()} cores), Python "
            f"{platform.python_version()}, torch {torch.__version__}, deepspeed {deepspeed.__version__}, "
            f"transformers {transformers.__version__}, vllm {vllm_version}, {time.strftime('%Y-%m-%d')}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    parser.add_argument("--output-dir", default="outputs/known_teacher")
    parser.add_argument("--warmup-steps", type=int, default=40)
    parser.add_argument("--discriminator-warmup", type=int, default=10)
    parser.add_argument("--gad-steps", type=int, default=30)
    parser.add_argument("--gad-flags", default=DEFAULT_GAD_FLAGS, help="extra flags for the GAD stages only, as one "
                        "string (default: the GAD actor learning rate found best in the search, benchmarks/RESULTS.md)")
    parser.add_argument("--opd-flags", default=DEFAULT_OPD_FLAGS, help="extra flags for the opd stage only, as one string")
    parser.add_argument("--gad-lr-flags", default=DEFAULT_GAD_LR_FLAGS, help="extra flags for the gad_lr stage only")
    parser.add_argument("--seqkd-flags", default="", help="--protocol best: extra flags for the SFT arms only "
                        "(seqkd_more, more SFT from the best checkpoint; seqkd_ema, averaged SFT from the start), "
                        "e.g. another --actor.lr")
    parser.add_argument("--spin-flags", default=None, help="extra flags for the spin stage only (default: "
                        + "; ".join(f"--protocol {k}: {v}" for k, v in DEFAULT_SPIN_FLAGS.items()) + ")")
    parser.add_argument("--protocol", default="start", choices=("start", "best"),
                        help="start: every arm from the untrained student at equal actor steps; best: the main "
                             f"comparison, every arm ({', '.join(BEST_ARMS)}) continues --continue-steps actor steps "
                             "from SeqKD's best checkpoint (validation forward NLL)")
    parser.add_argument("--continue-steps", type=int, default=60, help="--protocol best: actor steps of each arm")
    parser.add_argument("--curve-steps", type=int, default=400, help="--protocol best: SeqKD curve length")
    parser.add_argument("--curve-every", type=int, default=40, help="--protocol best: SeqKD checkpoint and "
                        "validation interval of the curve")
    parser.add_argument("--variant", default="", help="a name for this setting of the arms' flags: their runs go "
                        "to ARM_NAME (gad_NAME, opd_NAME, spin_NAME, ...; with --protocol best also seqkd_more_NAME) "
                        "beside the shared warm-up and SeqKD runs of the same --output-dir")
    parser.add_argument("--num-procs", type=int, default=2, help="ranks per stage")
    parser.add_argument("--eval-prompts", type=int, default=0, help="held-out prompts to evaluate on (0 = all)")
    parser.add_argument("--eval-samples", type=int, default=2, help="student samples per held-out prompt")
    parser.add_argument("--backend", default="auto", choices=("auto", "vllm", "hf"), help="for data and evaluation")
    parser.add_argument("--no-diagnostics", action="store_true", help="do not score rollouts under the teacher")
    parser.add_argument("--record", default="", help="also store this run as a section of benchmarks/RESULTS.md "
                        "(benchmarks/results/q_known_teacher_NAME.json) with its plots beside it")
    parser.add_argument("--title", default="", help="the section's title with --record")
    args, extra = parser.parse_known_args(argv)
    if extra and extra[0] == "--":
        extra = extra[1:]
    if args.spin_flags is None:
        args.spin_flags = DEFAULT_SPIN_FLAGS[args.protocol]
    known = BEST_ARMS if args.protocol == "best" else ARMS
    if args.protocol == "best" and args.arms == ",".join(ARMS):
        args.arms = ",".join(BEST_ARMS)
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(known))
    if unknown:
        parser.error(f"--arms: unknown {', '.join(unknown)} with --protocol {args.protocol} (known: {', '.join(known)})")
    if args.warmup_steps <= args.discriminator_warmup:
        parser.error("--warmup-steps must exceed --discriminator-warmup (the warm-up must update the actor)")
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    paths = prepare(args.backend)

    trained = {}
    for seed in args.seeds:
        trained[seed] = train_seed(seed, [a for a in arms if a != "start"], paths, args, extra)

    from transformers import AutoTokenizer

    from applications.known_teacher_eval import held_out

    heldout = held_out(Path(paths["test"]), AutoTokenizer.from_pretrained(paths["student"]), args.eval_prompts)
    per_seed = {}
    for seed in args.seeds:
        runs = trained[seed]["runs"]
        models = {arm: (paths["student"] if arm == "start" else str(runs["seqkd_best"]) if arm == "seqkd_best"
                        else evaluated_model(runs[stage_plan(arm, args)[-1][1]], arm)) for arm in arms}
        per_seed[seed] = evaluate_cached(models, paths, heldout, args, seed, out)
        for arm in arms:  # the work behind each arm (in --protocol best: after SeqKD's best checkpoint)
            counts = [work_counts(runs[name]) for _, name, _, _ in stage_plan(arm, args)] if arm != "start" else []
            actor = sum(c["actor"] for c in counts)
            per_seed[seed][arm] = dict(per_seed[seed][arm], actor_updates=actor,
                                       model_updates=actor + sum(c["discriminator"] for c in counts))
    teacher_self = evaluate_cached({"teacher": paths["teacher"]}, paths, heldout, args, 0, out)["teacher"]
    summary = summarise(per_seed, arms)
    total = time.perf_counter() - started
    checks = goal_checks(summary)
    per_stage_wall = {seed: {k: round(v) for k, v in trained[seed]["wall"].items()} for seed in args.seeds}
    report = [
        f"Seeds {args.seeds}; {len(heldout.messages)} held-out prompts x {args.eval_samples} samples (T = 1, "
        f"<= {TEACHER_MAX_NEW_TOKENS} tokens) + 1 greedy answer each. Warm-up {args.warmup_steps} steps "
        f"(discriminator_warmup {args.discriminator_warmup}), GAD {args.gad_steps} steps, SeqKD "
        f"{args.warmup_steps - args.discriminator_warmup + args.gad_steps} steps (equal actor updates).",
        f"Stage flags: {' '.join(map(str, extra)) or '(recipe only)'}; GAD flags: {args.gad_flags or '(none)'}.",
        "", table(summary, arms, teacher_self), "",
        *[f"- [{'x' if met else ' '}] {text}" for text, met in checks], "",
        f"Total wall time {total:.0f} s (stage wall times per seed: {per_stage_wall}). {environment()}.",
    ]
    text = "\n".join(report)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({
        "args": {k: v for k, v in vars(args).items()}, "extra": [str(e) for e in extra], "per_seed": per_seed,
        "teacher_self": teacher_self, "summary": summary, "checks": checks, "wall_s": total,
        "runs": {s: {k: str(v) for k, v in trained[s]["runs"].items()} for s in args.seeds}}, indent=1))
    pictures = plot(summary, arms, {s: trained[s]["runs"] for s in args.seeds}, out)
    if args.record:
        reused = sum(1 for seed in args.seeds for name, wall in trained[seed]["wall"].items() if wall == 0.0)
        pictures = record(args, extra, summary, arms, teacher_self, checks, report, pictures, total, reused)
    log("\n" + text)
    log(f"\n[known-teacher] results: {out / 'results.md'}, {out / 'results.json'}; plots: "
        + ", ".join(str(p) for p in pictures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
