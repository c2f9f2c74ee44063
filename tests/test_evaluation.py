"""End-to-end evaluation on a tiny random model (CPU, transformers backend) with a fake judge endpoint."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from applications import evaluate
from fake_openai_server import FakeOpenAIServer, Status
from gadchat.judge import judge_score
from gadchat.rouge import rouge_l_f1
from gadchat.tiny import ensure_tiny_model

JUDGE_KEY = "sk-judge-KEY-NEVER-WRITTEN-987654321"
GRADING_MARK = "[The Start of Assistant's Answer]"


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory):
    return ensure_tiny_model(tmp_path_factory.getbasetemp() / "tiny_model_shared")


@pytest.fixture(scope="module")
def training_output_dir(tiny_chat_model, tmp_path_factory):
    """A training output dir whose exported actor lives in final/actor."""
    run = tmp_path_factory.mktemp("gad_run")
    shutil.copytree(tiny_chat_model, run / "final" / "actor")
    return run


@pytest.fixture
def custom_set(tmp_path):
    path = tmp_path / "custom.jsonl"
    rows = [
        {"content": [{"role": "user", "content": "Name a colour."}], "teacher_response": "Blue is a colour."},
        {"content": [{"role": "system", "content": "Be odd."}, {"role": "user", "content": "Say something unreadable"}],
         "teacher_response": "Something."},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def judge_responder(body, index):
    """Reference answers on request; grades 8 for the judge's own answers, 4 for students'; scripted trouble."""
    text = body["messages"][-1]["content"]
    if GRADING_MARK not in text:
        return f"REFERENCE ANSWER: {text}"
    answer = text.split(GRADING_MARK, 1)[1]
    if "REFERENCE ANSWER" in answer:
        return "A thorough answer.\nRating: [[8]]"
    if "Say something unreadable" in text:
        return "I am unable to give this a number."
    if "Name a colour." in text and getattr(judge_responder, "fail_colour", False):
        return Status(500, "judge overloaded")
    return "Mostly noise. Rating: [[4]]"


def test_evaluate_two_models_two_sets_with_judge(tiny_chat_model, training_output_dir, custom_set, tmp_path, monkeypatch,
                                                 capsys):
    monkeypatch.setenv("JUDGE_API_KEY", JUDGE_KEY)
    out = tmp_path / "eval"
    with FakeOpenAIServer(responder=judge_responder) as server:
        code = evaluate.main([
            "--models", f"student={tiny_chat_model}", f"gad={training_output_dir}",
            "--eval-sets", "heldout", f"custom={custom_set}", "--max-prompts", "3",
            "--max-new-tokens", "12", "--backend", "hf", "--output-dir", str(out),
            "--judge-base-url", server.base_url, "--judge-model", "judge-4o", "--judge-api-key-env", "JUDGE_API_KEY",
            "--judge-concurrency", "3", "--judge-backoff-base", "0.01", "--judge-max-retries", "1", "--no-progress",
        ])
        requests = server.chat_requests()
    assert code == 0
    printed = capsys.readouterr().out
    table = (out / "results.md").read_text()
    assert table in printed
    assert "### heldout" in table and "### custom" in table
    assert "| model | ROUGE-L F1 x100 | judge score |" in table
    assert table.count("| student |") == 2 and table.count("| gad |") == 2

    results = json.loads((out / "results.json").read_text())
    heldout, custom = results["results"]["heldout"], results["results"]["custom"]
    expected = judge_score(4, 8)
    for label in ("student", "gad"):
        assert heldout[label]["judge_score"] == pytest.approx(expected)
        assert (heldout[label]["judged"], heldout[label]["judge_unparsed"], heldout[label]["judge_failed"]) == (3, 0, 0)
        # the unreadable grade is counted and left out of the mean, not scored as 0
        assert (custom[label]["judged"], custom[label]["judge_unparsed"]) == (1, 1)
        assert custom[label]["judge_score"] == pytest.approx(expected)
        assert heldout[label]["prompts"] == 3 and custom[label]["prompts"] == 2
    assert results["models"]["gad"] == str(training_output_dir)
    assert f"| {expected:.2f} |" in table

    # one reference answer per prompt (5), its grade (5), and 2 models x 5 grades
    assert len(requests) == 5 + 5 + 10
    assert all(r.body["model"] == "judge-4o" and r.body["temperature"] == 0.0 for r in requests)
    assert all(r.headers["authorization"] == f"Bearer {JUDGE_KEY}" for r in requests)

    generations = [json.loads(line) for line in open(out / "generations.jsonl")]
    assert len(generations) == 2 * 5
    assert {(g["set"], g["model"]) for g in generations} == {(s, m) for s in ("heldout", "custom") for m in ("student", "gad")}
    for g in generations:
        assert g["rouge_l"] == pytest.approx(rouge_l_f1(g["generation"], g["teacher_response"]))
        assert g["finish_reason"] in ("stop", "length") and 0 < g["num_tokens"] <= 12
        assert g["judge"]["reference_answer"].startswith("REFERENCE ANSWER: ")
        if "Say something unreadable" in json.dumps(g["prompt"]):
            assert g["judge"]["status"] == "unparsed" and g["judge"]["score"] is None
            assert g["judge"]["student_reply"] == "I am unable to give this a number."
        else:
            assert (g["judge"]["status"], g["judge"]["student_grade"], g["judge"]["reference_grade"]) == ("ok", 4.0, 8.0)
            assert g["judge"]["score"] == pytest.approx(expected)
    # the same greedy model under two labels answers the same
    by_key = {}
    for g in generations:
        by_key.setdefault((g["set"], g["row"]), set()).add(g["generation"])
    assert all(len(texts) == 1 for texts in by_key.values())
    assert len((out / "judge_references.jsonl").read_text().splitlines()) == 5
    for path in out.rglob("*"):
        assert JUDGE_KEY not in path.read_text()
    assert JUDGE_KEY not in printed

    # a rerun reuses the cached reference answers and grades: only the student is graded
    with FakeOpenAIServer(responder=judge_responder) as server:
        assert evaluate.main(["--models", f"again={tiny_chat_model}", "--eval-sets", "heldout", "--max-prompts", "3",
                              "--max-new-tokens", "12", "--backend", "hf", "--output-dir", str(out),
                              "--judge-base-url", server.base_url, "--judge-model", "judge-4o",
                              "--judge-api-key-env", "JUDGE_API_KEY", "--no-progress"]) == 0
        assert len(server.chat_requests()) == 3
    rerun = json.loads((out / "results.json").read_text())["results"]["heldout"]["again"]
    assert rerun["judge_score"] == pytest.approx(expected) and rerun["judged"] == 3


def test_evaluate_counts_failed_judge_requests(tiny_chat_model, custom_set, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", JUDGE_KEY)
    monkeypatch.setattr(judge_responder, "fail_colour", True, raising=False)
    out = tmp_path / "eval"
    with FakeOpenAIServer(responder=judge_responder) as server:
        code = evaluate.main(["--models", str(tiny_chat_model), "--eval-sets", str(custom_set), "--max-new-tokens", "8",
                              "--backend", "hf", "--output-dir", str(out), "--judge-base-url", server.base_url,
                              "--judge-backoff-base", "0.01", "--judge-max-retries", "1", "--no-progress"])
    assert code == 0
    metrics = json.loads((out / "results.json").read_text())["results"]["custom"]["tiny_model_shared"]
    # "Name a colour." : every grading request fails (500 twice) -> failed; the other prompt is unparsed
    assert (metrics["judged"], metrics["judge_unparsed"], metrics["judge_failed"], metrics["judge_score"]) == (0, 1, 1, None)
    table = (out / "results.md").read_text()
    assert "| tiny_model_shared |" in table and "| - | - / - | 0 | 1 | 1 |" in table
    failed = [json.loads(line) for line in open(out / "generations.jsonl")][0]
    assert failed["judge"]["status"] == "failed" and "failed after 2 attempts" in failed["judge"]["error"]
    assert "HTTP 500" in failed["judge"]["error"]


def test_evaluate_rouge_only_without_judge_and_clear_errors(tiny_chat_model, custom_set, tmp_path, capsys):
    out = tmp_path / "eval"
    assert evaluate.main(["--models", f"tiny={tiny_chat_model}", "--eval-sets", f"mine={custom_set}", "--max-new-tokens", "8",
                          "--backend", "hf", "--output-dir", str(out), "--no-progress"]) == 0
    table = (out / "results.md").read_text()
    assert "judge" not in table and "| tiny |" in table
    results = json.loads((out / "results.json").read_text())["results"]["mine"]["tiny"]
    generations = [json.loads(line) for line in open(out / "generations.jsonl")]
    assert "judge" not in generations[0]
    assert results["rouge_l"] == pytest.approx(100 * sum(g["rouge_l"] for g in generations) / 2)
    assert results["judge_score"] is None

    bad_set = tmp_path / "bad.jsonl"
    bad_set.write_text(json.dumps({"content": "a prompt", "output": "no teacher_response field"}) + "\n")
    assert evaluate.main(["--models", str(tiny_chat_model), "--eval-sets", str(bad_set), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{bad_set}, row 1, field 'teacher_response': missing field" in err
    empty_dir = tmp_path / "not_a_model"
    empty_dir.mkdir()
    assert evaluate.main(["--models", str(empty_dir), "--eval-sets", str(custom_set), "--output-dir", str(out)]) == 2
    assert "holds no config.json" in capsys.readouterr().err
    assert evaluate.main(["--models", f"a={tiny_chat_model}", f"a={tiny_chat_model}", "--output-dir", str(out)]) == 2
    assert "duplicate model label(s) a" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_evaluate_cli_with_vllm_two_models_in_one_process(tiny_chat_model, training_output_dir, tmp_path):
    out = tmp_path / "eval_vllm"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "applications.evaluate", "--models", f"first={tiny_chat_model}", str(training_output_dir),
         "--eval-sets", "heldout", "--max-prompts", "2", "--max-new-tokens", "8", "--backend", "vllm",
         "--max-model-len", "1024", "--output-dir", str(out), "--no-progress"],
        cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    label = training_output_dir.name  # a training output dir is labelled by its own name
    assert "| first |" in result.stdout and f"| {label} |" in result.stdout
    generations = [json.loads(line) for line in open(out / "generations.jsonl")]
    assert len(generations) == 4
    texts = {}
    for g in generations:
        texts.setdefault(g["row"], set()).add(g["generation"])
    assert all(len(t) == 1 for t in texts.values())  # the same weights answer the same after the engine swap


# ----------------------------------------------------------------------------------------------
# Issue 10: a judge that answers nothing, a refused judge key, the held-out part of one file


def test_a_judge_that_fails_every_request_makes_the_exit_status_1(tiny_chat_model, custom_set, tmp_path, monkeypatch,
                                                                   capsys):
    monkeypatch.setenv("OPENAI_API_KEY", JUDGE_KEY)
    with FakeOpenAIServer(responder=lambda body, index: Status(500, "judge down")) as server:
        code = evaluate.main(["--models", str(tiny_chat_model), "--eval-sets", str(custom_set), "--max-new-tokens", "4",
                              "--backend", "hf", "--output-dir", str(tmp_path / "eval"), "--judge-base-url",
                              server.base_url, "--judge-backoff-base", "0.01", "--judge-max-retries", "0",
                              "--no-progress"])
    assert code == 1
    err = capsys.readouterr().err
    assert "the judge answered none of its 4 requests" in err, err[-500:]


def test_a_refused_judge_key_stops_the_evaluation_without_echoing_it(tiny_chat_model, custom_set, tmp_path,
                                                                      monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", JUDGE_KEY)
    with FakeOpenAIServer(responder=lambda body, index: Status(401, "Incorrect API key provided: {api_key}")) as server:
        code = evaluate.main(["--models", str(tiny_chat_model), "--eval-sets", str(custom_set), "--max-new-tokens", "4",
                              "--backend", "hf", "--output-dir", str(tmp_path / "eval"), "--judge-base-url",
                              server.base_url, "--judge-concurrency", "1", "--no-progress"])
        sent = len(server.chat_requests())
    err = capsys.readouterr().err
    assert code == 2 and "refused the API key (HTTP 401" in err and JUDGE_KEY not in err
    assert sent == 1


def test_eval_split_evaluates_only_the_held_out_rows(tiny_chat_model, tmp_path):
    from gadchat.data import is_held_out

    rows = [{"instruction": f"Question {i}?", "output": f"Answer {i}."} for i in range(40)]
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval"
    assert evaluate.main(["--models", str(tiny_chat_model), "--eval-sets", f"mine={data}", "--prompt-key", "instruction",
                          "--response-key", "output", "--eval-split", "0.25", "--max-new-tokens", "4",
                          "--backend", "hf", "--output-dir", str(out), "--no-progress"]) == 0
    held = [r for r in rows if is_held_out([{"role": "user", "content": r["instruction"]}], 0.25)]
    generated = [json.loads(line) for line in open(out / "generations.jsonl")]
    assert 0 < len(held) < 40 and [g["teacher_response"] for g in generated] == [r["output"] for r in held]


def test_evaluate_help_shows_defaults_and_the_judge_prompt_is_a_path():
    result = subprocess.run([sys.executable, "-m", "applications.evaluate", "--help"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "(default: 8)" in text and "path of a text file holding the judge prompt template" in text
    assert "mean over prompts" in text
