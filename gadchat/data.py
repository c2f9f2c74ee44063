"""Teacher data: reading, validation, tokenisation and the deterministic per-step prompt order.

A row holds a prompt (``content``: a list of chat messages, or a string taken as one user turn) and
the teacher's response (``teacher_response``: a string); other layouts are mapped with
``data.prompt_key`` / ``data.response_key`` (e.g. ``instruction`` / ``output``). Files may be JSON
lines, JSON arrays, parquet, a folder of those, a ``datasets.save_to_disk`` folder, or ``hf:NAME``
for a ``datasets`` hub name.

Tokenisation (EOS symmetry, docs/algorithm.md section 3): the prompt is the tokenizer's chat
template with the generation prompt; the teacher response is its text tokens (no special tokens
added) followed by the EOS the student generates at the end of a turn. A student sample ends in the
EOS it generated, so both are scored on the same kind of token.

A malformed row raises :class:`DataError` naming the file, the row and the field, unless
``data.skip_malformed`` is set; then it is counted per reason and reported. Over-long rows are
skipped and counted (``data.overlong=skip``) or stop the run (``error``). Nothing is used silently.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from gadchat.config import DataConfig

KNOWN_ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """A problem with one row of a data file; the message names the file, the row and the field."""

    def __init__(self, source: str, row: int, field_name: str, problem: str, reason: str = "malformed"):
        self.source, self.row, self.field_name, self.problem, self.reason = source, row, field_name, problem, reason
        super().__init__(f"{source}, row {row}, field {field_name!r}: {problem}")


@dataclass
class Example:
    messages: list
    response: str
    prompt_ids: list
    response_ids: list
    """Teacher tokens followed by the EOS token."""
    source: str = ""
    row: int = 0


@dataclass
class DataReport:
    rows_read: int = 0
    rows_used: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples_of_skips: list = field(default_factory=list)
    set_aside: int = 0
    """Rows of the other part of a ``data.eval_split`` (held out from training, or training rows
    left out of the evaluation)."""

    def summary(self) -> str:
        text = f"{self.rows_used}/{self.rows_read} rows used"
        if self.set_aside:
            text += f"; {self.set_aside} in the other part of data.eval_split"
        if self.skipped:
            text += "; skipped: " + ", ".join(f"{reason} x{count}" for reason, count in sorted(self.skipped.items()))
        return text


def is_held_out(messages: list, fraction: float) -> bool:
    """Pure and deterministic: whether a prompt falls in the held-out ``fraction`` of a
    ``data.eval_split`` (sha256 of the prompt messages as canonical JSON, read as a number in
    [0, 1)); the same prompt lands in the same part in training, evaluation and on any machine."""
    if fraction <= 0:
        return False
    import hashlib

    canonical = json.dumps(messages, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    value = int.from_bytes(hashlib.sha256(canonical.encode("utf-8")).digest()[:8], "big") / 2**64
    return value < fraction


def split_part(rows: list, fraction: float, part: str, report: DataReport | None = None) -> list:
    """The ``part`` (``train`` or ``eval``) of ``(source, row, messages, response)`` rows under
    ``data.eval_split = fraction`` (all rows when fraction is 0)."""
    if part not in ("train", "eval"):
        raise ValueError(f"part must be train or eval, got {part!r}")
    if fraction <= 0:
        return list(rows)
    kept = [r for r in rows if is_held_out(r[2], fraction) == (part == "eval")]
    if report is not None:
        report.set_aside += len(rows) - len(kept)
    return kept


# ----------------------------------------------------------------------------------------------
# Reading raw rows


def _expand_files(spec: str) -> list[str]:
    sources = []
    for part in [p.strip() for p in str(spec).split(",") if p.strip()]:
        if part.startswith("hf:"):
            sources.append(part)
            continue
        path = Path(part)
        if path.is_dir():
            if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
                sources.append(str(path))
                continue
            files = sorted(
                p for p in path.iterdir() if p.suffix in (".jsonl", ".json", ".parquet") and p.is_file()
            )
            if not files:
                raise FileNotFoundError(f"data folder {path} holds no .jsonl, .json or .parquet file")
            sources.extend(str(p) for p in files)
        elif path.exists():
            if path.suffix not in (".jsonl", ".json", ".parquet"):
                raise ValueError(f"{path}: not a data file (expected .jsonl, .json or .parquet, a folder of those, "
                                 "a datasets save_to_disk folder or hf:NAME)")
            sources.append(str(path))
        else:
            raise FileNotFoundError(f"data file not found: {path}")
    if not sources:
        raise ValueError("no data files given")
    return sources


def _not_utf8(exc: UnicodeDecodeError) -> str:
    return f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at position {exc.start})"


def _read_jsonl(path: str):
    """Rows of a JSON-lines file; a line that is not UTF-8 or not JSON is a DataError naming the
    line (skippable with ``data.skip_malformed``); a UTF-8 byte-order mark is accepted."""
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                yield line_number, DataError(path, line_number, "<line>", _not_utf8(exc), "not_utf8")
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                yield line_number, DataError(path, line_number, "<line>", f"invalid JSON ({exc.msg})")
                continue
            yield line_number, row


def _read_json_array(path: str) -> list:
    """A file holding one JSON array; errors name the file and the line (the whole file is unusable)."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(path, line, "<file>", _not_utf8(exc) + "; the JSON array cannot be read", "not_utf8") from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(path, exc.lineno, "<file>", f"invalid JSON array ({exc.msg}: line {exc.lineno}, column "
                        f"{exc.colno}; truncated?)") from None
    if not isinstance(rows, list):
        raise DataError(path, 1, "<file>", f"expected a JSON array of rows, got {type(rows).__name__}")
    return rows


def _first_char(path: str) -> str:
    with open(path, "rb") as handle:
        head = handle.read(64).decode("utf-8-sig", errors="replace").lstrip()
    return head[:1]


def iter_raw_rows(spec: str, split: str = "train"):
    """Yield ``(source, row_number, row_or_DataError)``; row numbers are 1-based."""
    for source in _expand_files(spec):
        if source.endswith(".jsonl"):
            for number, row in _read_jsonl(source):
                yield source, number, row
        elif source.endswith(".json"):
            if _first_char(source) != "[":  # JSON lines stored under .json
                for number, row in _read_jsonl(source):
                    yield source, number, row
                continue
            for number, row in enumerate(_read_json_array(source), start=1):
                yield source, number, row
        elif source.endswith(".parquet"):
            import pyarrow.parquet as pq

            for number, row in enumerate(pq.read_table(source).to_pylist(), start=1):
                yield source, number, row
        else:
            import datasets

            if source.startswith("hf:"):
                dataset = datasets.load_dataset(source[3:], split=split)
            else:
                dataset = datasets.load_from_disk(source)
                if isinstance(dataset, datasets.DatasetDict):
                    dataset = dataset[split]
            for number, row in enumerate(dataset, start=1):
                yield source, number, row


# ----------------------------------------------------------------------------------------------
# Validation


def normalize_prompt(value, source: str, row: int, key: str, system_prompt: str = "") -> list:
    """Return the prompt as a list of ``{"role", "content"}`` messages or raise DataError."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(source, row, key, "empty prompt", "empty_prompt")
        messages = [{"role": "user", "content": value}]
    elif isinstance(value, (list, tuple)):
        if not value:
            raise DataError(source, row, key, "empty message list", "empty_prompt")
        messages = []
        for turn, message in enumerate(value):
            where = f"{key}[{turn}]"
            if not isinstance(message, dict):
                raise DataError(source, row, where, f"a message must be an object, got {type(message).__name__}", "bad_message")
            role, content = message.get("role"), message.get("content")
            if role not in KNOWN_ROLES:
                raise DataError(source, row, f"{where}.role", f"unknown role {role!r} (known: {', '.join(KNOWN_ROLES)})", "unknown_role")
            if not isinstance(content, str):
                raise DataError(source, row, f"{where}.content", f"content must be a string, got {type(content).__name__}", "bad_message")
            messages.append({"role": role, "content": content})
        if not any(m["role"] == "user" for m in messages):
            raise DataError(source, row, key, "the conversation has no user turn", "no_user_turn")
        if messages[-1]["role"] == "assistant":
            raise DataError(source, row, key, "the conversation ends with an assistant turn; nothing to answer", "ends_with_assistant")
    elif value is None:
        raise DataError(source, row, key, "missing field", "missing_field")
    else:
        raise DataError(source, row, key, f"expected a list of messages or a string, got {type(value).__name__}", "wrong_type")
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    return messages


def normalize_response(value, source: str, row: int, key: str) -> str:
    if value is None:
        raise DataError(source, row, key, "missing field", "missing_field")
    if not isinstance(value, str):
        raise DataError(source, row, key, f"expected a string, got {type(value).__name__}", "wrong_type")
    if not value.strip():
        raise DataError(source, row, key, "empty teacher response", "empty_response")
    return value


def read_prompts(cfg: DataConfig, spec: str, require_response: bool = True, report: DataReport | None = None):
    """Validated ``(source, row, messages, response_or_None)`` tuples from ``spec``."""
    report = report if report is not None else DataReport()
    out = []
    for source, number, row in iter_raw_rows(spec, cfg.train_split):
        report.rows_read += 1
        try:
            if isinstance(row, DataError):
                raise row
            if not isinstance(row, dict):
                raise DataError(source, number, "<row>", f"expected an object, got {type(row).__name__}", "bad_row")
            if cfg.prompt_key not in row:
                raise DataError(source, number, cfg.prompt_key, "missing field", "missing_field")
            messages = normalize_prompt(row.get(cfg.prompt_key), source, number, cfg.prompt_key, cfg.system_prompt)
            response = None
            if require_response:
                if cfg.response_key not in row:
                    raise DataError(source, number, cfg.response_key, "missing field", "missing_field")
                response = normalize_response(row.get(cfg.response_key), source, number, cfg.response_key)
            elif isinstance(row.get(cfg.response_key), str):
                response = row[cfg.response_key]
        except DataError as err:
            if not cfg.skip_malformed:
                raise
            report.skipped[err.reason] += 1
            if len(report.examples_of_skips) < 5:
                report.examples_of_skips.append(str(err))
            continue
        out.append((source, number, messages, response))
    return out


# ----------------------------------------------------------------------------------------------
# Tokenisation


def eos_token_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; GAD needs the EOS that ends a student turn")
    return tokenizer.eos_token_id


def encode_prompt(tokenizer, messages: list) -> list:
    """Token ids of the chat-templated prompt, ending with the assistant generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; pass --model.tokenizer_path of a chat model")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_response(tokenizer, response: str) -> list:
    """Teacher response tokens followed by the student's EOS (EOS symmetry).

    The response is encoded as text: a literal ``<|im_end|>`` (or any special-token string) inside
    a teacher answer becomes its ordinary text tokens, never the special token, so the only EOS is
    the one appended (``split_special_tokens=True``)."""
    ids = tokenizer(response, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return ids + [eos_token_id(tokenizer)]


def eval_data_config(cfg: DataConfig) -> DataConfig:
    """Pure: ``cfg`` with the key mapping of the evaluation rows. The held-out part of a
    ``data.eval_split`` is read like the training rows; ``eval_files`` with ``eval_prompt_key`` /
    ``eval_response_key``, which default to the training keys, except that the shipped default eval
    file keeps its published keys whatever the training mapping is."""
    import dataclasses

    if cfg.eval_split > 0:
        return dataclasses.replace(cfg)
    published = DataConfig()
    shipped = cfg.eval_files == published.eval_files
    return dataclasses.replace(
        cfg,
        prompt_key=cfg.eval_prompt_key or (published.prompt_key if shipped else cfg.prompt_key),
        response_key=cfg.eval_response_key or (published.response_key if shipped else cfg.response_key))


def load_teacher_data(cfg: DataConfig, tokenizer, spec: str | None = None, max_rows: int | None = None,
                      part: str = "train"):
    """Read, validate and tokenise teacher data; returns ``(examples, report)``. With
    ``data.eval_split`` the rows of ``data.train_files`` are split and ``part`` chooses which."""
    report = DataReport()
    rows = read_prompts(cfg, spec or cfg.train_files, require_response=True, report=report)
    if spec is None or spec == cfg.train_files:
        rows = split_part(rows, cfg.eval_split, part, report)
    limit = cfg.max_rows if max_rows is None else max_rows
    examples = []
    for source, number, messages, response in rows:
        prompt_ids = encode_prompt(tokenizer, messages)
        response_ids = encode_response(tokenizer, response)
        problem = None
        if len(prompt_ids) > cfg.max_prompt_tokens:
            problem = ("prompt_too_long", cfg.prompt_key, f"{len(prompt_ids)} prompt tokens > max_prompt_tokens={cfg.max_prompt_tokens}")
        elif len(response_ids) > cfg.max_response_tokens:
            problem = ("response_too_long", cfg.response_key, f"{len(response_ids)} response tokens > max_response_tokens={cfg.max_response_tokens}")
        if problem:
            reason, key, text = problem
            if cfg.overlong == "error":
                raise DataError(source, number, key, text + " (set --data.overlong skip to drop such rows)", reason)
            report.skipped[reason] += 1
            continue
        examples.append(Example(messages, response, prompt_ids, response_ids, source, number))
        if limit and len(examples) >= limit:
            break
    report.rows_used = len(examples)
    if not examples:
        raise ValueError(f"no usable teacher data in {spec or cfg.train_files}: {report.summary()}")
    return examples, report


# ----------------------------------------------------------------------------------------------
# Prompt order


class PromptSchedule:
    """Which prompts each rank trains on at each global step, as a pure function of the step.

    Epoch ``e`` visits a permutation of the rows drawn from ``seed + e``; the last incomplete batch
    of an epoch is dropped. Being stateless in the step, resuming at step ``k`` sees exactly the
    prompts an uninterrupted run sees.
    """

    def __init__(self, num_rows: int, prompts_per_step: int, world_size: int, rank: int, seed: int, shuffle: bool = True):
        if prompts_per_step % world_size:
            raise ValueError(f"trainer.prompts_per_step={prompts_per_step} must be divisible by the {world_size} ranks")
        if num_rows < prompts_per_step:
            raise ValueError(f"only {num_rows} usable rows, fewer than trainer.prompts_per_step={prompts_per_step}")
        self.num_rows, self.prompts_per_step = num_rows, prompts_per_step
        self.world_size, self.rank, self.seed, self.shuffle = world_size, rank, seed, shuffle
        self.steps_per_epoch = num_rows // prompts_per_step

    def total_steps(self, epochs: float, max_steps: int = 0) -> int:
        steps = max(1, int(round(self.steps_per_epoch * epochs)))
        return min(steps, max_steps) if max_steps else steps

    def _order(self, epoch: int):
        import torch

        if not self.shuffle:
            return list(range(self.num_rows))
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_rows, generator=generator).tolist()

    def global_indices(self, step: int) -> list:
        epoch, position = divmod(step, self.steps_per_epoch)
        order = self._order(epoch)
        return order[position * self.prompts_per_step : (position + 1) * self.prompts_per_step]

    def rank_indices(self, step: int) -> list:
        per_rank = self.prompts_per_step // self.world_size
        indices = self.global_indices(step)
        return indices[self.rank * per_rank : (self.rank + 1) * per_rank]

    def epoch_of(self, step: int) -> float:
        return step / self.steps_per_epoch
