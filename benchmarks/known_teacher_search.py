"""Collect every known-teacher configuration tried into one RESULTS.md section.

Reads the evaluations that ``applications.known_teacher`` stored in its run folders
(``<output-dir>/seed*/<run>/run/known_teacher_eval.json``) together with each run's saved
configuration, and records one row per run: which stage settings differ from the recipe, the
held-out metrics, and the last-10-step means of the GAD stage's reward diagnostics.

    python benchmarks/known_teacher_search.py outputs/kt1 outputs/kt2 [--record search]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHOWN = [("discriminator", "lr"), ("discriminator", "pooling"), ("discriminator", "freeze"), ("actor", "lr"), ("actor", "kl_coef"),
         ("rollout", "n"), ("trainer", "prompts_per_step"), ("trainer", "max_steps"), ("trainer", "oracle_reward")]
DIAG = ["discriminator/d_acc", "diag/reward_vs_log_ratio", "diag/reward_vs_length", "actor/kl", "response_length/mean"]


def settings(run: Path) -> str:
    cfg = json.loads((run / "config.json").read_text())
    return ", ".join(f"{section}.{key}={cfg[section][key]}" for section, key in SHOWN if key in cfg.get(section, {}))


def last_means(run: Path, keys: list, count: int = 10) -> list:
    path = run / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    out = []
    for key in keys:
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))][-count:]
        out.append(sum(values) / len(values) if values else None)
    return out


def main(argv=None) -> int:
    from applications.known_teacher import METRICS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dirs", nargs="+")
    parser.add_argument("--record", default="", help="store as benchmarks/results/q_known_teacher_NAME.json")
    args = parser.parse_args(argv)
    keys = ["reverse_kl", "teacher_nll", "forward_nll", "length_ratio", "rouge_l"]
    labels = {k: label for k, label, _ in METRICS}
    columns = ["run", "settings", *[labels[k] for k in keys], *[f"{d} (last 10)" for d in DIAG]]
    rows = []
    for out in map(Path, args.output_dirs):
        for evaluation in sorted(out.glob("seed*/*/run/known_teacher_eval.json")):
            run = evaluation.parent
            metrics = json.loads(evaluation.read_text())["metrics"]
            name = f"{out.name}/{run.parent.parent.name}/{run.parent.name}"
            rows.append([name, settings(run), *[round(metrics[k], 3) for k in keys],
                         *[None if v is None else round(v, 3) for v in last_means(run, DIAG)]])
    print("| " + " | ".join(columns) + " |")
    for row in rows:
        print("| " + " | ".join("-" if v is None else str(v) for v in row) + " |")
    if args.record:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from common import save_result

        save_result(f"q_known_teacher_{args.record}", {
            "title": "Known-teacher quality: every configuration tried (seed 42)",
            "description": ("One row per run of `python -m applications.known_teacher --seeds 42 --output-dir DIR "
                            "[--variant NAME --gad-flags ...] [-- stage flags]`; settings are the run's saved "
                            "configuration (recipe `configs/known_teacher.yaml` otherwise); held-out metrics as in "
                            "the main table; diagnostics are the stage's last 10 logged steps."),
            "table": {"columns": columns, "rows": rows}},
            "python benchmarks/known_teacher_search.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
