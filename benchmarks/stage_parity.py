"""Run every stage of the registry (:mod:`gadchat.stages`) on the CPU default with a fixed seed and write every
step's metrics (timings, throughput and memory left out) to one JSON file; ``--compare A B`` checks
that two such files are bit-identical.

Used to show that a refactor of the stage code changed no number: record on the commit before it,
record after it, compare. The checkout to run is ``--repo`` (default: this one), so the same script
records an older commit from a ``git worktree``:

    python benchmarks/stage_parity.py --out /tmp/after.json
    git worktree add /tmp/before <commit> && python benchmarks/stage_parity.py --repo /tmp/before --out /tmp/before.json
    python benchmarks/stage_parity.py --compare /tmp/before.json /tmp/after.json

Metric and flag names renamed by the refactor (``critic`` -> ``discriminator``) are mapped before the
comparison. The stages, their step folders and hand-offs (``init_from_stage``) are read from this
checkout's registry and run from ``--repo``'s step folders, in registry order; a stage that takes a
teacher model (opd) is given the warm-up's exported actor, which shares the student's tokenizer.
Each stage runs under the ``deepspeed`` launcher with 2 ranks at ZeRO-3 (the default), on the
rollout backend named by ``--backend``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
VOLATILE = ("time/", "throughput/", "mem/")
RENAMES = (("critic/", "discriminator/"), ("digest/critic", "digest/discriminator"))  # key prefixes
EXACT_RENAMES = {"digest/ref": "digest/reference"}


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _discriminator_section(repo: Path) -> str:
    """The discriminator's flag section in ``repo`` (``critic`` before the rename)."""
    text = (repo / "gadchat" / "config.py").read_text()
    return "discriminator" if "class DiscriminatorConfig" in text else "critic"


def registry_stages() -> dict:
    """``{stage: (step folder, init_from_stage)}`` of this checkout's registry, in registry order
    (a stage's ``init_from_stage`` comes before it)."""
    sys.path.insert(0, str(HERE))
    from gadchat.stages import RECIPES

    return {name: (recipe.step_folder, recipe.init_from_stage) for name, recipe in RECIPES.items()}


def run_stages(repo: Path, backend: str, workdir: Path) -> dict:
    d = _discriminator_section(repo)
    gate = "discriminator_warmup" if d == "discriminator" else "critic_warmup"
    common = ["--config", str(repo / "configs" / "cpu_tiny.yaml"), "--trainer.progress_bar", "false",
              "--trainer.tensorboard", "false", "--trainer.log_param_digest", "true",
              "--rollout.backend", backend, "--trainer.seed", "7", "--data.max_rows", "64",
              "--rollout.max_new_tokens", "24"]
    # Per-stage settings beyond the common ones: short runs that still cross each stage's gate and
    # every branch (PPO epochs and mini-batches, the entropy bonus); a new stage runs with none.
    settings = {
        "warmup": [f"--trainer.{gate}", "1"],
        "gad": ["--actor.ppo_epochs", "2", "--actor.mini_batches", "2", "--actor.entropy_coef", "0.01"],
        "opd": ["--model.teacher_path", str(workdir / "warmup" / "final" / "actor")],
    }
    stages = {}
    for stage, (step, init_from_stage) in registry_stages().items():
        extra = ["--trainer.max_steps", "3", *settings.get(stage, [])]
        if init_from_stage:
            extra += ["--trainer.init_from", str(workdir / init_from_stage)]
        stages[stage] = (step, extra)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(repo))
    out = {}
    for stage, (step, extra) in stages.items():
        target = workdir / stage
        command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(_port()),
                   str(repo / "training" / step / "main.py"), *common, "--trainer.output_dir", str(target), *extra]
        result = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"{stage} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        rows = [json.loads(line) for line in (target / "metrics.jsonl").read_text().splitlines()]
        out[stage] = [{key: value for key, value in row.items() if not key.startswith(VOLATILE)} for row in rows]
    return out


def normalise(rows: list) -> list:
    out = []
    for row in rows:
        renamed = {}
        for key, value in row.items():
            key = EXACT_RENAMES.get(key, key)
            for old, new in RENAMES:
                if key.startswith(old):
                    key = new + key[len(old):]
            renamed[key] = value
        out.append(renamed)
    return out


def compare(a: dict, b: dict) -> list:
    """Every value of the recording ``a`` (before) that ``b`` (after) lacks or holds differently, and
    every stage of ``a`` missing from ``b``; a stage or a metric only ``b`` has (added since) is not
    compared (:func:`added_metrics` names them)."""
    problems = [f"{stage}: recorded before, missing after" for stage in sorted(set(a) - set(b))]
    for stage in sorted(set(a) & set(b)):
        rows_a, rows_b = normalise(a.get(stage, [])), normalise(b.get(stage, []))
        if len(rows_a) != len(rows_b):
            problems.append(f"{stage}: {len(rows_a)} rows vs {len(rows_b)}")
            continue
        for index, (row_a, row_b) in enumerate(zip(rows_a, rows_b)):
            for key in sorted(set(row_a)):  # a metric logged only AFTER (added since) changes no recorded value
                if row_a.get(key, "missing") != row_b.get(key, "missing"):
                    problems.append(f"{stage} row {index} {key}: {row_a.get(key, 'missing')!r} vs {row_b.get(key, 'missing')!r}")
    return problems


def added_metrics(a: dict, b: dict) -> list:
    """The metric names ``b`` logs in a stage both recordings hold that ``a`` never logged there."""
    added = set()
    for stage in set(a) & set(b):
        before = {key for row in normalise(a[stage]) for key in row}
        added |= {key for row in normalise(b[stage]) for key in row} - before
    return sorted(added)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=str(HERE), help="checkout whose stages run (default: this one)")
    parser.add_argument("--backend", default="hf", choices=("hf", "vllm"))
    parser.add_argument("--out", help="JSON file to write the metrics to")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="compare two recorded files")
    parser.add_argument("--save", default="", metavar="LABEL", help="with --compare: store the comparison in "
                        "benchmarks/results/11_stage_parity_LABEL.json and RESULTS.md")
    args = parser.parse_args(argv)
    if args.compare:
        before, after = (json.loads(Path(p).read_text()) for p in args.compare)
        problems = compare(before, after)
        keys = sum(len(row) for rows in before.values() for row in rows)
        added = sorted(set(after) - set(before))
        print(f"{len(problems)} differences over {keys} values" + (f" (stages added since, not compared: "
                                                                    f"{', '.join(added)})" if added else "")
              + ("" if not problems else ":"))
        if added_metrics(before, after):
            print(f"metrics added since, not compared: {', '.join(added_metrics(before, after))}")
        for line in problems[:50]:
            print("  " + line)
        if args.save:
            sys.path.insert(0, str(HERE))
            from benchmarks import common

            result = {
                "title": f"11. Stage parity across a refactor ({args.save})",
                "description": ("Every logged value (timings, throughput and memory left out) of every stage of the "
                                f"registry ({', '.join(before)}), 3 steps each, 2 ranks at ZeRO-3, seed 7, recorded before and after, compared for "
                                "bit-identity (benchmarks/stage_parity.py)."),
                "table": {"columns": ["stage", "rows", "values", "differences"],
                          "rows": [[stage, len(rows), sum(len(r) for r in rows),
                                    sum(1 for p in problems if p.startswith(stage + " "))]
                                   for stage, rows in before.items()]},
                "notes": [f"{len(problems)} differences over {keys} values"] + problems[:10],
            }
            print(f"saved {common.save_result('11_stage_parity_' + args.save, result, common.command_line(__file__, argv))}")
        return 1 if problems else 0
    if not args.out:
        parser.error("--out is required unless --compare")
    with tempfile.TemporaryDirectory() as workdir:
        metrics = run_stages(Path(args.repo).resolve(), args.backend, Path(workdir))
    Path(args.out).write_text(json.dumps(metrics, indent=1))
    print(f"wrote {args.out}: " + ", ".join(f"{k} {len(v)} rows" for k, v in metrics.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
