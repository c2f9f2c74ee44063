"""Teacher collection: ask an OpenAI-compatible chat endpoint to answer prompts, resumably.

Two parts:

* :class:`ChatEndpoint` — one chat completion through the official ``openai`` client, with a
  per-request timeout and its own retry loop: rate limits (429), server errors (5xx), 408/409,
  timeouts and connection errors are retried with exponential backoff
  ``min(backoff_max, backoff_base * 2**attempt) * uniform(0.5, 1)`` (a ``Retry-After`` header, when
  the server sends one, is honoured up to ``backoff_max``). The response body is parsed here, so a
  malformed answer (not JSON, no ``choices``, no string ``content``) raises
  :class:`MalformedAnswerError` naming the prompt row; an empty or whitespace-only answer is such
  a failure too, never a row. A 401/403 (a wrong or unauthorised key) raises
  :class:`AuthenticationError` and every later request of the endpoint fails at once without being
  sent, so a bad key costs one request, not one per prompt. The API key is read from an
  environment variable and only ever handed to the client; error texts have it replaced by
  ``***`` (servers may echo it), so it is never printed or written.

* :func:`collect_teacher_data` — answers every prompt row not answered yet and appends the
  teacher data, in the published layout
  ``{"content": messages, "teacher_response": str, "teacher": model, "finish_reason": str}``
  plus the row's original fields and ``collection_key``, to a JSON-lines file. Each row is one
  complete line written with a single ``write`` then ``flush`` + ``fsync``; on a rerun a torn last
  line (a kill mid-write) is cut off, and rows whose key (``row index`` + hash of the prompt
  messages, :func:`collection_key`) is already in the output are skipped, so no row is lost or
  duplicated. Rows are appended in completion order, not input order.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from gadchat.data import DataError, iter_raw_rows, normalize_prompt

RETRYABLE_STATUS = (408, 409, 429)


class EndpointError(RuntimeError):
    """A request that failed for good (a non-retryable HTTP error, or retries exhausted)."""


class MalformedAnswerError(EndpointError):
    """The endpoint answered 200 with a body that is not a usable chat completion (or an empty answer)."""


class AuthenticationError(EndpointError):
    """HTTP 401/403: the key is wrong or lacks access; nothing more is sent to this endpoint."""


def redact(text: str, secret: str) -> str:
    """``text`` with ``secret`` replaced by ``***`` (pure; a short or empty secret is left alone)."""
    return text.replace(secret, "***") if secret and len(secret) >= 4 else text


def read_api_key(env_name: str) -> str:
    """The API key from the environment variable ``env_name``; raises naming the variable (never the key)."""
    if not env_name:
        raise ValueError("no API-key environment variable named (--api-key-env)")
    key = os.environ.get(env_name, "")
    if not key:
        raise ValueError(
            f"environment variable {env_name} is not set; put the endpoint's API key there "
            f"(for a local server without authentication any value works, e.g. {env_name}=EMPTY)"
        )
    return key


@dataclass
class SamplingSettings:
    """Sampling fields sent with every request; ``None`` leaves the endpoint's default."""

    temperature: float | None = None
    max_tokens: int | None = 2048
    top_p: float | None = None
    seed: int | None = None

    def request_fields(self) -> dict:
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass
class ChatCompletion:
    content: str
    finish_reason: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0


def parse_completion_body(text: str, where: str) -> ChatCompletion:
    """Parse a chat-completions response body; raise :class:`MalformedAnswerError` naming ``where``."""
    head = text[:200].replace("\n", " ")
    try:
        body = json.loads(text)
    except json.JSONDecodeError:
        raise MalformedAnswerError(f"{where}: the endpoint's answer is not JSON (body starts: {head!r})") from None
    if not isinstance(body, dict):
        raise MalformedAnswerError(f"{where}: the endpoint's answer is not a JSON object (body starts: {head!r})")
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        raise MalformedAnswerError(f"{where}: the endpoint's answer has no 'choices' (body starts: {head!r})")
    choice = choices[0]
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(message, dict):
        raise MalformedAnswerError(f"{where}: the endpoint's answer has no 'choices[0].message' (body starts: {head!r})")
    content = message.get("content")
    if not isinstance(content, str):
        raise MalformedAnswerError(
            f"{where}: the endpoint's answer has no string 'choices[0].message.content' "
            f"(got {type(content).__name__}; body starts: {head!r})"
        )
    if not content.strip():
        raise MalformedAnswerError(f"{where}: the endpoint's answer is empty (finish_reason="
                                   f"{choice.get('finish_reason')!r}); not kept as teacher data")
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    return ChatCompletion(
        content=content,
        finish_reason=choice.get("finish_reason"),
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
    )


class ChatEndpoint:
    """An OpenAI-compatible chat endpoint with timeouts and retries (see the module docstring)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        sampling: SamplingSettings | None = None,
        timeout: float = 120.0,
        max_retries: int = 6,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
    ):
        from openai import OpenAI

        self.base_url, self.model = base_url, model
        self.sampling = sampling or SamplingSettings()
        self.timeout, self.max_retries = timeout, max_retries
        self.backoff_base, self.backoff_max = backoff_base, backoff_max
        if max_retries < 0 or timeout <= 0 or backoff_base < 0 or backoff_max < 0:
            raise ValueError(f"max_retries must be >= 0, timeout > 0 and backoffs >= 0; got {max_retries}, {timeout}, "
                             f"{backoff_base}, {backoff_max}")
        # The client's own retries are off: this class retries, counts and backs off itself.
        self._key = read_api_key(api_key_env)
        self._client = OpenAI(api_key=self._key, base_url=base_url, timeout=timeout, max_retries=0)
        self._lock = threading.Lock()
        self.refused: AuthenticationError | None = None
        """The first 401/403; once set, no further request is sent."""
        self.retries = 0
        """Retried attempts so far, all requests together."""

    def _backoff_seconds(self, attempt: int, error) -> float:
        delay = min(self.backoff_max, self.backoff_base * 2**attempt) * random.uniform(0.5, 1.0)
        response = getattr(error, "response", None)
        retry_after = response.headers.get("retry-after") if response is not None else None
        if retry_after:
            try:
                delay = min(self.backoff_max, max(0.0, float(retry_after)))
            except ValueError:
                pass
        return delay

    def complete(self, messages: list, where: str = "request", **overrides) -> ChatCompletion:
        """One chat completion for ``messages``; ``where`` names the prompt in errors (which never
        hold the API key)."""
        if self.refused is not None:
            raise AuthenticationError(f"{where}: not sent: {self.refused}")
        try:
            return self._complete(messages, where, **overrides)
        except EndpointError as err:
            safe = type(err)(redact(str(err), self._key))
            if isinstance(err, AuthenticationError):
                with self._lock:
                    self.refused = self.refused or safe
            raise safe from None

    def _complete(self, messages: list, where: str, **overrides) -> ChatCompletion:
        import openai

        fields = {**self.sampling.request_fields(), **{k: v for k, v in overrides.items() if v is not None}}
        last_problem = ""
        for attempt in range(self.max_retries + 1):
            retry_error = None
            try:
                raw = self._client.chat.completions.with_raw_response.create(
                    model=self.model, messages=messages, **fields
                )
                return parse_completion_body(raw.http_response.text, where)
            except openai.APIStatusError as err:
                status = err.status_code
                last_problem = f"HTTP {status}: {err.message}"
                if status in (401, 403):
                    raise AuthenticationError(
                        f"{where}: the endpoint refused the API key ({last_problem}); check the key and "
                        "the model name, nothing more is sent") from None
                if status not in RETRYABLE_STATUS and status < 500:
                    raise EndpointError(f"{where}: the endpoint refused the request ({last_problem})") from None
                retry_error = err
            except openai.APITimeoutError:
                last_problem = f"no answer within the {self.timeout:g} s timeout"
            except openai.APIConnectionError as err:
                last_problem = f"connection error ({err.__cause__ or err})"
            if attempt == self.max_retries:
                break
            with self._lock:
                self.retries += 1
            time.sleep(self._backoff_seconds(attempt, retry_error))
        raise EndpointError(f"{where}: failed after {self.max_retries + 1} attempts; last error: {last_problem}")


# ----------------------------------------------------------------------------------------------
# Prompt rows and the resumable output file


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


# ----------------------------------------------------------------------------------------------
# Collection


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
    existing = recover_jsonl(output_path) + recover_jsonl(dropped_path)
    others = sorted({str(r.get("teacher")) for r in existing if r.get("teacher") != endpoint.model})
    if others:
        raise ValueError(f"{output_path} already holds answers of teacher {', '.join(others)}, not {endpoint.model}; "
                         "use another --output (one file per teacher) or the same --model to resume")
    done = {r.get("collection_key") for r in existing}

    pending = []
    for row in rows:
        key = collection_key(row.messages, row.index)
        if key in done:
            report.already_done += 1
            continue
        if max_prompt_tokens and count_prompt_tokens is not None:
            if count_prompt_tokens(row.messages) > max_prompt_tokens:
                report.skipped_over_budget += 1
                continue
        pending.append((row, key))

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
                        report.prompt_tokens += completion.prompt_tokens
                        report.completion_tokens += completion.completion_tokens
                        record = teacher_row(row, completion, endpoint.model, key)
                        if drop_truncated and completion.finish_reason == "length":
                            dropped = dropped or JsonlAppender(dropped_path)
                            dropped.append(record)
                            report.dropped_truncated += 1
                        else:
                            output.append(record)
                            report.collected += 1
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
    if report.failed:
        with open(failures_path, "w", encoding="utf-8") as handle:
            for failure in report.failed:
                handle.write(json.dumps(failure, ensure_ascii=False) + "\n")
    elif failures_path.exists():
        failures_path.unlink()
    return report
