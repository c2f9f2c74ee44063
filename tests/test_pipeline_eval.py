"""Issue 10, own data end to end: which evaluation set the pipeline uses and with which keys, and
the key mapping of the trainer's evaluation rows (pure functions, no launch)."""

from __future__ import annotations

import argparse

import pytest

from applications.run_pipeline import eval_plan
from gadchat.config import DataConfig
from gadchat.data import eval_data_config


def plan(extra, eval_files="", prompt_key="", response_key=""):
    return eval_plan(argparse.Namespace(eval_files=eval_files, eval_prompt_key=prompt_key,
                                        eval_response_key=response_key), extra)


def test_default_is_the_shipped_split_with_published_keys_whatever_the_training_keys():
    flags, stage_flags, text = plan(["--data.prompt_key", "instruction", "--data.response_key", "output"])
    assert flags == ["--eval-sets", "heldout"] and stage_flags == []
    assert "shipped GPT-4o held-out split" in text and "--eval-files" in text


def test_own_eval_file_defaults_to_the_training_keys_and_reaches_the_stages():
    flags, stage_flags, text = plan(["--data.prompt_key", "instruction"], eval_files="mine_test.jsonl")
    assert flags == ["--eval-sets", "heldout=mine_test.jsonl", "--prompt-key", "instruction",
                     "--response-key", "teacher_response"]
    assert stage_flags[:2] == ["--data.eval_files", "mine_test.jsonl"] and "instruction" in stage_flags
    flags, _, _ = plan([], eval_files="t.jsonl", prompt_key="question", response_key="answer")
    assert flags[-4:] == ["--prompt-key", "question", "--response-key", "answer"]


def test_eval_split_evaluates_the_held_out_part_of_the_training_file():
    flags, stage_flags, text = plan(["--data.train_files", "mine.jsonl", "--data.prompt_key", "instruction",
                                     "--data.eval_split", "0.1"])
    assert flags == ["--eval-sets", "heldout=mine.jsonl", "--prompt-key", "instruction", "--response-key",
                     "teacher_response", "--eval-split", "0.1"]
    assert "held-out 0.1 of mine.jsonl" in text


def test_eval_keys_without_eval_files_are_refused():
    with pytest.raises(SystemExit, match="need --eval-files"):
        plan([], prompt_key="question")


def test_trainer_eval_rows_use_their_own_key_mapping():
    shipped = eval_data_config(DataConfig(prompt_key="instruction", response_key="output"))
    assert (shipped.prompt_key, shipped.response_key) == ("content", "teacher_response")
    own = eval_data_config(DataConfig(prompt_key="instruction", response_key="output", eval_files="mine_test.jsonl"))
    assert (own.prompt_key, own.response_key) == ("instruction", "output")
    mapped = eval_data_config(DataConfig(prompt_key="instruction", eval_files="t.jsonl", eval_prompt_key="q"))
    assert mapped.prompt_key == "q"
    split = eval_data_config(DataConfig(prompt_key="instruction", eval_split=0.1))
    assert split.prompt_key == "instruction"
