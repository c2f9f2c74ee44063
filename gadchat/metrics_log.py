"""Training metrics out: TensorBoard, ``metrics.jsonl`` and the console (with a progress bar).

Only rank 0 writes. ``metrics.jsonl`` holds one JSON object per logged step; on resume from step
``k`` the lines of steps after ``k`` (logged by the run that died) are dropped first, so a resumed
run's log equals an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

logger = logging.getLogger("gadchat")

CONSOLE_KEYS = {"discriminator/d_loss": "d_loss", "discriminator/d_acc": "d_acc", "discriminator/teacher_score": "r_teacher",
                "discriminator/student_score": "r_student", "actor/sft_loss": "sft", "actor/pg_loss": "pg", "actor/kl": "kl",
                "reward/mean": "reward", "response_length/mean": "resp_len", "eval/rouge_l": "rougeL",
                "throughput/tokens_per_s": "tok/s", "time/step": "s/step"}


def json_safe(value):
    """A metric value as strict JSON allows it: NaN and +-Inf become null (``json.dumps`` would
    write the bare tokens ``NaN`` / ``Infinity``, which no JSON parser accepts)."""
    value = float(value)
    return value if math.isfinite(value) else None


def nonfinite_metrics(metrics: dict) -> dict:
    """Pure: the entries of ``metrics`` whose value is NaN or +-Inf."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not math.isfinite(float(v))}


def read_metrics(output_dir) -> list:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a torn last line from a killed run
                break
    return rows


class MetricsLogger:
    def __init__(self, output_dir, enabled: bool, tensorboard: bool, progress: bool, total: int, start: int, stage: str):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.writer = None
        self.bar = None
        if not enabled:
            return
        kept = [row for row in read_metrics(output_dir) if row.get("step", 0) <= start]
        tmp = self.path.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as handle:
            for row in kept:
                handle.write(json.dumps(row) + "\n")
        os.replace(tmp, self.path)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=start + 1)
            except ImportError:
                logger.warning("tensorboard is not installed; logging to metrics.jsonl and the console only")
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=stage, dynamic_ncols=True)

    def log(self, step: int, metrics: dict, advance: bool = True) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: json_safe(v) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, allow_nan=False) + "\n")
            handle.flush()
        if self.writer is not None:
            for key, value in metrics.items():
                if math.isfinite(float(value)):
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()
        shown = {name: f"{metrics[k]:.4g}" for k, name in CONSOLE_KEYS.items() if k in metrics}
        if self.bar is not None:
            if advance:
                self.bar.update(1)
            self.bar.set_postfix(shown, refresh=False)
            self.bar.write(f"step {step}: " + " ".join(f"{k}={v}" for k, v in shown.items()))
        else:
            logger.info("step %d: %s", step, " ".join(f"{k}={v}" for k, v in shown.items()))

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
