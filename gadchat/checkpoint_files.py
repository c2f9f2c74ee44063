"""The on-disk layout of a stage's output folder (see :mod:`gadchat.checkpoint`): the names of its
files, finding and reading its checkpoints, disk-space checks and atomic small writes. Shared by
the checkpoint manager and the Hugging Face export, and free of both."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from gadchat import runtime
from gadchat.safe_load import CheckpointError

LATEST = "latest"
STATE_FILE = "trainer_state.json"
COMPLETE = "COMPLETE"


def final_dir(output_dir) -> Path:
    return Path(output_dir) / "final"


def export_complete(output_dir) -> bool:
    """True once a stage's final export is whole (its ``final/COMPLETE`` marker, written last)."""
    return (final_dir(output_dir) / COMPLETE).exists()


def checkpoint_root(output_dir) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(path) -> Path | None:
    """The checkpoint named by ``latest`` in ``path`` (an output dir, its checkpoints/ folder, or a
    step folder itself); None when there is none yet."""
    path = Path(path)
    if (path / STATE_FILE).exists():
        return path
    for root in (path / "checkpoints", path):
        pointer = root / LATEST
        if pointer.exists():
            name = pointer.read_text().strip()
            step_dir = root / name
            if not (step_dir / STATE_FILE).exists():
                raise CheckpointError(f"{pointer} names {name!r}, but {step_dir / STATE_FILE} is missing: "
                                      "the checkpoint folder was removed or truncated")
            return step_dir
    return None


def last_good_checkpoint(output_dir, before_step: int | None = None) -> Path | None:
    """The newest checkpoint of ``output_dir`` whose trainer_state.json records finite weights and
    finite step metrics (counted when it was saved; a checkpoint without that record is not
    vouched for), older than ``before_step`` when given; None when there is none."""
    root = checkpoint_root(output_dir)
    for step_dir in sorted((p for p in root.glob("step_*") if (p / STATE_FILE).exists()), reverse=True):
        try:
            state = read_state(step_dir)
        except CheckpointError:
            continue
        health = state.get("health") or {}
        if before_step is not None and int(state.get("step", 0)) >= before_step:
            continue
        if health.get("weights_finite") is True and health.get("metrics_finite") is True:
            return step_dir
    return None


def read_state(step_dir) -> dict:
    path = Path(step_dir) / STATE_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} is missing: {step_dir} is not a complete checkpoint") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is corrupt ({exc.msg})") from exc


def require_free_space(folder, needed_bytes: int, what: str) -> None:
    """Raise CheckpointError naming ``folder`` when the disk under it has less than ``needed_bytes``
    free (checked on every rank, agreed collectively so no rank is left waiting)."""
    folder = Path(folder)
    probe = next((p for p in [folder, *folder.absolute().parents] if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free
    short = runtime.any_rank(free < needed_bytes)
    if short:
        raise CheckpointError(
            f"not enough free disk space for {what} in {folder}: about {needed_bytes / 2**30:.2f} GiB needed, "
            f"{free / 2**30:.2f} GiB free on this rank's disk; free some space or point --trainer.output_dir elsewhere")


def disk_error(folder, what: str, exc: BaseException) -> CheckpointError:
    folder = Path(folder)
    probe = next((p for p in [folder, *folder.absolute().parents] if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free
    return CheckpointError(f"writing {what} to {folder} failed ({type(exc).__name__}: {str(exc)[:200]}); "
                           f"{free / 2**30:.2f} GiB free there - is the disk full?")


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all: a temporary file beside it, renamed once
    written; a failed write (a full disk) removes the temporary file and leaves ``path`` as it was."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def best_checkpoint(output_dir, metric: str) -> tuple:
    """``(step folder, step, value)`` of the saved checkpoint whose logged ``metric`` (a key of
    ``metrics.jsonl``, e.g. ``eval/forward_nll``) is lowest, among the complete checkpoints still in
    ``output_dir/checkpoints`` (so ``trainer.keep_last`` must keep them; log the metric at the
    steps that are saved: ``trainer.eval_every`` = ``trainer.save_every``)."""
    metrics_file = Path(output_dir) / "metrics.jsonl"
    if not metrics_file.exists():
        raise CheckpointError(f"{metrics_file} is missing: {output_dir} is not a stage's output folder")
    values = {}
    for line in metrics_file.read_text().splitlines():
        row = json.loads(line) if line.strip() else {}
        if metric in row and "step" in row:
            values[int(row["step"])] = float(row[metric])
    saved = {}
    root = checkpoint_root(output_dir)
    for step_dir in sorted(root.glob("step_*")) if root.is_dir() else []:
        if (step_dir / STATE_FILE).exists():
            saved[int(read_state(step_dir)["step"])] = step_dir
    candidates = sorted((values[step], step) for step in saved if step in values)
    if not candidates:
        raise CheckpointError(f"{output_dir}: no saved checkpoint has {metric!r} logged (logged at steps "
                              f"{sorted(values)[:10] or 'none'}, checkpoints at {sorted(saved) or 'none'})")
    value, step = candidates[0]
    return saved[step], step, value
