"""Teacher collection against a real local HTTP server speaking the OpenAI protocol (no mocks)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fake_openai_server import FakeOpenAIServer, Raw, Reply, Slow, Status
from gadchat.teacher.client import ChatEndpoint, EndpointError, MalformedAnswerError, SamplingSettings
from gadchat.teacher.collect import collect_teacher_data
from gadchat.teacher.jsonl import recover_jsonl
from gadchat.teacher.prompts import PromptRow, collection_key, load_prompt_rows

REPO = Path(__file__).resolve().parent.parent
SECRET = "sk-test-THIS-KEY-MUST-NEVER-BE-WRITTEN-0123456789"


@pytest.fixture
def server():
    with FakeOpenAIServer() as fake:
        yield fake


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    return SECRET


def write_prompts(path: Path, count: int, key: str = "content", as_messages: bool = True) -> Path:
    with open(path, "w") as handle:
        for i in range(count):
            prompt = f"question number {i}"
            value = [{"role": "user", "content": prompt}] if as_messages else prompt
            handle.write(json.dumps({key: value, "id": f"q{i}", "source": "unit"}) + "\n")
    return path


def run_cli(args, env_key=SECRET, **kwargs):
    env = dict(os.environ, OPENAI_API_KEY=env_key, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "applications.collect_teacher_data", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120, **kwargs)


def test_retries_rate_limit_server_error_and_timeout_then_success(server, api_key):
    server.enqueue(Status(429, headers={"Retry-After": "0"}), Status(500), Status(503), Slow(2.0, Reply("too late")),
                   Reply("finally"))
    endpoint = ChatEndpoint(server.base_url, "teacher-x", timeout=0.5, max_retries=5, backoff_base=0.01)
    completion = endpoint.complete([{"role": "user", "content": "hi"}], where="prompt row 0")
    assert completion.content == "finally" and completion.finish_reason == "stop"
    assert len(server.chat_requests()) == 5
    assert endpoint.retries == 4
    assert server.requests[0].headers["authorization"] == f"Bearer {SECRET}"


def test_retries_exhausted_and_non_retryable_errors_name_the_row(server, api_key):
    endpoint = ChatEndpoint(server.base_url, "teacher-x", timeout=5, max_retries=2, backoff_base=0.01)
    server.enqueue(Status(500), Status(502), Status(500))
    with pytest.raises(EndpointError, match=r"prompt row 7: failed after 3 attempts; last error: HTTP 500"):
        endpoint.complete([{"role": "user", "content": "hi"}], where="prompt row 7")
    server.enqueue(Status(400, message="bad request: unknown field"))
    with pytest.raises(EndpointError, match=r"prompt row 8: the endpoint refused the request \(HTTP 400"):
        endpoint.complete([{"role": "user", "content": "hi"}], where="prompt row 8")
    assert len(server.chat_requests()) == 4  # 400 is not retried


@pytest.mark.parametrize(
    "body, problem",
    [
        ("<html>Bad gateway</html>", "is not JSON"),
        ('{"id": "x", "object": "chat.completion"}', "has no 'choices'"),
        ('{"choices": []}', "has no 'choices'"),
        ('{"choices": [{"index": 0, "finish_reason": "stop"}]}', "has no 'choices[0].message'"),
        ('{"choices": [{"message": {"role": "assistant", "content": null}}]}', "no string 'choices[0].message.content'"),
    ],
)
def test_malformed_answer_gives_clear_error(server, api_key, body, problem):
    server.enqueue(Raw(body))
    endpoint = ChatEndpoint(server.base_url, "teacher-x", timeout=5, max_retries=3, backoff_base=0.01)
    with pytest.raises(MalformedAnswerError, match=r"prompt row 3 \(p\.jsonl, row 4\): the endpoint's answer") as info:
        endpoint.complete([{"role": "user", "content": "hi"}], where="prompt row 3 (p.jsonl, row 4)")
    assert problem in str(info.value)
    assert len(server.chat_requests()) == 1


def test_cli_collects_published_layout_and_never_leaks_the_key(server, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", 5, key="instruction", as_messages=False)
    out = tmp_path / "out" / "teacher.jsonl"
    server.enqueue(Status(429, headers={"Retry-After": "0"}), Status(500))
    result = run_cli(["--prompts", str(prompts), "--prompt-key", "instruction", "--base-url", server.base_url,
                      "--model", "teacher-x", "--output", str(out), "--concurrency", "1", "--backoff-base", "0.01",
                      "--temperature", "0.7", "--top-p", "0.9", "--max-tokens", "64", "--seed", "3"])
    assert result.returncode == 0, result.stderr
    rows = recover_jsonl(out)
    assert len(rows) == 5
    by_id = {row["id"]: row for row in rows}
    for i in range(5):
        row = by_id[f"q{i}"]
        assert row["content"] == [{"role": "user", "content": f"question number {i}"}]
        assert row["teacher_response"] == f"echo: question number {i}"
        assert row["teacher"] == "teacher-x" and row["finish_reason"] == "stop"
        assert row["instruction"] == f"question number {i}" and row["source"] == "unit"  # original fields kept
        assert row["collection_key"] == collection_key(row["content"], i)
    # the server saw the two errors, then 5 answers; sampling settings went out as flags said
    requests = server.chat_requests()
    assert len(requests) == 7
    assert all(r.headers["authorization"] == f"Bearer {SECRET}" for r in requests)
    assert {k: requests[-1].body[k] for k in ("model", "temperature", "top_p", "max_tokens", "seed")} == {
        "model": "teacher-x", "temperature": 0.7, "top_p": 0.9, "max_tokens": 64, "seed": 3}
    assert "5 collected now" in result.stdout and "2 retries" in result.stdout
    # the key appears nowhere: not in stdout, stderr, or any file written
    assert SECRET not in result.stdout and SECRET not in result.stderr
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET not in path.read_text(errors="replace"), path


def test_cli_reports_failures_and_malformed_rows_then_retries_them(server, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", 4)

    def responder(body, index):
        if body["messages"][-1]["content"] == "question number 2" and index < 4:
            return Raw('{"object": "chat.completion", "choices": []}')
        return None

    server.responder = responder
    out = tmp_path / "teacher.jsonl"
    args = ["--prompts", str(prompts), "--base-url", server.base_url, "--model", "t", "--output", str(out),
            "--concurrency", "1", "--no-progress"]
    first = run_cli(args)
    assert first.returncode == 1
    assert f"prompt row 2 ({prompts}, row 3): the endpoint's answer has no 'choices'" in first.stderr
    failures = [json.loads(line) for line in open(str(out) + ".failures.jsonl")]
    assert [(f["row"], f["line"]) for f in failures] == [(2, 3)] and "no 'choices'" in failures[0]["error"]
    assert len(recover_jsonl(out)) == 3
    # rerun: only the failed prompt is asked again; failures file goes away
    second = run_cli(args)
    assert second.returncode == 0, second.stderr
    assert "3 already answered, 1 collected now" in second.stdout
    assert len(server.chat_requests()) == 5
    assert sorted(r["id"] for r in recover_jsonl(out)) == ["q0", "q1", "q2", "q3"]
    assert not Path(str(out) + ".failures.jsonl").exists()


def test_missing_key_and_bad_input_are_clear_errors(server, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"content": [{"role": "user", "content": "ok"}]}) + "\n"
                       + json.dumps({"content": [{"role": "robot", "content": "x"}]}) + "\n")
    base = ["--prompts", str(prompts), "--base-url", server.base_url, "--model", "t", "--output", str(tmp_path / "o.jsonl")]
    result = run_cli(base + ["--api-key-env", "GADCHAT_TEST_UNSET_KEY"])
    assert result.returncode == 2
    assert "content[0].role" in result.stderr and "row 2" in result.stderr
    prompts.write_text(json.dumps({"content": [{"role": "user", "content": "ok"}]}) + "\n")
    result = run_cli(base + ["--api-key-env", "GADCHAT_TEST_UNSET_KEY"])
    assert result.returncode == 2 and "environment variable GADCHAT_TEST_UNSET_KEY is not set" in result.stderr
    assert not server.chat_requests()


def test_killed_collection_resumes_without_losing_or_duplicating_rows(tmp_path):
    count = 16
    prompts = write_prompts(tmp_path / "prompts.jsonl", count)
    out = tmp_path / "teacher.jsonl"
    args = ["--prompts", str(prompts), "--model", "t", "--output", str(out), "--concurrency", "2", "--no-progress"]
    env = dict(os.environ, OPENAI_API_KEY=SECRET, PYTHONUNBUFFERED="1")
    with FakeOpenAIServer(delay=0.4) as slow_server:
        process = subprocess.Popen([sys.executable, "-m", "applications.collect_teacher_data", "--base-url",
                                    slow_server.base_url, *args], cwd=REPO, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while time.time() < deadline:
            if out.exists() and len(out.read_bytes().splitlines()) >= 4:
                break
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        asked_before_kill = len(slow_server.chat_requests())
    written = recover_jsonl(out)
    assert 4 <= len(written) < count, "the kill should land mid-way"
    # a write torn by a kill leaves a partial last line; the rerun must drop it
    with open(out, "ab") as handle:
        handle.write(b'{"content": [{"role": "user", "content": "question numb')
    with FakeOpenAIServer() as server:
        result = run_cli(["--base-url", server.base_url, *args])
        assert result.returncode == 0, result.stderr
        assert "dropped a torn last line" in result.stdout
        assert f"{len(written)} already answered, {count - len(written)} collected now" in result.stdout
        asked_after = len(server.chat_requests())
    rows = recover_jsonl(out)
    keys = [row["collection_key"] for row in rows]
    assert len(keys) == len(set(keys)) == count
    assert sorted(row["id"] for row in rows) == sorted(f"q{i}" for i in range(count))
    assert all(row["teacher_response"] == "echo: " + row["content"][-1]["content"] for row in rows)
    assert asked_after == count - len(written)
    assert asked_before_kill + asked_after <= count + 4  # at most the in-flight requests were asked twice
    assert out.read_bytes().endswith(b"\n")
    assert SECRET not in result.stdout + result.stderr


def test_drop_truncated_and_prompt_token_budget(server, api_key, tmp_path):
    from gadchat.teacher.collect import prompt_token_counter
    from gadchat.tiny import build_tokenizer

    build_tokenizer(tmp_path / "tok")
    rows = [PromptRow(i, "mem", i + 1, [{"role": "user", "content": text}], {})
            for i, text in enumerate(["short one", "cut me", "word " * 200, "another short"])]

    def responder(body, index):
        text = body["messages"][-1]["content"]
        return Reply(f"partial answer to {text}", finish_reason="length") if text == "cut me" else None

    server.responder = responder
    endpoint = ChatEndpoint(server.base_url, "t", sampling=SamplingSettings(max_tokens=8), backoff_base=0.01)
    out = tmp_path / "teacher.jsonl"
    counter = prompt_token_counter(str(tmp_path / "tok"))
    report = collect_teacher_data(rows, endpoint, out, concurrency=2, drop_truncated=True,
                                  count_prompt_tokens=counter, max_prompt_tokens=64, progress=False)
    assert (report.collected, report.dropped_truncated, report.skipped_over_budget) == (2, 1, 1)
    assert sorted(r["content"][0]["content"] for r in recover_jsonl(out)) == ["another short", "short one"]
    dropped = recover_jsonl(str(out) + ".dropped.jsonl")
    assert [d["finish_reason"] for d in dropped] == ["length"]
    assert report.completion_tokens > 0
    # a rerun asks nothing: answered and dropped prompts are done, the long one is still over budget
    before = len(server.chat_requests())
    again = collect_teacher_data(rows, endpoint, out, drop_truncated=True, count_prompt_tokens=counter,
                                 max_prompt_tokens=64, progress=False)
    assert (again.already_done, again.collected, again.skipped_over_budget) == (3, 0, 1)
    assert len(server.chat_requests()) == before


def test_reads_parquet_and_datasets_folders(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"prompt": f"p{i}", "extra": i} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "prompts.parquet")
    rows = load_prompt_rows(str(tmp_path / "prompts.parquet"), prompt_key="prompt", system_prompt="be brief")
    assert [r.messages for r in rows][1] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "p1"}]
    assert rows[2].original == {"prompt": "p2", "extra": 2}
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "ds"))
    rows = load_prompt_rows(str(tmp_path / "ds"), prompt_key="prompt")
    assert [r.index for r in rows] == [0, 1, 2] and rows[0].messages[-1]["content"] == "p0"


# ----------------------------------------------------------------------------------------------
# Issue 10: empty answers, a refused key, key echo, bad numbers, two teachers in one file


def test_empty_and_whitespace_answers_are_failures_not_rows(server, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", 3)
    server.responder = lambda body, index: {"question number 0": "", "question number 1": " \n\t "}.get(
        body["messages"][-1]["content"])
    out = tmp_path / "teacher.jsonl"
    result = run_cli(["--prompts", str(prompts), "--base-url", server.base_url, "--model", "t", "--output", str(out),
                      "--no-progress"])
    assert result.returncode == 1
    assert [r["id"] for r in recover_jsonl(out)] == ["q2"]
    failures = [json.loads(line) for line in open(str(out) + ".failures.jsonl")]
    assert sorted(f["row"] for f in failures) == [0, 1] and all("answer is empty" in f["error"] for f in failures)


@pytest.mark.parametrize("code", [401, 403])
def test_a_refused_key_stops_at_the_first_request_and_is_never_echoed(server, tmp_path, code):
    prompts = write_prompts(tmp_path / "prompts.jsonl", 20)
    server.responder = lambda body, index: Status(code, message="Incorrect API key provided: {api_key}")
    out = tmp_path / "teacher.jsonl"
    result = run_cli(["--prompts", str(prompts), "--base-url", server.base_url, "--model", "t", "--output", str(out),
                      "--concurrency", "1", "--no-progress"])
    assert result.returncode == 2, result.stderr
    assert f"refused the API key (HTTP {code}" in result.stderr and "Incorrect API key provided: ***" in result.stderr
    assert len(server.chat_requests()) == 1
    assert SECRET not in result.stdout + result.stderr
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET not in path.read_text(errors="replace"), path


def test_an_echoed_key_in_a_failure_is_redacted_in_output_and_failures_file(server, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", 2)
    server.responder = lambda body, index: Status(400, message="bad request from key {api_key}")
    out = tmp_path / "teacher.jsonl"
    result = run_cli(["--prompts", str(prompts), "--base-url", server.base_url, "--model", "t", "--output", str(out),
                      "--no-progress"])
    assert result.returncode == 1
    assert "bad request from key ***" in result.stderr and SECRET not in result.stderr
    assert SECRET not in Path(str(out) + ".failures.jsonl").read_text()


@pytest.mark.parametrize("flag, value", [("--max-retries", "-1"), ("--concurrency", "0"), ("--timeout", "0"),
                                         ("--limit", "-2")])
def test_out_of_range_numbers_are_refused(server, tmp_path, flag, value):
    prompts = write_prompts(tmp_path / "prompts.jsonl", 1)
    result = run_cli(["--prompts", str(prompts), "--base-url", server.base_url, "--model", "t",
                      "--output", str(tmp_path / "o.jsonl"), flag, value])
    assert result.returncode == 2 and f"argument {flag}: must be" in result.stderr
    assert not server.chat_requests()


def test_a_second_teacher_into_the_same_output_is_refused(server, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", 2)
    out = tmp_path / "teacher.jsonl"
    args = ["--prompts", str(prompts), "--base-url", server.base_url, "--output", str(out), "--no-progress"]
    assert run_cli(args + ["--model", "teacher-a"]).returncode == 0
    result = run_cli(args + ["--model", "teacher-b"])
    assert result.returncode == 2 and "already holds answers of teacher teacher-a, not teacher-b" in result.stderr
    assert len(server.chat_requests()) == 2 and {r["teacher"] for r in recover_jsonl(out)} == {"teacher-a"}


def test_help_shows_defaults_and_row_order():
    result = run_cli(["--help"])
    assert result.returncode == 0
    assert "(default: 8)" in result.stdout and "order the answers arrive" in result.stdout
