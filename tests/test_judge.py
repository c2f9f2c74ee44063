"""Judge grade parsing, score arithmetic, and the judge talking to a real local HTTP endpoint."""

import pytest

from fake_openai_server import FakeOpenAIServer, Status
from gadchat.judge import (
    DEFAULT_JUDGE_PROMPT,
    Judge,
    fill_judge_prompt,
    format_question,
    judge_score,
    load_judge_template,
    mean_judge_score,
    parse_judge_score,
)
from gadchat.teacher.client import ChatEndpoint, SamplingSettings


@pytest.mark.parametrize(
    "reply, grade",
    [
        ("The answer is fine.\n\nRating: [[7]]", 7.0),
        ("[[9]]", 9.0),
        ("[[ 6.5 ]]", 6.5),
        ("Rating: [[8/10]]", 8.0),
        ("Score: 7", 7.0),
        ("score:7", 7.0),
        ("**Rating:** 8", 8.0),
        ("Grade = 3.", 3.0),
        ("I would give it 7/10.", 7.0),
        ("It deserves 6 out of 10.", 6.0),
        ("5", 5.0),
        (" 10.\n", 10.0),
        ("First thought [[3]], but on reflection [[4]]", 4.0),  # the last verdict wins
        ("Score: 7/10", 7.0),
        ("This answer lists 3 steps out of the 5 needed. Rating: [[2]]", 2.0),
    ],
)
def test_parse_judge_score_reads_common_formats(reply, grade):
    assert parse_judge_score(reply) == grade


@pytest.mark.parametrize(
    "reply",
    ["", None, "I cannot rate this answer.", "The answer has 3 parts and 12 sentences.", "Rating: [[0]]",
     "Score: 11", "[[15]]", "Rating: [[excellent]]"],
)
def test_parse_judge_score_gives_none_when_unreadable(reply):
    assert parse_judge_score(reply) is None


def test_judge_score_arithmetic():
    assert judge_score(5, 5) == 50.0
    assert judge_score(8, 2) == pytest.approx(80.0)
    assert judge_score(4, 8) == pytest.approx(100 * 4 / 12)
    assert judge_score(10, 1) == pytest.approx(100 * 10 / 11)
    with pytest.raises(ValueError):
        judge_score(0, 0)


def test_mean_judge_score_excludes_unreadable_grades_instead_of_zero():
    pairs = [(8, 8), (4, 8), (None, 9), (6, None), (10, 10)]
    mean, used = mean_judge_score(pairs)
    assert used == 3
    assert mean == pytest.approx((50 + 100 * 4 / 12 + 50) / 3)
    assert mean_judge_score([(None, 3)]) == (None, 0)


def test_judge_template_and_question_formatting(tmp_path):
    template = load_judge_template()
    assert "{question}" in template and "{answer}" in template and DEFAULT_JUDGE_PROMPT.name == "judge_prompt.txt"
    filled = fill_judge_prompt("Q={question} A={answer} {other}", "What is {x}?", "It is {y}.")
    assert filled == "Q=What is {x}? A=It is {y}. {other}"
    assert format_question([{"role": "user", "content": "hi"}]) == "hi"
    assert format_question([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]) == \
        "System: be brief\n\nUser: hi"
    bad = tmp_path / "bad.txt"
    bad.write_text("Rate this: {answer}")
    with pytest.raises(ValueError, match=r"bad\.txt lacks the placeholder\(s\) \{question\}"):
        load_judge_template(bad)


def test_judge_over_http_reference_grades_unparsed_and_failed(tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sk-judge-secret")
    template_path = tmp_path / "my_judge.txt"
    template_path.write_text("QUESTION<<{question}>> ANSWER<<{answer}>> Give [[score]].")

    def responder(body, index):
        text = body["messages"][-1]["content"]
        if not text.startswith("QUESTION<<"):
            return f"reference answer to {text}"
        if "ANSWER<<reference answer to" in text:
            return "Solid. Score: 9"
        if "ANSWER<<mumble>>" in text:
            return "I refuse to grade this."
        return "Weak answer. [[3]]"

    with FakeOpenAIServer(responder=responder) as server:
        endpoint = ChatEndpoint(server.base_url, "judge-model", api_key_env="JUDGE_KEY", backoff_base=0.01,
                                max_retries=1, sampling=SamplingSettings(temperature=0.0))
        judge = Judge(endpoint, load_judge_template(template_path), reference_max_tokens=100, grade_max_tokens=50)
        messages = [{"role": "user", "content": "Why is the sky blue?"}]
        reference, error = judge.reference_answer(messages, "prompt 1")
        assert (reference, error) == ("reference answer to Why is the sky blue?", "")
        assert judge.grade(messages, reference, "prompt 1").grade == 9.0
        weak = judge.grade(messages, "it just is", "prompt 1")
        assert (weak.grade, weak.status) == (3.0, "ok")
        unparsed = judge.grade(messages, "mumble", "prompt 1")
        assert (unparsed.grade, unparsed.status, unparsed.reply) == (None, "unparsed", "I refuse to grade this.")
        server.enqueue(Status(500), Status(500))
        failed = judge.grade(messages, "anything", "prompt 2 (grading student)")
        assert failed.status == "failed" and "prompt 2 (grading student): failed after 2 attempts" in failed.error
        requests = server.chat_requests()
        assert requests[0].body["messages"] == messages and requests[0].body["max_tokens"] == 100
        assert requests[1].body["max_tokens"] == 50 and requests[1].body["temperature"] == 0.0
        assert requests[1].body["messages"][0]["content"] == \
            "QUESTION<<Why is the sky blue?>> ANSWER<<reference answer to Why is the sky blue?>> Give [[score]]."
        assert all(r.headers["authorization"] == "Bearer sk-judge-secret" for r in requests)
