"""Prompt rows to send to a teacher: read from any supported input, with a stable key per row.

A row's :func:`collection_key` (``row index`` + hash of its prompt messages) is what a resumed
collection matches against the rows already in its output.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from gadchat.data import DataError, iter_raw_rows, normalize_prompt


@dataclass
class PromptRow:
    index: int
    """0-based position among all rows of the input (all files together)."""
    source: str
    line: int
    """1-based row number inside ``source`` (the line of a JSON-lines file)."""
    messages: list
    original: dict

    @property
    def where(self) -> str:
        return f"prompt row {self.index} ({self.source}, row {self.line})"


def collection_key(messages: list, row_index: int) -> str:
    """``"<row_index>-<first 16 hex of sha256(row_index, messages as canonical JSON)>"``."""
    canonical = json.dumps(messages, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    digest = hashlib.sha256(f"{row_index}\n{canonical}".encode("utf-8")).hexdigest()[:16]
    return f"{row_index}-{digest}"


def load_prompt_rows(spec: str, prompt_key: str = "content", system_prompt: str = "", split: str = "train",
                     skip_malformed: bool = False, report: dict | None = None) -> list[PromptRow]:
    """Prompt rows of ``spec`` (JSON lines, JSON, parquet, folders, ``datasets`` folder or ``hf:NAME``).

    The prompt is ``row[prompt_key]``: a list of chat messages or a string (one user turn). A
    malformed row raises :class:`DataError` naming file, row and field, or with ``skip_malformed``
    is counted in ``report["malformed"]`` and skipped.
    """
    rows = []
    for index, (source, line, raw) in enumerate(iter_raw_rows(spec, split)):
        try:
            if isinstance(raw, DataError):
                raise raw
            if not isinstance(raw, dict):
                raise DataError(source, line, "<row>", f"expected an object, got {type(raw).__name__}", "bad_row")
            if prompt_key not in raw:
                raise DataError(source, line, prompt_key, "missing field (choose the prompt field with --prompt-key)", "missing_field")
            messages = normalize_prompt(raw[prompt_key], source, line, prompt_key, system_prompt)
        except DataError:
            if not skip_malformed:
                raise
            if report is not None:
                report["malformed"] = report.get("malformed", 0) + 1
            continue
        rows.append(PromptRow(index, source, line, messages, dict(raw)))
    return rows
