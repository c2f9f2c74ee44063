"""Files shipped inside the ``gadchat`` package, read with :mod:`importlib.resources` so the library
works from an installed copy as well as from the repository.

- ``judge_prompt.txt``: the default LLM-judge template (LMSYS single-answer grading, ``{question}``
  and ``{answer}`` placeholders), used by :mod:`gadchat.judge`.
- ``tokenizer_corpus.jsonl``: the texts the ``builtin:tiny`` tokenizer is trained on
  (:mod:`gadchat.tiny`), one JSON string a line, in training order: for each row of
  ``data/alpaca_eval_gpt4o/train.jsonl``, its prompt messages' contents and then its teacher
  response. Order and content fix the learned merges, so cached tiny models depend on this file
  byte for byte (``tests/test_packaging.py`` checks it still matches the shipped data).
- ``alpaca_eval_gpt4o/``: the shipped teacher data (``train.jsonl``, ``test.jsonl``; provenance in
  ``data/alpaca_eval_gpt4o/README.md``, whose JSON-lines files link here), read by the
  known-teacher model builds (:mod:`gadchat.known_teacher_models`).
- ``known_teacher/``: the known-teacher benchmark's built models (``kt-teacher``, ``kt-student``, each
  with the ``build_spec.json`` it was built with) and the teacher data sampled from that teacher
  (``data/train.jsonl``, ``data/test.jsonl``): copied into the cache instead of building them
  (:func:`gadchat.known_teacher_models.shipped_build`).
"""

from __future__ import annotations

from importlib import resources

JUDGE_PROMPT = "judge_prompt.txt"
TOKENIZER_CORPUS = "tokenizer_corpus.jsonl"
SHIPPED_TEACHER_DATA = "alpaca_eval_gpt4o"
SHIPPED_KNOWN_TEACHER = "known_teacher"


def resource(name: str):
    """The packaged file ``name``: an ``importlib.resources`` Traversable (``open``, ``read_text``,
    ``name``; a plain :class:`pathlib.Path` when the package is installed as files)."""
    return resources.files(__name__) / name
