"""Teacher data: validation with file/row/field errors, skipping and reporting, key mapping, file
formats, EOS symmetry of the tokenisation, and the deterministic per-step prompt order."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from gadchat.config import DataConfig
from gadchat.data import (DataError, PromptSchedule, encode_prompt, encode_response, iter_raw_rows,
                          load_teacher_data, read_prompts)

REPO = Path(__file__).resolve().parent.parent
SHIPPED_TRAIN = REPO / "data" / "alpaca_eval_gpt4o" / "train.jsonl"
GENERATION_PROMPT = "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from gadchat.tiny import build_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(folder)
    return AutoTokenizer.from_pretrained(folder)


def good_row(i: int) -> dict:
    return {"content": [{"role": "user", "content": f"Question number {i}?"}], "teacher_response": f"Answer {i}."}


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines),
                    encoding="utf-8")
    return path


# (id, row as written on line 2, field named in the error, reason counted when skipped)
MALFORMED = [
    ("invalid_json", '{"content": [{"role": "user", "content": "hi"}], "teacher_response": ', "<line>", "malformed"),
    ("row_not_object", [1, 2, 3], "<row>", "bad_row"),
    ("row_is_string", "\"just a string\"", "<row>", "bad_row"),
    ("missing_prompt", {"teacher_response": "An answer."}, "content", "missing_field"),
    ("null_prompt", {"content": None, "teacher_response": "An answer."}, "content", "missing_field"),
    ("missing_response", {"content": "A question?"}, "teacher_response", "missing_field"),
    ("null_response", {"content": "A question?", "teacher_response": None}, "teacher_response", "missing_field"),
    ("response_not_string", {"content": "A question?", "teacher_response": 42}, "teacher_response", "wrong_type"),
    ("response_is_list", {"content": "A question?", "teacher_response": ["a"]}, "teacher_response", "wrong_type"),
    ("empty_response", {"content": "A question?", "teacher_response": ""}, "teacher_response", "empty_response"),
    ("whitespace_response", {"content": "A question?", "teacher_response": " \n\t "}, "teacher_response",
     "empty_response"),
    ("prompt_int", {"content": 7, "teacher_response": "An answer."}, "content", "wrong_type"),
    ("prompt_dict", {"content": {"role": "user", "content": "hi"}, "teacher_response": "An answer."}, "content",
     "wrong_type"),
    ("empty_prompt_string", {"content": "   ", "teacher_response": "An answer."}, "content", "empty_prompt"),
    ("empty_message_list", {"content": [], "teacher_response": "An answer."}, "content", "empty_prompt"),
    ("message_not_object", {"content": ["hello"], "teacher_response": "An answer."}, "content[0]", "bad_message"),
    ("unknown_role", {"content": [{"role": "robot", "content": "hi"}], "teacher_response": "An answer."},
     "content[0].role", "unknown_role"),
    ("missing_role", {"content": [{"content": "hi"}], "teacher_response": "An answer."}, "content[0].role",
     "unknown_role"),
    ("non_string_content", {"content": [{"role": "system", "content": "s"}, {"role": "user", "content": ["hi"]}],
                            "teacher_response": "An answer."}, "content[1].content", "bad_message"),
    ("no_user_turn", {"content": [{"role": "system", "content": "Be nice."}], "teacher_response": "An answer."},
     "content", "no_user_turn"),
    ("ends_with_assistant", {"content": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                             "teacher_response": "An answer."}, "content", "ends_with_assistant"),
]


@pytest.mark.parametrize("case", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_row_raises_naming_file_row_and_field(tmp_path, tokenizer, case):
    name, bad, field, reason = case
    path = write_jsonl(tmp_path / f"{name}.jsonl", [good_row(1), bad, good_row(3)])
    with pytest.raises(DataError) as info:
        load_teacher_data(DataConfig(), tokenizer, spec=str(path))
    err = info.value
    message = str(err)
    assert str(path) in message
    assert "row 2" in message
    assert f"field {field!r}" in message
    assert (err.source, err.row, err.field_name, err.reason) == (str(path), 2, field, reason)


def test_blank_lines_are_ignored_and_row_numbers_are_file_lines(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "blank.jsonl", [good_row(1), "", "   ", {"content": 5, "teacher_response": "x"}])
    with pytest.raises(DataError, match=r"row 4, field 'content'"):
        load_teacher_data(DataConfig(), tokenizer, spec=str(path))


def test_skip_malformed_counts_each_reason_and_keeps_only_good_rows(tmp_path, tokenizer):
    lines = []
    good_lines = []
    for i, case in enumerate(MALFORMED):
        lines.append(good_row(100 + i))
        good_lines.append(len(lines))
        lines.append(case[1])
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)
    cfg = DataConfig(skip_malformed=True)
    examples, report = load_teacher_data(cfg, tokenizer, spec=str(path))

    expected = Counter(case[3] for case in MALFORMED)
    assert report.skipped == expected
    assert report.rows_read == 2 * len(MALFORMED)
    assert report.rows_used == len(MALFORMED)
    assert [e.row for e in examples] == good_lines
    assert [e.response for e in examples] == [f"Answer {100 + i}." for i in range(len(MALFORMED))]
    assert all(e.source == str(path) for e in examples)
    summary = report.summary()
    assert summary.startswith(f"{len(MALFORMED)}/{2 * len(MALFORMED)} rows used; skipped: ")
    for reason, count in expected.items():
        assert f"{reason} x{count}" in summary
    assert 0 < len(report.examples_of_skips) <= 5
    assert str(path) in report.examples_of_skips[0] and "row 2" in report.examples_of_skips[0]


def test_only_malformed_rows_is_a_clear_error_when_skipping(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"content": 1, "teacher_response": "x"}, [1]])
    with pytest.raises(ValueError, match=r"no usable teacher data.*0/2 rows used; skipped: bad_row x1, wrong_type x1"):
        load_teacher_data(DataConfig(skip_malformed=True), tokenizer, spec=str(path))


def test_read_prompts_without_response_requirement(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"content": "Q1?"}, {"content": "Q2?", "teacher_response": "A2"},
                                                    {"content": "Q3?", "teacher_response": 3}])
    rows = read_prompts(DataConfig(), str(path), require_response=False)
    assert [(r[1], r[2], r[3]) for r in rows] == [
        (1, [{"role": "user", "content": "Q1?"}], None),
        (2, [{"role": "user", "content": "Q2?"}], "A2"),
        (3, [{"role": "user", "content": "Q3?"}], None),
    ]


# ----------------------------------------------------------------------------------------------
# Over-long rows


def overlong_file(tmp_path: Path, tokenizer):
    short = {"content": "Hi?", "teacher_response": "Hello there."}
    long_prompt = {"content": "word " * 200, "teacher_response": "Fine."}
    long_response = {"content": "Tell me.", "teacher_response": "story " * 200}
    path = write_jsonl(tmp_path / "overlong.jsonl", [short, long_prompt, long_response])
    limit = max(len(encode_prompt(tokenizer, [{"role": "user", "content": m}])) for m in ("Hi?", "Tell me."))
    return path, limit


def test_overlong_rows_skipped_and_counted(tmp_path, tokenizer):
    path, limit = overlong_file(tmp_path, tokenizer)
    cfg = DataConfig(max_prompt_tokens=limit, max_response_tokens=20, overlong="skip")
    examples, report = load_teacher_data(cfg, tokenizer, spec=str(path))
    assert [e.row for e in examples] == [1]
    assert report.skipped == Counter({"prompt_too_long": 1, "response_too_long": 1})
    assert report.summary() == "1/3 rows used; skipped: prompt_too_long x1, response_too_long x1"


def test_overlong_error_names_the_field(tmp_path, tokenizer):
    path, limit = overlong_file(tmp_path, tokenizer)
    cfg = DataConfig(max_prompt_tokens=limit, max_response_tokens=20, overlong="error")
    with pytest.raises(DataError) as info:
        load_teacher_data(cfg, tokenizer, spec=str(path))
    assert (info.value.row, info.value.field_name, info.value.reason) == (2, "content", "prompt_too_long")
    assert str(path) in str(info.value) and "max_prompt_tokens" in str(info.value)
    cfg = DataConfig(max_prompt_tokens=4096, max_response_tokens=20, overlong="error")
    with pytest.raises(DataError) as info:
        load_teacher_data(cfg, tokenizer, spec=str(path))
    assert (info.value.row, info.value.field_name, info.value.reason) == (3, "teacher_response", "response_too_long")
    assert "row 3" in str(info.value) and "max_response_tokens" in str(info.value)


def test_overlong_limits_are_inclusive_and_count_the_eos(tmp_path, tokenizer):
    text = "A short teacher answer."
    path = write_jsonl(tmp_path / "one.jsonl", [{"content": "Q?", "teacher_response": text}])
    n_text = len(tokenizer(text, add_special_tokens=False).input_ids)
    n_prompt = len(encode_prompt(tokenizer, [{"role": "user", "content": "Q?"}]))
    examples, _ = load_teacher_data(DataConfig(max_prompt_tokens=n_prompt, max_response_tokens=n_text + 1),
                                    tokenizer, spec=str(path))
    assert len(examples[0].response_ids) == n_text + 1
    with pytest.raises(DataError, match="response tokens"):
        load_teacher_data(DataConfig(max_prompt_tokens=n_prompt, max_response_tokens=n_text, overlong="error"),
                          tokenizer, spec=str(path))
    with pytest.raises(DataError, match="prompt tokens"):
        load_teacher_data(DataConfig(max_prompt_tokens=n_prompt - 1, overlong="error"), tokenizer, spec=str(path))


def test_max_rows_limits_examples(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "many.jsonl", [good_row(i) for i in range(10)])
    examples, report = load_teacher_data(DataConfig(max_rows=4), tokenizer, spec=str(path))
    assert [e.row for e in examples] == [1, 2, 3, 4]
    assert report.rows_used == 4


# ----------------------------------------------------------------------------------------------
# Key mapping and system prompt


def test_instruction_output_keys_and_string_prompt(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Name a color.", "output": "Blue."},
                                                   {"instruction": "Name a fruit.", "output": "Apple.", "input": ""}])
    cfg = DataConfig(prompt_key="instruction", response_key="output")
    examples, _ = load_teacher_data(cfg, tokenizer, spec=str(path))
    assert [e.messages for e in examples] == [[{"role": "user", "content": "Name a color."}],
                                              [{"role": "user", "content": "Name a fruit."}]]
    assert [e.response for e in examples] == ["Blue.", "Apple."]
    text = tokenizer.decode(examples[0].prompt_ids)
    assert text == "<|im_start|>user\nName a color.<|im_end|>\n<|im_start|>assistant\n"
    # the default keys do not exist in these rows: a clear error naming the key
    with pytest.raises(DataError, match=r"row 1, field 'content': missing field"):
        load_teacher_data(DataConfig(), tokenizer, spec=str(path))


def test_system_prompt_is_prepended_unless_present(tmp_path, tokenizer):
    rows = [{"instruction": "Name a color.", "output": "Blue."},
            {"instruction": [{"role": "system", "content": "Own system."}, {"role": "user", "content": "Hi"}],
             "output": "Hello."}]
    path = write_jsonl(tmp_path / "sys.jsonl", rows)
    cfg = DataConfig(prompt_key="instruction", response_key="output", system_prompt="Be brief.")
    examples, _ = load_teacher_data(cfg, tokenizer, spec=str(path))
    assert examples[0].messages == [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "Name a color."}]
    assert examples[1].messages == rows[1]["instruction"]
    assert tokenizer.decode(examples[0].prompt_ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a color.<|im_end|>\n<|im_start|>assistant\n")


# ----------------------------------------------------------------------------------------------
# File formats

FORMAT_ROWS = [
    {"content": [{"role": "user", "content": "First question?"}], "teacher_response": "First answer."},
    {"content": [{"role": "system", "content": "Sys."}, {"role": "user", "content": "Second?"}],
     "teacher_response": "Second answer."},
    {"content": [{"role": "user", "content": "Third?"}], "teacher_response": "Third answer."},
]


def summarise(examples):
    return [(e.messages, e.response, e.prompt_ids, e.response_ids) for e in examples]


@pytest.fixture(scope="module")
def reference(tokenizer, tmp_path_factory):
    path = write_jsonl(tmp_path_factory.mktemp("ref") / "rows.jsonl", FORMAT_ROWS)
    examples, _ = load_teacher_data(DataConfig(), tokenizer, spec=str(path))
    assert [e.messages for e in examples] == [r["content"] for r in FORMAT_ROWS]
    return summarise(examples)


def write_parquet(path: Path, rows: list) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_parquet(tmp_path, tokenizer, reference):
    path = write_parquet(tmp_path / "rows.parquet", FORMAT_ROWS)
    examples, report = load_teacher_data(DataConfig(), tokenizer, spec=str(path))
    assert summarise(examples) == reference
    assert report.rows_read == 3 and [e.row for e in examples] == [1, 2, 3]


def test_parquet_malformed_row_named(tmp_path, tokenizer):
    rows = [FORMAT_ROWS[0], {"content": FORMAT_ROWS[0]["content"], "teacher_response": None}]
    path = write_parquet(tmp_path / "bad.parquet", rows)
    with pytest.raises(DataError, match=r"bad\.parquet, row 2, field 'teacher_response'"):
        load_teacher_data(DataConfig(), tokenizer, spec=str(path))


def test_json_array_file(tmp_path, tokenizer, reference):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(FORMAT_ROWS, indent=2), encoding="utf-8")
    examples, _ = load_teacher_data(DataConfig(), tokenizer, spec=str(path))
    assert summarise(examples) == reference
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([FORMAT_ROWS[0], "oops"]), encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.json, row 2, field '<row>'"):
        load_teacher_data(DataConfig(), tokenizer, spec=str(bad))


def test_json_lines_under_json_suffix(tmp_path, tokenizer, reference):
    path = write_jsonl(tmp_path / "rows.json", FORMAT_ROWS)
    examples, _ = load_teacher_data(DataConfig(), tokenizer, spec=str(path))
    assert summarise(examples) == reference


def test_folder_of_files_and_comma_list(tmp_path, tokenizer, reference):
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", FORMAT_ROWS[:1])
    (folder / "b.json").write_text(json.dumps(FORMAT_ROWS[1:2]), encoding="utf-8")
    write_parquet(folder / "c.parquet", FORMAT_ROWS[2:])
    (folder / "README.txt").write_text("not data", encoding="utf-8")
    examples, report = load_teacher_data(DataConfig(), tokenizer, spec=str(folder))
    assert summarise(examples) == reference
    assert [(Path(e.source).name, e.row) for e in examples] == [("a.jsonl", 1), ("b.json", 1), ("c.parquet", 1)]
    assert report.rows_read == 3
    spec = f"{folder / 'a.jsonl'}, {folder / 'c.parquet'}"
    examples, _ = load_teacher_data(DataConfig(), tokenizer, spec=spec)
    assert [e.response for e in examples] == ["First answer.", "Third answer."]


def test_missing_file_and_empty_folder_are_clear_errors(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="data file not found"):
        load_teacher_data(DataConfig(), tokenizer, spec=str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no"):
        load_teacher_data(DataConfig(), tokenizer, spec=str(tmp_path / "empty"))


def test_datasets_save_to_disk_folder(tmp_path, tokenizer, reference):
    import datasets

    folder = tmp_path / "hf_dataset"
    datasets.Dataset.from_list(FORMAT_ROWS).save_to_disk(str(folder))
    examples, _ = load_teacher_data(DataConfig(), tokenizer, spec=str(folder))
    assert summarise(examples) == reference
    dict_folder = tmp_path / "hf_dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(FORMAT_ROWS[1:]),
                          "test": datasets.Dataset.from_list(FORMAT_ROWS[:1])}).save_to_disk(str(dict_folder))
    examples, _ = load_teacher_data(DataConfig(), tokenizer, spec=str(dict_folder))
    assert summarise(examples) == reference[1:]
    examples, _ = load_teacher_data(DataConfig(train_split="test"), tokenizer, spec=str(dict_folder))
    assert summarise(examples) == reference[:1]


# ----------------------------------------------------------------------------------------------
# Tokenisation and EOS symmetry


def test_encode_response_is_text_tokens_plus_eos(tokenizer):
    eos = tokenizer.eos_token_id
    assert tokenizer.eos_token == "<|im_end|>"
    for text in ["Hello world.", "Line one\nLine two\n", "  spaced  ", "Émoji 🙂 and ünïcode"]:
        ids = encode_response(tokenizer, text)
        assert ids == tokenizer(text, add_special_tokens=False).input_ids + [eos]
        assert ids.count(eos) == 1 and ids[-1] == eos
        assert tokenizer.decode(ids[:-1]) == text


def test_encode_prompt_ends_with_generation_prompt(tokenizer):
    messages = [{"role": "system", "content": "S."}, {"role": "user", "content": "Q?"}]
    ids = encode_prompt(tokenizer, messages)
    text = "<|im_start|>system\nS.<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n" + GENERATION_PROMPT
    assert ids == tokenizer(text, add_special_tokens=False).input_ids
    suffix = tokenizer(GENERATION_PROMPT, add_special_tokens=False).input_ids
    assert ids[-len(suffix):] == suffix
    assert suffix[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.decode(ids) == text


def test_tokenizer_without_chat_template_or_eos_is_an_error(tokenizer):
    import copy

    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        encode_prompt(bare, [{"role": "user", "content": "Q?"}])
    no_eos = copy.deepcopy(tokenizer)
    no_eos.eos_token = None
    with pytest.raises(ValueError, match="no eos_token"):
        encode_response(no_eos, "A.")


def test_shipped_data_loads_with_eos_symmetry(tokenizer):
    examples, report = load_teacher_data(DataConfig(), tokenizer, spec=str(SHIPPED_TRAIN))
    with open(SHIPPED_TRAIN, encoding="utf-8") as handle:
        raw = [json.loads(line) for line in handle if line.strip()]
    assert report.rows_read == len(raw) == 700
    # nothing malformed in the shipped file; only the length limits may drop rows
    assert set(report.skipped) <= {"prompt_too_long", "response_too_long"}
    assert report.rows_used + sum(report.skipped.values()) == 700
    assert report.rows_used == len(examples) > 600
    suffix = tokenizer(GENERATION_PROMPT, add_special_tokens=False).input_ids
    eos = tokenizer.eos_token_id
    for example in examples:
        row = raw[example.row - 1]
        assert example.response == row["teacher_response"]
        assert example.messages == row["content"]
        assert example.response_ids == tokenizer(row["teacher_response"], add_special_tokens=False).input_ids + [eos]
        assert example.prompt_ids[-len(suffix):] == suffix
        assert len(example.prompt_ids) <= 2048 and len(example.response_ids) <= 1536
        assert eos not in example.response_ids[:-1]


# ----------------------------------------------------------------------------------------------
# Prompt schedule


def test_schedule_is_deterministic_per_step():
    a = PromptSchedule(50, 8, 1, 0, seed=7)
    b = PromptSchedule(50, 8, 1, 0, seed=7)
    for step in range(20):
        assert a.global_indices(step) == b.global_indices(step) == a.global_indices(step)
        assert len(a.global_indices(step)) == 8
    assert PromptSchedule(50, 8, 1, 0, seed=8).global_indices(0) != a.global_indices(0)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_ranks_get_disjoint_equal_slices_of_the_global_batch(world_size):
    schedules = [PromptSchedule(64, 8, world_size, rank, seed=3) for rank in range(world_size)]
    for step in range(12):
        slices = [s.rank_indices(step) for s in schedules]
        assert all(len(part) == 8 // world_size for part in slices)
        joined = [i for part in slices for i in part]
        assert len(set(joined)) == 8
        assert joined == schedules[0].global_indices(step)


def test_epoch_visits_each_row_at_most_once_and_epochs_differ():
    schedule = PromptSchedule(50, 8, 2, 1, seed=42)
    assert schedule.steps_per_epoch == 6  # the last incomplete batch (2 rows) is dropped
    epochs = []
    for epoch in range(3):
        order = [i for step in range(6 * epoch, 6 * epoch + 6) for i in schedule.global_indices(step)]
        assert len(order) == 48 and len(set(order)) == 48 and set(order) <= set(range(50))
        epochs.append(order)
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != epochs[2]
    assert schedule.epoch_of(9) == 1.5


def test_unshuffled_schedule_is_sequential():
    schedule = PromptSchedule(10, 4, 2, 1, seed=0, shuffle=False)
    assert schedule.global_indices(0) == [0, 1, 2, 3]
    assert schedule.rank_indices(1) == [6, 7]
    assert schedule.global_indices(2) == [0, 1, 2, 3]  # epoch 2 starts over


def test_indivisible_prompts_per_step_and_too_few_rows_raise():
    with pytest.raises(ValueError, match=r"prompts_per_step=10 must be divisible by the 3 ranks"):
        PromptSchedule(100, 10, 3, 0, seed=0)
    with pytest.raises(ValueError, match=r"only 5 usable rows, fewer than trainer.prompts_per_step=8"):
        PromptSchedule(5, 8, 1, 0, seed=0)


def test_resuming_at_a_step_sees_the_same_prompts():
    uninterrupted = PromptSchedule(40, 4, 2, 0, seed=11)
    seen = {step: uninterrupted.rank_indices(step) for step in range(25)}
    resumed = PromptSchedule(40, 4, 2, 0, seed=11)  # a fresh process after a restart
    for step in range(13, 25):
        assert resumed.rank_indices(step) == seen[step]


def test_total_steps():
    schedule = PromptSchedule(50, 8, 1, 0, seed=0)
    assert schedule.total_steps(1.0) == 6
    assert schedule.total_steps(2.0) == 12
    assert schedule.total_steps(0.5) == 3
    assert schedule.total_steps(2.0, max_steps=5) == 5
    assert schedule.total_steps(0.01) == 1


def test_iter_raw_rows_numbers_rows_per_file(tmp_path):
    write_jsonl(tmp_path / "x.jsonl", [good_row(1), good_row(2)])
    rows = list(iter_raw_rows(str(tmp_path / "x.jsonl")))
    assert [(Path(s).name, n, r["teacher_response"]) for s, n, r in rows] == [("x.jsonl", 1, "Answer 1."),
                                                                            ("x.jsonl", 2, "Answer 2.")]


# ----------------------------------------------------------------------------------------------
# Issue 10: encodings, truncated files, non-data files, the deterministic eval split


def test_non_utf8_line_names_file_and_row_and_is_skippable(tmp_path, tokenizer):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(good_row(1)).encode() + b"\n"
                     + '{"content": "caf\xe9?", "teacher_response": "Oui."}'.encode("latin-1") + b"\n"
                     + json.dumps(good_row(3)).encode() + b"\n")
    with pytest.raises(DataError, match=r"latin1.jsonl, row 2, field '<line>': not UTF-8 text \(byte 0xe9"):
        load_teacher_data(DataConfig(), tokenizer, spec=str(path))
    examples, report = load_teacher_data(DataConfig(skip_malformed=True), tokenizer, spec=str(path))
    assert [e.row for e in examples] == [1, 3] and report.skipped == Counter({"not_utf8": 1})


def test_utf8_byte_order_mark_is_accepted(tmp_path, tokenizer):
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + json.dumps(good_row(1)).encode() + b"\n" + json.dumps(good_row(2)).encode())
    assert len(load_teacher_data(DataConfig(), tokenizer, spec=str(jsonl))[0]) == 2
    array = tmp_path / "bom.json"
    array.write_bytes(b"\xef\xbb\xbf  " + json.dumps([good_row(1)]).encode())
    assert len(load_teacher_data(DataConfig(), tokenizer, spec=str(array))[0]) == 1


def test_truncated_json_array_and_non_data_file_name_the_file(tmp_path, tokenizer):
    array = tmp_path / "cut.json"
    array.write_text(json.dumps([good_row(1), good_row(2)], indent=1)[:-30], encoding="utf-8")
    with pytest.raises(DataError, match=r"cut.json, row \d+, field '<file>': invalid JSON array .*truncated\?"):
        load_teacher_data(DataConfig(), tokenizer, spec=str(array))
    text_file = tmp_path / "train.txt"
    text_file.write_text("hello\n")
    with pytest.raises(ValueError, match=r"train.txt: not a data file \(expected .jsonl, .json or .parquet"):
        load_teacher_data(DataConfig(), tokenizer, spec=str(text_file))


def test_eval_split_is_deterministic_disjoint_and_shared_by_training_and_evaluation(tokenizer):
    from gadchat.data import is_held_out

    cfg = DataConfig(train_files=str(SHIPPED_TRAIN), eval_split=0.1, max_prompt_tokens=100000,
                     max_response_tokens=100000)
    train, train_report = load_teacher_data(cfg, tokenizer)
    held, held_report = load_teacher_data(cfg, tokenizer, part="eval")
    assert train_report.rows_read == held_report.rows_read == 700
    assert len(train) + len(held) == 700 and 40 <= len(held) <= 100
    assert not {e.row for e in train} & {e.row for e in held}
    assert all(is_held_out(e.messages, 0.1) for e in held) and not any(is_held_out(e.messages, 0.1) for e in train)
    again, _ = load_teacher_data(cfg, tokenizer, part="eval")
    assert [e.row for e in again] == [e.row for e in held]
    assert "in the other part of data.eval_split" in train_report.summary()
    assert len(load_teacher_data(DataConfig(train_files=str(SHIPPED_TRAIN), max_prompt_tokens=100000,
                                            max_response_tokens=100000), tokenizer)[0]) == 700
