"""Teacher collection: ask a chat endpoint to answer every prompt row not answered yet, resumably.

:func:`collect_teacher_data` appends the teacher data, in the published layout
``{"content": messages, "teacher_response": str, "teacher": model, "finish_reason": str}`` plus the
row's original fields and ``collection_key``, to a JSON-lines file (:mod:`gadchat.teacher.jsonl`:
each row is one complete line written with a single ``write`` then ``fsync``; on a rerun a torn
last line is cut off). Rows whose key (``row index`` + hash of the prompt messages,
:func:`gadchat.teacher.prompts.collection_key`) is already in the output are skipped, so no row is
lost or duplicated. Rows are appended in completion order, not input order. Failed prompts go to
``<output>.failures.jsonl`` and, with ``drop_truncated``, answers cut at the token limit to
``<output>.dropped.jsonl`` (:func:`sidecar_paths`).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from gadchat.teacher.client import AuthenticationError, ChatCompletion, ChatEndpoint, EndpointError
from gadchat.teacher.jsonl import JsonlAppender, recover_jsonl
from gadchat.teacher.prompts import PromptRow, collection_key


@dataclass
class CollectionReport:
    total_rows: int = 0
    already_done: int = 0
    collected: int = 0
    dropped_truncated: int = 0
    skipped_over_budget: int = 0
    failed: list = field(default_factory=list)
    """``{"row", "source", "line", "collection_key", "error"}`` per failed prompt."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0

    def count_answer(self, completion, drop: bool) -> bool:
        """Count one answer (its tokens, collected or dropped as truncated); returns ``drop``."""
        self.prompt_tokens += completion.prompt_tokens
        self.completion_tokens += completion.completion_tokens
        if drop:
            self.dropped_truncated += 1
        else:
            self.collected += 1
        return drop

    def summary(self) -> str:
        return (
            f"{self.total_rows} prompt rows: {self.already_done} already answered, {self.collected} collected now, "
            f"{self.dropped_truncated} dropped (finish_reason=length), {self.skipped_over_budget} skipped (over token budget), "
            f"{len(self.failed)} failed; {self.prompt_tokens} prompt + {self.completion_tokens} completion tokens; "
            f"{self.retries} retries"
        )


def sidecar_paths(output_path: str | os.PathLike) -> tuple[Path, Path]:
    """``(failures, dropped)`` files beside the output: ``<output>.failures.jsonl``, ``<output>.dropped.jsonl``."""
    output_path = Path(output_path)
    return (output_path.with_name(output_path.name + ".failures.jsonl"),
            output_path.with_name(output_path.name + ".dropped.jsonl"))


def teacher_row(row: PromptRow, completion: ChatCompletion, teacher: str, key: str) -> dict:
    """The published layout plus the row's other original fields and its collection key."""
    out = dict(row.original)
    out.update(
        content=row.messages,
        teacher_response=completion.content,
        teacher=teacher,
        finish_reason=completion.finish_reason,
        collection_key=key,
    )
    return out


def prompt_token_counter(tokenizer_path: str):
    """A function ``messages -> number of prompt tokens`` (chat template if the tokenizer has one)."""
    from transformers import AutoTokenizer

    from gadchat.data import encode_prompt

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    if getattr(tokenizer, "chat_template", None):
        return lambda messages: len(encode_prompt(tokenizer, messages))
    return lambda messages: sum(len(tokenizer(m["content"], add_special_tokens=False)["input_ids"]) for m in messages)


def collect_teacher_data(
    rows: list[PromptRow],
    endpoint: ChatEndpoint,
    output_path: str | os.PathLike,
    concurrency: int = 8,
    drop_truncated: bool = False,
    count_prompt_tokens=None,
    max_prompt_tokens: int = 0,
    progress: bool = True,
) -> CollectionReport:
    """Answer every row whose key is not yet in the output (or the dropped sidecar); see the module docstring."""
    from tqdm import tqdm

    report = CollectionReport(total_rows=len(rows))
    failures_path, dropped_path = sidecar_paths(output_path)
    pending = pending_rows(rows, endpoint.model, output_path, report, count_prompt_tokens, max_prompt_tokens)

    bar = tqdm(total=len(pending), unit="prompt", desc="teacher", disable=not progress, dynamic_ncols=True)

    def update_bar():
        bar.set_postfix(ok=report.collected, failed=len(report.failed), dropped=report.dropped_truncated,
                        tokens=report.completion_tokens, refresh=False)

    with JsonlAppender(output_path) as output, ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        dropped = None
        queue = iter(pending)
        in_flight = {}

        def submit_next() -> bool:
            item = next(queue, None)
            if item is None:
                return False
            row, key = item
            in_flight[pool.submit(endpoint.complete, row.messages, row.where)] = (row, key)
            return True

        for _ in range(max(1, concurrency) * 2):
            if not submit_next():
                break
        try:
            while in_flight:
                finished, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
                for future in finished:
                    row, key = in_flight.pop(future)
                    try:
                        completion = future.result()
                    except AuthenticationError:
                        raise  # the key is refused: every other request would be too
                    except EndpointError as err:
                        report.failed.append({"row": row.index, "source": row.source, "line": row.line,
                                              "collection_key": key, "error": str(err)})
                    else:
                        record = teacher_row(row, completion, endpoint.model, key)
                        if report.count_answer(completion, drop=drop_truncated and completion.finish_reason == "length"):
                            dropped = dropped or JsonlAppender(dropped_path)
                            dropped.append(record)
                        else:
                            output.append(record)
                    bar.update(1)
                    update_bar()
                    submit_next()
        finally:
            for future in in_flight:
                future.cancel()
            if dropped is not None:
                dropped.close()
            bar.close()

    report.retries = endpoint.retries
    write_failures(report.failed, failures_path)
    return report


def pending_rows(rows: list, teacher: str, output_path, report: CollectionReport, count_prompt_tokens,
                 max_prompt_tokens: int) -> list:
    """``(row, collection key)`` of the rows still to answer: not in the output or its dropped
    sidecar, within the prompt budget (counted in ``report``). Refuses an output that holds
    another teacher's answers."""
    existing = recover_jsonl(output_path) + recover_jsonl(sidecar_paths(output_path)[1])
    others = sorted({str(r.get("teacher")) for r in existing if r.get("teacher") != teacher})
    if others:
        raise ValueError(f"{output_path} already holds answers of teacher {', '.join(others)}, not {teacher}; "
                         "use another --output (one file per teacher) or the same --model to resume")
    done = {r.get("collection_key") for r in existing}
    pending = []
    for row in rows:
        key = collection_key(row.messages, row.index)
        if key in done:
            report.already_done += 1
        elif max_prompt_tokens and count_prompt_tokens is not None and \
                count_prompt_tokens(row.messages) > max_prompt_tokens:
            report.skipped_over_budget += 1
        else:
            pending.append((row, key))
    return pending


def write_failures(failed: list, failures_path: Path) -> None:
    """The failed rows as JSON lines (the file removed when none failed)."""
    if failed:
        with open(failures_path, "w", encoding="utf-8") as handle:
            for failure in failed:
                handle.write(json.dumps(failure, ensure_ascii=False) + "\n")
    elif failures_path.exists():
        failures_path.unlink()
