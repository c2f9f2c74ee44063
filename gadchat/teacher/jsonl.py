"""Durable JSON-lines files: append rows that survive a kill, and read them back after one.

:class:`JsonlAppender` writes each row as one complete line with a single ``write`` then ``fsync``;
:func:`recover_jsonl` reads such a file back, cutting off a torn last line (a kill mid-write), so a
rerun neither loses nor duplicates a row.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path


def recover_jsonl(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSON-lines file written by :class:`JsonlAppender`; a torn last line is cut off.

    A last line without its newline (a write interrupted by a kill) is dropped and the file is
    truncated to the last complete line. A complete line that is not JSON means the file was
    edited by hand or is not ours: that raises, naming the line.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as handle:
            handle.truncate(end)
            handle.flush()
            os.fsync(handle.fileno())
        print(f"[collect] {path}: dropped a torn last line ({len(data) - end} bytes) left by an interrupted run", flush=True)
    rows = []
    for number, line in enumerate(data[:end].splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}, line {number}: not valid JSON ({exc.msg}); the output file is corrupt") from None
    return rows


class JsonlAppender:
    """Appends one JSON object per line; each line goes out in one write, then flush + fsync."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()

    def append(self, row: dict) -> None:
        payload = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            written = 0
            while written < len(payload):
                written += os.write(self._fd, payload[written:])
            os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
