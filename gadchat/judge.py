"""LLM-as-judge scoring, as in the GAD paper's evaluation (arXiv 2511.10643, GPT-4o judge,
following LMSYS / MiniLLM).

For every prompt the judge model first writes its own reference answer (the prompt's messages sent
as they are). Then it grades, one at a time, the student's answer and the reference answer with the
judge prompt template (``{question}`` and ``{answer}`` are filled in; the default is the LMSYS
single-answer grading prompt packaged as ``gadchat/resources/judge_prompt.txt``, replaceable with
``--judge-prompt``), each on a scale of 1 to 10. Grading each answer alone (pointwise) keeps the
order of the two answers from biasing the grade.

Score of one prompt:  ``score = s_student / (s_student + s_reference) x 100``  (50 = as good as the
judge's own answer). The score of a model on a set is the mean of the per-prompt scores over the
prompts whose two grades were both read. A reply in which no grade can be read (see
:func:`parse_judge_score`) or a judge request that failed is counted and reported, and the prompt
is left out of the mean: it is never scored as zero.
"""

from __future__ import annotations

import hashlib
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from gadchat.resources import JUDGE_PROMPT, resource
from gadchat.teacher.client import AuthenticationError, ChatEndpoint, EndpointError

# Packaged with gadchat (importlib.resources), so an installed copy finds it too.
DEFAULT_JUDGE_PROMPT = resource(JUDGE_PROMPT)
SCORE_RANGE = (1.0, 10.0)

_NUMBER = r"(\d+(?:\.\d+)?)"
# Tried in order; within a pattern the last match wins (a verdict usually closes the reply).
_SCORE_PATTERNS = [
    re.compile(r"\[\[\s*" + _NUMBER + r"\s*(?:/\s*10\s*)?\]\]"),                            # [[7]]  [[7/10]]
    re.compile(r"\b(?:score|rating|grade)\b\s*(?:\*\*)?\s*[:=]\s*(?:\*\*)?\s*\[?\s*" + _NUMBER, re.IGNORECASE),  # Score: 7
    re.compile(_NUMBER + r"\s*/\s*10\b"),                                                    # 7/10
    re.compile(_NUMBER + r"\s+out\s+of\s+10\b", re.IGNORECASE),                              # 7 out of 10
    re.compile(r"^\s*" + _NUMBER + r"\s*\.?\s*$"),                                           # a bare "7"
]


def parse_judge_score(reply: str | None) -> float | None:
    """The 1-10 grade in a judge reply, or ``None`` when none can be read.

    Understood: ``[[7]]``, ``Rating: [[7]]``, ``Score: 7``, ``**Rating:** 8.5``, ``7/10``, ``7 out of
    10`` and a bare number. A number outside 1-10 counts as unreadable.
    """
    if not reply:
        return None
    for pattern in _SCORE_PATTERNS:
        matches = pattern.findall(reply)
        if matches:
            value = float(matches[-1])
            return value if SCORE_RANGE[0] <= value <= SCORE_RANGE[1] else None
    return None


def judge_score(student_grade: float, reference_grade: float) -> float:
    """``student_grade / (student_grade + reference_grade) x 100``; 50 means on par with the reference."""
    if student_grade < 0 or reference_grade < 0 or student_grade + reference_grade <= 0:
        raise ValueError(f"grades must be positive, got student={student_grade}, reference={reference_grade}")
    return 100.0 * student_grade / (student_grade + reference_grade)


def mean_judge_score(grade_pairs) -> tuple[float | None, int]:
    """Mean of :func:`judge_score` over ``(student_grade, reference_grade)`` pairs with both grades read.

    Pairs with a ``None`` grade are left out; returns ``(mean or None, number of pairs used)``.
    """
    scores = [judge_score(s, r) for s, r in grade_pairs if s is not None and r is not None]
    return (sum(scores) / len(scores) if scores else None), len(scores)


def load_judge_template(path: str | Path | None = None) -> str:
    """The template in ``path``; empty or ``None`` = the packaged default (``DEFAULT_JUDGE_PROMPT``)."""
    path = Path(path) if path else DEFAULT_JUDGE_PROMPT
    template = path.read_text(encoding="utf-8")
    missing = [name for name in ("{question}", "{answer}") if name not in template]
    if missing:
        raise ValueError(f"judge prompt {path} lacks the placeholder(s) {', '.join(missing)}")
    return template


def reference_cache_key(judge_model: str, template: str, messages: list) -> str:
    """sha256 of the judge model, the judge template and the prompt messages (canonical JSON)."""
    canonical = json.dumps([judge_model, template, messages], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def format_question(messages: list) -> str:
    """The prompt as the judge reads it: a lone user turn as is, a conversation as ``Role: text`` lines."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def fill_judge_prompt(template: str, question: str, answer: str) -> str:
    # Plain replacement (not str.format): the texts and the template may hold other braces.
    return template.replace("{question}", question).replace("{answer}", answer)


@dataclass
class Verdict:
    grade: float | None
    """The 1-10 grade read from the reply, or None (unreadable reply or failed request)."""
    reply: str
    error: str = ""
    """Why the request failed, when it did."""

    @property
    def status(self) -> str:
        return "failed" if self.error else ("unparsed" if self.grade is None else "ok")


class Judge:
    """A judge model behind an OpenAI-compatible endpoint; see the module docstring."""

    def __init__(self, endpoint: ChatEndpoint, template: str, reference_max_tokens: int = 2048,
                 grade_max_tokens: int = 1024):
        self.endpoint, self.template = endpoint, template
        self.reference_max_tokens, self.grade_max_tokens = reference_max_tokens, grade_max_tokens

    def reference_answer(self, messages: list, where: str) -> tuple[str | None, str]:
        """``(answer, error)``: the judge's own answer to the prompt, or ``None`` and why it failed."""
        try:
            return self.endpoint.complete(messages, where=where, max_tokens=self.reference_max_tokens).content, ""
        except AuthenticationError:
            raise  # a refused key: the whole evaluation stops
        except EndpointError as err:
            return None, str(err)

    def grade(self, messages: list, answer: str, where: str) -> Verdict:
        prompt = fill_judge_prompt(self.template, format_question(messages), answer)
        try:
            reply = self.endpoint.complete([{"role": "user", "content": prompt}], where=where,
                                           max_tokens=self.grade_max_tokens).content
        except AuthenticationError:
            raise  # a refused key: the whole evaluation stops
        except EndpointError as err:
            return Verdict(None, "", str(err))
        return Verdict(parse_judge_score(reply), reply)


def run_parallel(function, items: list, concurrency: int, desc: str = "", progress: bool = True) -> list:
    """``[function(*item) for item in items]`` on ``concurrency`` threads, results in input order."""
    from tqdm import tqdm

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        futures = [pool.submit(function, *item) for item in items]
        return [f.result() for f in tqdm(futures, desc=desc, unit="req", disable=not progress or not items)]
