"""Evaluate one or several models on teacher-data sets: ROUGE-L F1 and the paper's LLM-judge score.

    python -m applications.evaluate --models seqkd=outputs/seqkd gad=outputs/gad --eval-sets heldout \
        --judge-base-url https://api.openai.com/v1 --judge-model gpt-4o --output-dir eval_out

Models: ``LABEL=PATH`` or ``PATH`` (label = folder name); PATH is an exported model folder, a
training output dir (its ``final/actor``) or a hub id. Eval sets: ``heldout`` (the shipped
``data/alpaca_eval_gpt4o/test.jsonl``), or ``NAME=FILE`` / ``FILE`` in the published layout
(``content`` messages + ``teacher_response``; other keys via ``--prompt-key`` / ``--response-key``).

Every model answers every prompt greedily. ``generations.jsonl`` lists, per set then per model, the
prompts in their input order. Metrics per set and model:

* ROUGE-L F1 (x100) of the answer against the teacher response (``rouge-score``, stemming on);
* judge score (only with ``--judge-base-url``): mean over prompts of
  ``s_student / (s_student + s_reference) x 100``, where the judge model grades (1-10) the
  student's answer and its own reference answer (see :mod:`gadchat.judge`): the mean of the
  per-prompt scores (not a ratio of mean grades). Unreadable grades and failed judge requests are
  counted in the table and left out of the mean. A judge that answers no request at all makes the
  exit status 1; a refused key (401/403) stops the evaluation at once (exit status 2).

Writes ``results.md`` (one markdown table per set, all models as rows; also printed),
``results.json`` and ``generations.jsonl`` (every answer with its scores and judge replies) to
``--output-dir``. The judge's reference answers and their grades are cached in
``judge_references.jsonl`` there (or ``--judge-cache``): reruns and later comparisons reuse them. The judge's API key is read from the variable named by ``--judge-api-key-env``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from gadchat.cli import bounded, prog
from gadchat.config import DataConfig, looks_like_local_path
from gadchat.data import DataError, read_prompts, split_part
from gadchat.generation import BACKENDS, GenerationSettings, Generator, resolve_model_path
from gadchat.judge import (
    Judge,
    Verdict,
    judge_score,
    load_judge_template,
    mean_judge_score,
    reference_cache_key,
    run_parallel,
)
from gadchat.rouge import rouge_l_f1
from gadchat.run_lock import FolderBusyError, FolderLock
from gadchat.teacher.client import AuthenticationError, ChatEndpoint, SamplingSettings
from gadchat.teacher.jsonl import JsonlAppender, recover_jsonl

REPO_ROOT = Path(__file__).resolve().parent.parent
EVAL_SET_ALIASES = {"heldout": REPO_ROOT / "data" / "alpaca_eval_gpt4o" / "test.jsonl"}


@dataclass
class EvalSet:
    name: str
    spec: str
    rows: list = field(default_factory=list)
    """``(source, row, messages, teacher_response)`` tuples."""


def parse_model_specs(specs: list) -> list[tuple[str, str]]:
    """``LABEL=PATH`` or ``PATH`` -> ``(label, path)``; labels must be unique."""
    models = []
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep:
            path = spec
            resolved = Path(spec)
            label = resolved.parent.parent.name if resolved.parts[-2:] == ("final", "actor") else resolved.name
            label = label or spec
        if not label or not path:
            raise ValueError(f"--models entry {spec!r}: expected LABEL=PATH or PATH")
        models.append((label, path))
    labels = [label for label, _ in models]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"duplicate model label(s) {', '.join(duplicates)}: name them with LABEL=PATH")
    return models


def parse_eval_sets(specs: list) -> list[EvalSet]:
    sets = []
    for spec in specs:
        if spec in EVAL_SET_ALIASES:
            sets.append(EvalSet(spec, str(EVAL_SET_ALIASES[spec])))
            continue
        name, sep, path = spec.partition("=")
        if not sep:
            path, name = spec, Path(spec.rstrip("/")).stem or spec
        sets.append(EvalSet(name, path))
    names = [s.name for s in sets]
    if len(set(names)) != len(names):
        raise ValueError(f"eval set names must be unique, got {names}: name them with NAME=FILE")
    return sets


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(allow_abbrev=False,
        prog=prog("applications.evaluate", "gadchat-eval"), formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="ROUGE-L and LLM-judge evaluation of one or several models. The judge score of a model is the "
                    "mean over prompts of s_student / (s_student + s_reference) x 100, prompts whose grades could not "
                    "be read or whose judge requests failed left out (and counted). generations.jsonl lists the "
                    "prompts of each set in input order, per set and model.")
    parser.add_argument("--models", nargs="+", required=True, help="LABEL=PATH or PATH (model folder, training output dir, hub id)")
    parser.add_argument("--eval-sets", nargs="+", default=["heldout"], help="heldout, NAME=FILE or FILE (published layout)")
    parser.add_argument("--output-dir", required=True, help="results.md, results.json, generations.jsonl go here")
    data = parser.add_argument_group("data")
    data.add_argument("--prompt-key", default="content", help="prompt field of the eval sets")
    data.add_argument("--response-key", default="teacher_response", help="teacher-response field of the eval sets")
    data.add_argument("--system-prompt", default="", help="system turn prepended to prompts that have none")
    data.add_argument("--eval-split", type=float, default=0.0,
                      help="use only the held-out part of each set under this --data.eval_split fraction (the rows "
                           "training left out); 0 = every row")
    data.add_argument("--max-prompts", type=bounded(int, 0), default=0, help="first N prompts of each set (0 = all)")
    gen = parser.add_argument_group("generation (greedy)")
    gen.add_argument("--backend", default="auto", choices=BACKENDS, help="auto = vllm where installed, else hf")
    gen.add_argument("--max-new-tokens", type=bounded(int, 1), default=1536, help="longest answer in tokens")
    gen.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    gen.add_argument("--max-model-len", type=bounded(int, 1), default=None, help="vLLM context length")
    gen.add_argument("--batch-size", type=bounded(int, 1), default=16, help="sequences per transformers generate call")
    gen.add_argument("--gpu-memory-utilization", type=bounded(float, 0, strict=True), default=0.85, help="vLLM on GPU")
    judge = parser.add_argument_group("judge (optional; empty --judge-base-url = ROUGE-L only)")
    judge.add_argument("--judge-base-url", default="", help="OpenAI-compatible endpoint of the judge (empty = no judge)")
    judge.add_argument("--judge-model", default="gpt-4o", help="judge model name sent to the endpoint")
    judge.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", help="environment variable holding the judge's key")
    judge.add_argument("--judge-prompt", default="",
                       help="path of a text file holding the judge prompt template, with {question} and {answer} "
                            "placeholders (empty = the LMSYS single-answer grading prompt packaged with gadchat, "
                            "gadchat/resources/judge_prompt.txt)")
    judge.add_argument("--judge-concurrency", type=bounded(int, 1), default=8, help="judge requests in flight at once")
    judge.add_argument("--judge-timeout", type=bounded(float, 0, strict=True), default=120.0, help="per-request timeout in seconds")
    judge.add_argument("--judge-max-retries", type=bounded(int, 0), default=6, help="retries on 429 / 5xx / timeouts (401/403 stop the evaluation)")
    judge.add_argument("--judge-backoff-base", type=bounded(float, 0), default=1.0, help="first backoff in seconds; doubles per retry")
    judge.add_argument("--judge-reference-max-tokens", type=bounded(int, 1), default=2048, help="longest reference answer of the judge")
    judge.add_argument("--judge-grade-max-tokens", type=bounded(int, 1), default=1024, help="longest grading reply")
    judge.add_argument("--judge-cache", default="",
                       help="JSON lines of reference answers + grades to reuse (empty = OUTPUT_DIR/judge_references.jsonl)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _mean(values):
    values = list(values)
    return sum(values) / len(values) if values else None


def _fmt(value, digits=2):
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_tables(results: dict, sets: list[EvalSet], labels: list[str], judged: bool) -> str:
    lines = []
    for eval_set in sets:
        lines.append(f"### {eval_set.name} ({eval_set.spec}, {len(eval_set.rows)} prompts)")
        lines.append("")
        header = ["model", "ROUGE-L F1 x100"]
        if judged:
            header += ["judge score", "mean grade student / reference", "judged", "unparsed", "failed"]
        header += ["mean new tokens", "truncated"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for label in labels:
            m = results[eval_set.name][label]
            cells = [label, _fmt(m["rouge_l"])]
            if judged:
                cells += [_fmt(m["judge_score"]),
                          f"{_fmt(m['mean_student_grade'])} / {_fmt(m['mean_reference_grade'])}",
                          str(m["judged"]), str(m["judge_unparsed"]), str(m["judge_failed"])]
            cells += [_fmt(m["mean_new_tokens"], 1), f"{100 * m['truncated_fraction']:.0f}%"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    try:
        with contextlib.ExitStack() as held:
            return evaluate(argv, held)
    except AuthenticationError as err:
        print(f"error: judge: {err}", file=sys.stderr)
        return 2
    except FolderBusyError as err:
        print(f"error: --output-dir {err}", file=sys.stderr)
        return 2


@dataclass
class JudgeOutcome:
    """The judge's replies: reference answers and verdicts by prompt key ``(set, source, row)``,
    the students' verdicts by ``(label, prompt key)``, and how many requests it answered."""

    references: dict = field(default_factory=dict)
    reference_verdicts: dict = field(default_factory=dict)
    student_verdicts: dict = field(default_factory=dict)
    requests: int = 0
    answered: int = 0
    first_error: str = ""


def _prompt_key(eval_set: EvalSet, row) -> tuple:
    return (eval_set.name, row[0], row[1])


def _where(eval_set: EvalSet, row) -> str:
    return f"set {eval_set.name}, {row[0]} row {row[1]}"


def prepare(args) -> tuple:
    """``(models, sets, judge)`` from the flags: the sets' rows read, the judge's endpoint built,
    every model path checked; raises DataError, ValueError or FileNotFoundError naming the flag."""
    models = parse_model_specs(args.models)
    sets = parse_eval_sets(args.eval_sets)
    data_cfg = DataConfig(prompt_key=args.prompt_key, response_key=args.response_key, system_prompt=args.system_prompt)
    if not 0 <= args.eval_split < 1:
        raise ValueError(f"--eval-split must be 0 (off) or a fraction > 0 and < 1, got {args.eval_split}")
    for eval_set in sets:
        eval_set.rows = split_part(read_prompts(data_cfg, eval_set.spec, require_response=True), args.eval_split, "eval")
        if not eval_set.rows:
            raise ValueError(f"eval set {eval_set.name} ({eval_set.spec}) has no rows"
                             + (f" in its --eval-split {args.eval_split} part" if args.eval_split else ""))
        if args.max_prompts:
            eval_set.rows = eval_set.rows[: args.max_prompts]
    judge = None
    if args.judge_base_url:
        endpoint = ChatEndpoint(args.judge_base_url, args.judge_model, api_key_env=args.judge_api_key_env,
                                sampling=SamplingSettings(temperature=0.0), timeout=args.judge_timeout,
                                max_retries=args.judge_max_retries, backoff_base=args.judge_backoff_base)
        judge = Judge(endpoint, load_judge_template(args.judge_prompt or None),
                      args.judge_reference_max_tokens, args.judge_grade_max_tokens)
    for label, path in models:
        if looks_like_local_path(path) and not Path(path).expanduser().exists():
            raise FileNotFoundError(f"--models {label}={path}: no such folder (a model folder, a training "
                                    "output dir or a hub id org/name)")
        resolve_model_path(path)
    return models, sets, judge


def generate_answers(args, models: list, sets: list, progress: bool) -> tuple:
    """Greedy answers of every model to every prompt of every set (one engine per model):
    ``({(set name, label): [Completion]}, {label: seconds})``."""
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=0.0, n=1)
    all_prompts = [(eval_set, row) for eval_set in sets for row in eval_set.rows]
    answers, timings = {}, {}
    for label, path in models:
        print(f"[evaluate] generating with {label} ({path}) on {len(all_prompts)} prompts", file=sys.stderr, flush=True)
        started = time.time()
        generator = Generator(path, backend=args.backend, dtype=args.dtype, max_model_len=args.max_model_len,
                              batch_size=args.batch_size, gpu_memory_utilization=args.gpu_memory_utilization)
        completions = [group[0] for group in generator.generate([row[2] for _, row in all_prompts], settings, progress)]
        generator.close()
        timings[label] = round(time.time() - started, 2)
        position = 0
        for eval_set in sets:
            answers[(eval_set.name, label)] = completions[position : position + len(eval_set.rows)]
            position += len(eval_set.rows)
    return answers, timings


def run_judge(args, judge, models: list, sets: list, answers: dict, out_dir: Path, progress: bool) -> JudgeOutcome:
    """A reference answer per prompt (shared by all models), its grade, each model's grade.

    Reference answers and their grades are cached (judge model + template + prompt), so a rerun or
    a later evaluation of another model against the same cache uses the very same references."""
    outcome = JudgeOutcome()
    all_prompts = [(eval_set, row) for eval_set in sets for row in eval_set.rows]
    cache_path = Path(args.judge_cache) if args.judge_cache else out_dir / "judge_references.jsonl"
    cache = {entry["cache_key"]: entry for entry in recover_jsonl(cache_path) if "cache_key" in entry}
    cache_keys = {_prompt_key(s, row): reference_cache_key(args.judge_model, judge.template, row[2])
                  for s, row in all_prompts}
    missing = []
    for s, row in all_prompts:
        entry = cache.get(cache_keys[_prompt_key(s, row)])
        if entry is None:
            missing.append((s, row))
        else:
            outcome.references[_prompt_key(s, row)] = (entry["reference_answer"], "")
            outcome.reference_verdicts[_prompt_key(s, row)] = Verdict(entry["reference_grade"], entry["reference_reply"])
    if len(missing) < len(all_prompts):
        print(f"[evaluate] {len(all_prompts) - len(missing)} reference answers and grades from {cache_path}",
              file=sys.stderr, flush=True)
    reference_out = run_parallel(judge.reference_answer, [(row[2], _where(s, row) + " (reference answer)")
                                                          for s, row in missing],
                                 args.judge_concurrency, "judge: reference answers", progress)
    grade_items, grade_keys = [], []
    for (eval_set, row), (reference, error) in zip(missing, reference_out):
        key = _prompt_key(eval_set, row)
        outcome.references[key] = (reference, error)
        if reference is None:
            outcome.reference_verdicts[key] = Verdict(None, "", f"no reference answer: {error}")
        else:
            grade_items.append((row[2], reference, _where(eval_set, row) + " (grading the reference)"))
            grade_keys.append(("reference", key))
    for eval_set in sets:
        for label, _ in models:
            for row, completion in zip(eval_set.rows, answers[(eval_set.name, label)]):
                grade_items.append((row[2], completion.text, _where(eval_set, row) + f" (grading {label})"))
                grade_keys.append((label, _prompt_key(eval_set, row)))
    verdicts = run_parallel(judge.grade, grade_items, args.judge_concurrency, "judge: grades", progress)
    outcome.requests = len(reference_out) + len(verdicts)
    outcome.answered = sum(a is not None for a, _ in reference_out) + sum(v.status != "failed" for v in verdicts)
    outcome.first_error = next((e for a, e in reference_out if a is None), "") or next(
        (v.error for v in verdicts if v.error), "")
    with JsonlAppender(cache_path) as cache_out:
        for (who, key), verdict in zip(grade_keys, verdicts):
            if who != "reference":
                outcome.student_verdicts[(who, key)] = verdict
                continue
            outcome.reference_verdicts[key] = verdict
            if verdict.status == "ok":
                cache_out.append({"cache_key": cache_keys[key], "judge_model": args.judge_model,
                                  "prompt": next(row[2] for s, row in all_prompts if _prompt_key(s, row) == key),
                                  "reference_answer": outcome.references[key][0], "reference_grade": verdict.grade,
                                  "reference_reply": verdict.reply})
    return outcome


def score_and_write(models: list, sets: list, answers: dict, timings: dict, judged: JudgeOutcome | None,
                    generations_path: Path) -> dict:
    """Metrics per set and model, ``{set: {label: {...}}}``; every answer with its scores into
    ``generations_path`` (JSON lines)."""
    results = {}
    with open(generations_path, "w", encoding="utf-8") as handle:
        for eval_set in sets:
            results[eval_set.name] = {}
            for label, path in models:
                rouge_scores, grade_pairs, unparsed, failed = [], [], 0, 0
                student_grades, reference_grades = [], []
                completions = answers[(eval_set.name, label)]
                for row, completion in zip(eval_set.rows, completions):
                    source, number, messages, teacher_response = row
                    rouge = rouge_l_f1(completion.text, teacher_response)
                    rouge_scores.append(rouge)
                    record = {"set": eval_set.name, "model": label, "source": source, "row": number,
                              "prompt": messages, "teacher_response": teacher_response,
                              "generation": completion.text, "finish_reason": completion.finish_reason,
                              "num_tokens": completion.num_tokens, "rouge_l": rouge}
                    if judged is not None:
                        key = (eval_set.name, source, number)
                        student, reference = judged.student_verdicts.get((label, key)), judged.reference_verdicts[key]
                        if student is None:  # not graded: the reference answer is missing
                            student = Verdict(None, "", reference.error)
                        if reference.status == "failed" or student.status == "failed":
                            failed += 1
                        elif reference.status == "unparsed" or student.status == "unparsed":
                            unparsed += 1
                        else:
                            grade_pairs.append((student.grade, reference.grade))
                            student_grades.append(student.grade)
                            reference_grades.append(reference.grade)
                        both = student.grade is not None and reference.grade is not None
                        record["judge"] = {
                            "score": judge_score(student.grade, reference.grade) if both else None,
                            "status": "ok" if both else (student.status if student.status != "ok" else reference.status),
                            "student_grade": student.grade, "reference_grade": reference.grade,
                            "reference_answer": judged.references[key][0],
                            "student_reply": student.reply, "reference_reply": reference.reply,
                            "error": student.error or reference.error,
                        }
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                mean_score, judged_count = mean_judge_score(grade_pairs)
                results[eval_set.name][label] = {
                    "model_path": path, "prompts": len(completions),
                    "rouge_l": 100 * _mean(rouge_scores) if rouge_scores else None,
                    "judge_score": mean_score, "judged": judged_count, "judge_unparsed": unparsed,
                    "judge_failed": failed,
                    "mean_student_grade": _mean(student_grades), "mean_reference_grade": _mean(reference_grades),
                    "mean_new_tokens": _mean(c.num_tokens for c in completions) or 0.0,
                    "truncated_fraction": _mean(c.finish_reason == "length" for c in completions) or 0.0,
                    "generation_seconds_all_sets": timings[label],
                }
    return results


def evaluate(argv=None, held: contextlib.ExitStack | None = None) -> int:
    """Evaluate as the flags ``argv`` say; ``held`` keeps the output folder's lock until the caller
    closes it (one writer per folder)."""
    args = build_parser().parse_args(argv)
    progress = not args.no_progress
    try:
        models, sets, judge = prepare(args)
    except (DataError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out_dir = Path(args.output_dir)
    lock = FolderLock(out_dir, "an evaluation").acquire()
    if held is not None:
        held.callback(lock.release)
    answers, timings = generate_answers(args, models, sets, progress)
    judged = run_judge(args, judge, models, sets, answers, out_dir, progress) if judge is not None else None
    results = score_and_write(models, sets, answers, timings, judged, out_dir / "generations.jsonl")
    table = markdown_tables(results, sets, [label for label, _ in models], judge is not None)
    (out_dir / "results.md").write_text(table, encoding="utf-8")
    summary = {
        "results": results,
        "eval_sets": {s.name: {"spec": s.spec, "prompts": len(s.rows)} for s in sets},
        "models": dict(models),
        "settings": {"max_new_tokens": args.max_new_tokens, "greedy": True, "backend": args.backend,
                     "judge_model": args.judge_model if judge else None,
                     "judge_prompt": str(args.judge_prompt or "default") if judge else None},
    }
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    print(table)
    print(f"[evaluate] wrote {out_dir / 'results.md'}, {out_dir / 'results.json'}, {out_dir / 'generations.jsonl'}")
    if judged is not None and judged.requests and not judged.answered:
        print(f"error: the judge answered none of its {judged.requests} requests, so there is no judge score; "
              f"first error: {judged.first_error}", file=sys.stderr)
        return 1
    return 0

if __name__ == "__main__":
    sys.exit(main())
